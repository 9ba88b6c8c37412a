"""Line statistics and health against one running daemon (one start shared by every check, to keep CI short):
a live threshold change flags frames within 2 s and its revert stops them; a golden sample that stops
flagging makes the camera "inspection unreliable" and it recovers; a camera that freezes, blurs and
darkens on cue reaches frozen / defocus / exposure and comes back to ok; health alerts are stored;
`iseg stats` and `iseg thresholds whatif` read the store; after kill -9 of the publisher the summary
store opens and holds every minute written before the kill."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
import zmq

from conftest import REPO, iseg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def golden_images(folder: Path, model: Path, settings: dict) -> tuple[Path, Path, float, float]:
    """A defect and a good image for the self-test, chosen by scoring candidates with the same engine and
    settings as the daemon (the tiny model has random weights, so which image scores high is not known
    in advance): the pair with the widest scratch gap. Returns their paths and scratch scores."""
    import torch

    from engine import ClassSet, IsegSettings, Segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the daemon's worker here; restored below for the tests that run after
    samples = REPO / "engine" / "samples"
    candidates = {name: cv2.resize(cv2.imread(str(samples / f"{name}.png")), (160, 120))
                  for name in ("steel_scratch", "weld_crack", "panel_dent")}
    candidates.update(black=np.zeros((120, 160, 3), np.uint8), grey=np.full((120, 160, 3), 128, np.uint8),
                      white=np.full((120, 160, 3), 255, np.uint8))
    segmenter = Segmenter.load(model, settings=IsegSettings.from_mapping(settings, where=""))
    classes = ClassSet(("scratch", "dent"), settings["bg_context"])
    names = list(candidates)
    images = [cv2.cvtColor(candidates[n], cv2.COLOR_BGR2RGB) for n in names]
    try:
        results = segmenter.segment(images, classes, keep_maps=False)
    finally:
        torch.set_num_threads(threads)
    scratch = {n: float(r.presence[0]) for n, r in zip(names, results)}
    defect = max(names, key=scratch.get)
    good = min(names, key=scratch.get)
    assert scratch[defect] - scratch[good] > 0.02, f"no pair of candidate images separates scratch: {scratch}"
    paths = folder / "golden-defect.png", folder / "golden-good.png"
    cv2.imwrite(str(paths[0]), candidates[defect])
    cv2.imwrite(str(paths[1]), candidates[good])
    return paths[0], paths[1], scratch[defect], scratch[good]


class Masks:
    """A SUB on the daemon's mask.belt1 topic: (published_ts, flagged) of every frame."""

    def __init__(self, state: Path) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"mask.belt1")
        self.sub.connect(f"ipc://{state}/run/publish.sock")

    def frames_after(self, start: float, count: int, timeout: float) -> list[tuple[float, list[str]]]:
        """The flags of every frame published from `start` (epoch seconds) until `count` were published
        after `start` + 2 s (the time a live threshold change may take)."""
        from daemon.wire import recv

        seen: list[tuple[float, list[str]]] = []
        deadline = time.monotonic() + timeout
        while sum(ts > start + 2.0 for ts, _ in seen) < count and time.monotonic() < deadline:
            if self.sub.poll(200):
                header = recv(self.sub).header
                if header["published_ts"] > start:
                    seen.append((header["published_ts"], header["flagged"]))
        assert sum(ts > start + 2.0 for ts, _ in seen) == count, f"only {len(seen)} frames published in {timeout}s"
        return seen

    def close(self) -> None:
        self.sub.close(0)
        self.ctx.term()


def wait_health(daemon, state: str, timeout: float, reason: str = "") -> dict:
    """Until /stats shows belt1 in this health state (with this text in its reason)."""
    def reached(stats: dict) -> bool:
        return stats["health"]["belt1"]["state"] == state and reason in stats["health"]["belt1"]["reason"]
    return daemon.wait_for(reached, timeout, f"health {state} {reason}")


