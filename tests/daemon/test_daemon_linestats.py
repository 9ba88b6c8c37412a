"""Line statistics on hand-made data: the summary store, shifts, p-chart limits, what-if against a
hand-computed case, threshold overrides with audit and revert, health checks and the self-test verdict."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.config import ConfigError, parse_config
from daemon.linestats import api
from daemon.linestats.config import HealthConfig, ShiftConfig
from daemon.linestats.health import HealthMonitor, psi
from daemon.linestats.overrides import OverrideWatcher, ThresholdBook, ThresholdError, effective_thresholds
from daemon.linestats.report import build_stats, p_chart, parse_since, StatsError
from daemon.linestats.selftest import Golden, judge
from daemon.linestats.shifts import ShiftCalendar
from daemon.linestats.store import (BINS, FrameSummary, SummaryStore, SummaryWriter, aggregate,
                                    decode_histogram, encode_histogram, score_bin)
from daemon.linestats.tap import LineTap
from daemon.linestats.verdicts import Verdict
from daemon.linestats.whatif import WhatIfError, parse_range, replay_alerts, what_if
from daemon.messages import Boundary, Rejected, SelfTest
from daemon.metrics import Registry

T0 = 1_780_000_000.0 - (1_780_000_000.0 % 3600)  # an hour boundary


def config_for(tmp_path: Path, **extra):
    data = {"state_dir": str(tmp_path / "state"), "engine": {"model_dir": str(tmp_path / "model")},
            "cameras": [{"id": "belt1", "source": "synthetic", "classes": ["scratch", "dent"],
                         "thresholds": {"scratch": 0.4}},
                        {"id": "belt2", "source": "synthetic", "classes": ["crack"]}], **extra}
    return parse_config(data, str(tmp_path / "config.yaml"))


def minute(m: int, scores: list[float], flagged_at: float = 0.5, alerts: int = 0, camera: str = "belt1",
           cls: str = "scratch") -> dict:
    hist = np.zeros(BINS, np.int64)
    for s in scores:
        hist[score_bin(s)] += 1
    return {"camera": camera, "class": cls, "minute": m, "frames": len(scores),
            "flagged": sum(s > flagged_at for s in scores), "alerts": alerts, "mean_area": 0.0, "hist": hist}


# -- store ------------------------------------------------------------------------------------------

def test_bins_are_right_closed_so_score_above_grid_threshold_is_exact():
    assert [score_bin(s) for s in (0.0, 0.01, 0.0100001, 0.5, 0.505, 1.0, 1.5, -0.2)] == [0, 0, 1, 49, 50, 99, 99, 0]
    for bins, values, size in (([0, 7, 99], [3, 70000, 1], 2 + 100 * 4), ([30, 32], [200, 5], 2 + 3),
                               ([50], [300], 2 + 2), ([], [], 2)):
        counts = np.zeros(BINS, np.int64)
        counts[bins] = values
        blob = encode_histogram(counts)
        assert len(blob) == size and np.array_equal(decode_histogram(blob), counts)


def test_store_merges_minutes_even_when_the_clock_jumps_back(tmp_path):
    store = SummaryStore(tmp_path / "s.sqlite3")
    frames = [FrameSummary("belt1", T0 + 5, {"scratch": 0.3, "dent": 0.7}, ("dent",), {"dent": 0.1}, ("dent",)),
              FrameSummary("belt1", T0 + 65, {"scratch": 0.35, "dent": 0.2}, (), {})]
    buckets: dict = {}
    aggregate(frames, buckets)
    store.merge(buckets)
    # NTP steps the clock back: a later batch has frames in the first minute again; they add up.
    buckets = {}
    aggregate([FrameSummary("belt1", T0 + 30, {"scratch": 0.31, "dent": 0.9}, ("dent",), {"dent": 0.3})], buckets)
    store.merge(buckets)
    rows = {(r["class"], r["minute"]): r for r in store.minutes(camera="belt1")}
    first = rows[("dent", int(T0 // 60))]
    assert (first["frames"], first["flagged"], first["alerts"]) == (2, 2, 1)
    assert first["mean_area"] == pytest.approx(0.2)
    assert first["hist"][score_bin(0.7)] == 1 and first["hist"][score_bin(0.9)] == 1
    assert rows[("scratch", int(T0 // 60) + 1)]["frames"] == 1
    assert store.drop_before(T0 + 60) == 2
    assert {r["minute"] for r in store.minutes()} == {int(T0 // 60) + 1}
    store.close()


def test_writer_batches_off_the_caller_and_corrupt_store_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    writer = SummaryWriter(path, flush_s=0.1, retention_days=30, queue_max=100)
    now = time.time()
    # Queued before the thread runs, so the bound is what is tested, not the race with the writer.
    accepted = [writer.add(FrameSummary("belt1", now, {"scratch": 0.5}, (), {})) for _ in range(150)]
    assert accepted.count(False) == writer.dropped == 50  # the queue is bounded: the caller is never blocked
    with caplog.at_level(logging.ERROR):
        writer.start()
    assert any("corrupt" in r.message for r in caplog.records)
    assert list(tmp_path.glob("s.sqlite3.corrupt-*"))
    writer.close()
    store = SummaryStore(path)
    assert sum(r["frames"] for r in store.minutes()) == 150 - writer.dropped
    store.close()


# -- shifts and stats ---------------------------------------------------------------------------

def test_shifts_wrap_midnight_in_the_configured_zone():
    shifts = (ShiftConfig(name="early", start="06:00"), ShiftConfig(name="late", start="14:00"),
              ShiftConfig(name="night", start="22:00"))
    calendar = ShiftCalendar(shifts, "Europe/Berlin")
    # 2026-01-15 04:30 UTC = 05:30 Berlin (CET): still the night shift that began on the 14th.
    ts = 1768451400.0
    assert calendar.shift(ts) == "2026-01-14 night"
    assert calendar.shift(ts + 3600) == "2026-01-15 early"
    assert calendar.hour(ts) == "2026-01-15 05:00"
    assert ShiftCalendar((), "UTC").shift(ts) == "2026-01-15 all day"


def test_config_needs_an_explicit_zone_for_shifts(tmp_path):
    with pytest.raises(ConfigError, match="stats.timezone: required"):
        config_for(tmp_path, shifts=[{"name": "early", "start": "06:00"}])
    with pytest.raises(ConfigError, match=r"shifts\[1\].start"):
        config_for(tmp_path, shifts=[{"name": "a", "start": "06:00"}, {"name": "b", "start": "6:00"}],
                   stats={"timezone": "UTC"})


def test_p_chart_limits_and_out_of_control_hour():
    calendar = ShiftCalendar((), "UTC")
    m0 = int(T0 // 60)
    minutes = [minute(m0, [0.6] * 2 + [0.1] * 98), minute(m0 + 60, [0.6] * 2 + [0.1] * 98),
               minute(m0 + 120, [0.6] * 20 + [0.1] * 80)]
    verdicts = [Verdict("belt1", T0 + 10, ("scratch",), {"scratch": 0.6}, "confirmed"),
                Verdict("belt1", T0 + 20, ("scratch",), {"scratch": 0.6}, "false-alarm")]
    rows = build_stats(minutes, verdicts, calendar, "hour")
    assert [r["frames"] for r in rows] == [100, 100, 100] and [r["flagged"] for r in rows] == [2, 2, 20]
    center = 24 / 300
    sigma = math.sqrt(center * (1 - center) / 100)
    assert rows[0]["center"] == pytest.approx(center)
    assert rows[0]["ucl"] == pytest.approx(center + 3 * sigma)
    assert rows[0]["lcl"] == pytest.approx(max(0, center - 3 * sigma))
    assert [r["out_of_control"] for r in rows] == [False, False, True]
    assert (rows[0]["confirmed"], rows[0]["false_alarms"]) == (1, 1)
    assert p_chart(0, 0, 0.1) == (0.0, 1.0, False)
    assert parse_since("90m") == 5400 and parse_since("2d") == 172800
    with pytest.raises(StatsError, match="--since"):
        parse_since("yesterday")


# -- what-if ------------------------------------------------------------------------------------

def test_what_if_matches_a_hand_computed_case():
    """Three minutes of 10 frames; k=2 of n=3, cooldown 20 s.

    minute 0: scores 0.55 x3, 0.45 x2, 0.2 x5   minute 1: 0.2 x10   minute 2: 0.65 x1, 0.2 x9.
    At 0.5: flagged 3/0/1 = 4. Replay: minute 0 frames 0,1,2 flagged (6 s apart) → alert at frame 1
    (t=6 s); frame 2 (t=12 s) is inside the cooldown → 1 alert; minute 2's single flag never makes 2 of 3.
    At 0.4: flagged 5/0/1; frames 1 (6 s) alert, next due at >= 26 s = frame 5, but only frames 0-4 flag → 1.
    At 0.1: every frame flags (30, one every 6 s); alerts at the first frame >= 20 s after the last:
    6, 30, 54, 78, 102, 126, 150, 174 s → 8. At 0.6: only minute 2's 0.65 → 1 frame, 0 alerts.
    Verdicts: a confirmed 0.55 is missed from 0.55 up; a false alarm at 0.45 is avoided from 0.45 up.
    """
    m0 = int(T0 // 60)
    minutes = [minute(m0, [0.55] * 3 + [0.45] * 2 + [0.2] * 5), minute(m0 + 1, [0.2] * 10),
               minute(m0 + 2, [0.65] + [0.2] * 9)]
    verdicts = [Verdict("belt1", T0, ("scratch",), {"scratch": 0.55}, "confirmed"),
                Verdict("belt1", T0 + 1, ("scratch",), {"scratch": 0.45}, "false-alarm")]
    shifts = (ShiftConfig(name="day", start="00:00"),)
    result = what_if(minutes, verdicts, "scratch", [0.1, 0.4, 0.5, 0.6], ShiftCalendar(shifts, "UTC"), 2, 3, 20.0)
    rows = {r["threshold"]: r for r in result["rows"]}
    assert {t: r["frames_flagged"] for t, r in rows.items()} == {0.1: 30, 0.4: 6, 0.5: 4, 0.6: 1}
    assert {t: r["alerts"] for t, r in rows.items()} == {0.1: 8, 0.4: 1, 0.5: 1, 0.6: 0}
    assert {t: r["confirmed_missed"] for t, r in rows.items()} == {0.1: 0, 0.4: 0, 0.5: 0, 0.6: 1}
    assert {t: r["false_alarms_avoided"] for t, r in rows.items()} == {0.1: 0, 0.4: 0, 0.5: 1, 0.6: 1}
    assert rows[0.5]["per_shift"] == {"day": 4}
    assert result["frames"] == 30 and sum(result["histograms"]["confirmed"]) == 1
    assert "per-minute" in result["method"]["alerts"]


def test_replay_window_carries_across_minutes():
    m0 = int(T0 // 60)
    # the last frame of minute 0 and the first of minute 1 flag: 2 of the last 3 frames → one alert
    minutes = [minute(m0, [0.2] * 9 + [0.9]), minute(m0 + 1, [0.9] + [0.2] * 9)]
    flagged = np.array([1, 1])
    # per-minute model puts a minute's flags at its start: minute 0 = [T, F x9], minute 1 = [T, F x9]
    assert replay_alerts(minutes, flagged, 2, 3, 0.0) == 0
    assert replay_alerts(minutes, flagged, 1, 1, 0.0) == 2


def test_range_is_checked():
    assert parse_range("0.1:0.2:0.05") == [0.1, 0.15, 0.2]
    for bad in ("0.1:0.9", "a:b:c", "0.5:0.1:0.1", "0:2:0.1", "0:1:0", "0:1:nan"):
        with pytest.raises(WhatIfError, match="--range"):
            parse_range(bad)


# -- overrides ------------------------------------------------------------------------------------

def test_overrides_are_audited_revertable_and_checked(tmp_path):
    config = config_for(tmp_path)
    book = ThresholdBook(config)
    watcher = OverrideWatcher(config.state_path)
    assert effective_thresholds(config, config.cameras[0]) == {"scratch": (0.4, "config"), "dent": (0.5, "default")}
    first = book.set("belt1", "scratch", 0.55, "ann@cli", "too many false alarms")
    assert (first["old"], first["old_source"], first["new"], first["new_source"]) == (0.4, "config", 0.55, "override")
    book.set("belt1", "scratch", "0.6", "bob@console", "")
    watcher.next_check = 0
    assert watcher.changed() and not watcher.changed()
    shown = {(r["camera"], r["class"]): r for r in book.show()}
    assert shown[("belt1", "scratch")]["value"] == 0.6 and shown[("belt1", "scratch")]["source"] == "override"
    assert shown[("belt1", "scratch")]["override"]["user"] == "bob@console"
    assert shown[("belt1", "scratch")]["default"] == 0.4
    assert book.revert("belt1", "scratch", "ann@cli")["new"] == 0.55
    back = book.revert("belt1", "scratch", "ann@cli")
    assert (back["new"], back["new_source"]) == (0.4, "config")
    with pytest.raises(ThresholdError, match="no change to revert"):
        book.revert("belt1", "scratch", "ann@cli")
    assert [e["action"] for e in book.audit()] == ["revert", "revert", "set", "set"]
    for value in (float("nan"), "nan", -0.1, 1.5, "inf", "high", True):
        with pytest.raises(ThresholdError, match="threshold"):
            book.set("belt1", "scratch", value, "x")
    with pytest.raises(ThresholdError, match=r"unknown camera 'belt9' \(known: belt1, belt2\)"):
        book.set("belt9", "scratch", 0.5, "x")
    with pytest.raises(ThresholdError, match=r"unknown class 'crack' for camera belt1 \(known: scratch, dent\)"):
        book.set("belt1", "crack", 0.5, "x")
    with pytest.raises(ThresholdError, match="unknown field"):
        api.set_threshold(config, "belt1", "dent", {"value": 0.3, "who": "me"}, "x")


# -- health ---------------------------------------------------------------------------------------

def scene(seed: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(120, 20, (120, 160, 3)).clip(0, 255).astype(np.uint8)
    cv2.circle(image, (40 + shift, 60), 20, (220, 220, 220), -1)
    return image


def run_frames(monitor: HealthMonitor, frames, start: float, fps: float = 4.0, presence=None):
    changes = []
    for i, frame in enumerate(frames):
        ts = start + i / fps
        monitor.observe("belt1", ts, frame, presence or {"scratch": 0.3})
        changes += monitor.tick(ts)
    return changes, start + len(frames) / fps


def test_health_states_follow_faults_and_recover():
    config = HealthConfig(frozen_s=2.0, hold_s=1.0, baseline_frames=8, window_frames=3)
    monitor = HealthMonitor(config, ["belt1"])
    good = [scene(i, i % 50) for i in range(20)]
    changes, t = run_frames(monitor, good, T0)
    assert changes == [] and monitor.snapshot("belt1")["baseline"] == "ok"
    changes, t = run_frames(monitor, [good[0]] * 16, t)
    assert [c[2] for c in changes] == ["frozen"]
    changes, t = run_frames(monitor, good, t)
    assert [c[2] for c in changes] == ["ok"]
    changes, t = run_frames(monitor, [cv2.GaussianBlur(f, (0, 0), 4) for f in good], t)
    assert [c[2] for c in changes] == ["defocus"]
    changes, t = run_frames(monitor, good, t)
    changes, t = run_frames(monitor, [(f // 4).astype(np.uint8) for f in good], t)
    assert [c[2] for c in changes] == ["exposure"]
    changes, t = run_frames(monitor, good, t)
    assert [c[2] for c in changes] == ["ok"]
    # one odd frame is not a state: it must hold hold_s
    changes, t = run_frames(monitor, [(good[0] // 4).astype(np.uint8)] + good[:3], t)
    assert changes == []


def test_presence_drift_against_the_calibration_distribution():
    baseline = np.histogram(np.full(100, 0.32), bins=20, range=(0, 1))[0]
    assert psi(baseline, baseline) == pytest.approx(0.0)
    monitor = HealthMonitor(HealthConfig(psi_frames=40, hold_s=0.0, baseline_frames=1),
                            ["belt1"], {"belt1": {"image": None, "presence": {"scratch": baseline.tolist()}}})
    frames = [scene(i, i) for i in range(40)]
    changes, t = run_frames(monitor, frames, T0, presence={"scratch": 0.31})
    assert changes == []
    changes, t = run_frames(monitor, frames, t, presence={"scratch": 0.72})
    assert [c[2] for c in changes] == ["presence_drift"]
    assert "PSI" in changes[0][3]


def test_failed_self_test_marks_served_cameras_unreliable_with_stored_alerts(tmp_path):
    config = config_for(tmp_path, health={"hold_s": 0.0, "interval_s": 5.0})
    tap = LineTap(config, Registry(), logging.getLogger("test"))
    published, stored = [], []
    tap.observe("belt2", T0, {"crack": 0.1}, [], {"crack": 0.0}, [], scene(1), "worker.0")
    tap.tick(lambda topic, body: published.append((topic, body)), lambda a: stored.append(a) or len(stored), now=T0)
    assert {t for t, _ in published} == {"health.belt1", "health.belt2"}
    tap.self_test(SelfTest("worker.0", "belt1", False, "defect image no longer flags scratch", T0))
    tap.tick(lambda topic, body: published.append((topic, body)), lambda a: stored.append(a) or len(stored), now=T0 + 1)
    assert sorted((a["camera"], a["state"]) for a in stored) == [("belt1", "unreliable"), ("belt2", "unreliable")]
    assert all(a["kind"] == "health" and "inspection unreliable" in a["reason"] for a in stored)
    tap.self_test(SelfTest("worker.0", "belt1", True, "fine", T0))
    tap.tick(lambda topic, body: published.append((topic, body)), lambda a: stored.append(a) or len(stored), now=T0 + 2)
    assert [(a["state"], a["recovered"]) for a in stored[2:]] == [("ok", True), ("ok", True)]
    snapshot = tap.metrics.snapshot()["gauges"]["iseg_camera_health_state"]
    assert snapshot['camera="belt1",state="ok"'] == 1 and snapshot['camera="belt1",state="unreliable"'] == 0
    assert api.health(config, now=T0 + 2)["cameras"]["belt1"]["state"] == "ok"
    assert api.health(config, now=T0 + 600)["cameras"]["belt1"]["state"] == "unknown"
    tap.close()


def test_self_test_message_schema():
    boundary = Boundary({"belt1": ("scratch",)})
    header = {"worker": "worker.0", "camera": "belt1", "ok": False, "detail": "x", "ts": time.time()}
    assert boundary.self_test([b"selftest", json.dumps(header).encode()]).ok is False
    for bad, reason in (({**header, "camera": "belt9"}, "camera"), ({**header, "ok": "yes"}, "type"),
                        ({**header, "ts": 1e400}, "range"), ({**header, "detail": "x" * 5000}, "range")):
        with pytest.raises(Rejected) as err:
            boundary.self_test([b"selftest", json.dumps(bad).encode()])
        assert err.value.reason in (reason, "json")
    with pytest.raises(Rejected):
        boundary.self_test([b"selftest", json.dumps(header).encode(), b"extra"])


def test_self_test_verdict():
    golden = Golden("belt1", "scratch", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8))
    thresholds = {"scratch": 0.4, "dent": 0.5}
    assert judge(golden, {"scratch": 0.45, "dent": 0.1}, {"scratch": 0.2, "dent": 0.1}, thresholds)[0]
    passed, why = judge(golden, {"scratch": 0.35, "dent": 0.1}, {"scratch": 0.2, "dent": 0.6}, thresholds)
    assert not passed and "no longer flags scratch" in why and "good image flags dent" in why


# -- API over a filled store ------------------------------------------------------------------------

def test_api_stats_and_whatif_over_the_store(tmp_path):
    config = config_for(tmp_path)
    store = SummaryStore(config.state_path / "linestats.sqlite3")
    now = time.time()
    buckets: dict = {}
    aggregate([FrameSummary("belt1", now - 120 + i, {"scratch": 0.45 if i % 4 else 0.8, "dent": 0.1},
                            ("scratch",) if i % 4 == 0 else (), {}) for i in range(40)], buckets)
    store.merge(buckets)
    store.close()
    rows = api.stats(config, "belt1", "1h", "shift")["rows"]
    assert {r["class"] for r in rows} == {"scratch", "dent"}
    assert sum(r["frames"] for r in rows if r["class"] == "scratch") == 40
    result = api.whatif(config, "belt1", "scratch", "0.4:0.5:0.1")
    assert [r["frames_flagged"] for r in result["rows"]] == [40, 10]
    assert result["current"] == {"value": 0.4, "source": "config"}
    with pytest.raises(StatsError, match=r"unknown camera 'nope' \(known: belt1, belt2\)"):
        api.stats(config, "nope")
    with pytest.raises(ThresholdError, match="unknown class"):
        api.whatif(config, "belt2", "scratch")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    import yaml

    from daemon.cli import main

    path = tmp_path / "config.yaml"
    camera = {"id": "belt1", "source": "synthetic", "classes": ["scratch", "dent"]}
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "engine": {"model_dir": str(tmp_path / "m")},
                                    "cameras": [camera]}))
    cases = [(["thresholds", "set", "--camera", "belt1", "--cls", "scratch", "--value", "nan"], "outside [0, 1]"),
             (["thresholds", "set", "--camera", "belt1", "--cls", "scratch", "--value", "1.2"], "outside [0, 1]"),
             (["thresholds", "set", "--camera", "belt2", "--cls", "scratch", "--value", "0.5"], "(known: belt1)"),
             (["thresholds", "whatif", "--camera", "belt1", "--cls", "crack"], "(known: scratch, dent)"),
             (["thresholds", "revert", "--camera", "belt1", "--cls", "dent"], "no change to revert"),
             (["stats", "--camera", "belt7"], "(known: belt1)"),
             (["stats", "--since", "soon"], "--since")]
    for args, expected in cases:
        assert main([*args, "--config", str(path)]) == 1, args
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, (args, err)
    assert main(["stats", "--config", str(path)]) == 0 and "no statistics" in capsys.readouterr().out
    assert main(["thresholds", "set", "--camera", "belt1", "--cls", "dent", "--value", "0.25", "--reason", "why",
                 "--config", str(path)]) == 0
    assert "0.500 (default) -> 0.250 (override)" in capsys.readouterr().out
    assert main(["thresholds", "show", "--config", str(path)]) == 0
    assert "by " in capsys.readouterr().out