def cli(config: Path, *args: str) -> str:
    done = iseg(*args, "--config", str(config), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def store_rows(state: Path) -> dict[tuple[str, str, int], int]:
    db = sqlite3.connect(f"file:{state / 'linestats.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT c.name, k.name, m.minute, m.frames FROM minutes m JOIN names c ON c.id = m.camera "
                          "JOIN names k ON k.id = m.class").fetchall()
    finally:
        db.close()
    return {(c, k, m): f for c, k, m, f in rows}


def test_thresholds_health_stats_and_kill9(make_config, start_daemon, tmp_path, tiny_model):
    engine_settings = yaml.safe_load(make_config().read_text())["engine"]["settings"]
    defect, good, high, low = golden_images(tmp_path, tiny_model, engine_settings)
    cue = tmp_path / "fault"
    cue.write_text("")
    config = make_config({
        "cameras": [{"id": "belt1", "source": "synthetic", "fps": 4, "classes": ["scratch", "dent"],
                     "bg_context": "metal surface, background",
                     "thresholds": {"scratch": round((high + low) / 2, 4), "dent": 1.0},
                     "synthetic": {"seed": 3, "width": 160, "height": 120, "fault_cue": str(cue)}}],
        "shifts": [{"name": "early", "start": "06:00"}, {"name": "late", "start": "14:00"},
                   {"name": "night", "start": "22:00"}],
        "stats": {"timezone": "Europe/Berlin", "flush_s": 0.5},
        "health": {"interval_s": 2.0, "hold_s": 1.0, "frozen_s": 2.0, "baseline_frames": 6, "window_frames": 3,
                   "self_test_s": 3.0, "golden": {"camera": "belt1", "defect_image": str(defect),
                                                  "good_image": str(good), "defect_class": "scratch"}},
    })
    state = tmp_path / "state"
    daemon = start_daemon(config)
    daemon.wait_ready(150)
    masks = Masks(state)
    try:
        wait_health(daemon, "ok", 60)
        deadline = time.monotonic() + 30
        while "self-test passed" not in daemon.tail(400) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "self-test passed" in daemon.tail(400)

        # A live threshold change flags frames within 2 s, without a restart; revert undoes it.
        assert not any("dent" in f for _, f in masks.frames_after(time.time(), 3, 60))
        out = cli(config, "thresholds", "set", "--camera", "belt1", "--cls", "dent", "--value", "0.0",
                  "--reason", "e2e")
        assert "1.000 (config) -> 0.000 (override)" in out
        changed = time.time()
        after = masks.frames_after(changed, 4, 60)
        assert all("dent" in f for ts, f in after if ts > changed + 2.0), after
        shown = json.loads(cli(config, "thresholds", "show", "--json"))
        row = next(r for r in shown["thresholds"] if r["class"] == "dent")
        assert (row["value"], row["source"], row["default"], row["override"]["reason"]) == (0.0, "override", 1.0, "e2e")
        cli(config, "thresholds", "revert", "--camera", "belt1", "--cls", "dent")
        reverted = time.time()
        after = masks.frames_after(reverted, 4, 60)
        assert not any("dent" in f for ts, f in after if ts > reverted + 2.0), after

        # The golden defect stops flagging (threshold above its score) → inspection unreliable, then recovered.
        wait_health(daemon, "ok", 30)
        cli(config, "thresholds", "set", "--camera", "belt1", "--cls", "scratch", "--value", f"{(high + 1) / 2:.4f}")
        wait_health(daemon, "unreliable", 30, "no longer flags scratch")
        cli(config, "thresholds", "revert", "--camera", "belt1", "--cls", "scratch")
        wait_health(daemon, "ok", 30)

        # Camera faults on cue: each state within its configured time, then back to ok.
        for fault, expected in (("freeze", "frozen"), ("blur", "defocus"), ("dark", "exposure")):
            cue.write_text(fault)
            wait_health(daemon, expected, 30)
            cue.write_text("")
            wait_health(daemon, "ok", 30)

        deadline = time.monotonic() + 10  # metrics travel in heartbeats, once a second
        while 'iseg_camera_health_state{camera="belt1",state="ok"} 1' not in daemon.get("/metrics")[1]:
            assert time.monotonic() < deadline, daemon.get("/metrics")[1]
            time.sleep(0.3)
        metrics = daemon.get("/metrics")[1]
        assert 'iseg_camera_health_state{camera="belt1",state="frozen"} 0' in metrics

        rows = sqlite3.connect(state / "alerts.sqlite3").execute("SELECT body FROM alerts").fetchall()
        alerts = [json.loads(body) for (body,) in rows]
        health = [(a["state"], a["recovered"]) for a in alerts if a.get("kind") == "health"]
        for expected in ("unreliable", "frozen", "defocus", "exposure"):
            assert (expected, False) in health, health
        assert health.count(("ok", True)) >= 4

        # Statistics per shift and the what-if read the store.
        stats = cli(config, "stats", "--by", "shift", "--csv", "--since", "1h").splitlines()
        assert stats[0].startswith("camera,class,period,frames,flagged")
        dent = [line.split(",") for line in stats[1:] if line.startswith("belt1,dent,")]
        assert dent and int(dent[0][3]) > 0 and int(dent[0][4]) > 0  # frames, and the ones flagged at 0.0
        assert dent[0][2].split(" ", 1)[1] in ("early", "late", "night")
        whatif = json.loads(cli(config, "thresholds", "whatif", "--camera", "belt1", "--cls", "dent",
                                "--range", "0:1:0.5", "--json"))
        assert whatif["rows"][0]["frames_flagged"] == whatif["frames"] > 0 and whatif["rows"][-1]["frames_flagged"] == 0

        # kill -9 of the publisher: the store opens and holds every minute written before the kill.
        before = store_rows(state)
        assert before
        pid = daemon.stats()["roles"]["publisher"]["pid"]
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for(lambda s: s["roles"]["publisher"]["pid"] not in (None, pid) and s["roles"]["publisher"]["up"],
                        60, "publisher restarted")
        after_kill = store_rows(state)
        for key, frames in before.items():
            assert after_kill.get(key, 0) >= frames, key
    finally:
        masks.close()
    assert daemon.terminate() == 0
