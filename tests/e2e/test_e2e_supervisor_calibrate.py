"""Supervisor restart limits (a role that keeps dying makes the daemon exit 1 for systemd's
Restart=, with every role stopped), and calibration thresholds that decide which frames the
worker flags."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import iseg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_restart_rate_is_bounded(make_config, start_daemon):
    config = make_config({"worker": {"count": 0}, "supervisor": {"max_restarts": 2, "restart_window_s": 60}})
    daemon = start_daemon(config)
    first = daemon.wait_for(lambda s: s["roles"]["recorder"]["up"], 30, "recorder up")
    killed = [first["roles"]["recorder"]["pid"]]
    os.kill(killed[0], signal.SIGKILL)
    # After one kill the supervisor has restarted the recorder: a new process, counted, and up.
    after = daemon.wait_for(lambda s: s["roles"]["recorder"]["pid"] not in (None, killed[0])
                            and s["roles"]["recorder"]["up"], 30, "recorder restarted")
    assert after["roles"]["recorder"]["restarts"] == 1
    assert after["roles"]["capture.belt1"]["pid"] == first["roles"]["capture.belt1"]["pid"], "an unrelated role restarted"
    role_pids = {name: role["pid"] for name, role in after["roles"].items() if role["pid"]}
    deadline = time.monotonic() + 60
    while daemon.proc.poll() is None and time.monotonic() < deadline:
        pid = daemon.stats()["roles"]["recorder"]["pid"] if daemon.get("/stats")[0] == 200 else None
        if pid and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.2)
    # The third death within the window is one too many: the daemon exits 1 (for systemd's
    # Restart=) and takes every other role down with it rather than leaving orphans.
    assert daemon.proc.wait(30) == 1, daemon.tail()
    assert len(killed) == 3, killed
    log = daemon.log_path.read_text()
    assert "recorder needed more than 2 restarts" in log and "killed by SIGKILL" in log
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in role_pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [name for name, pid in role_pids.items() if not _gone(pid)] == []
    assert daemon.get("/stats")[0] == 0, "the health server outlived the daemon"


def _results(config, seconds: float) -> list[dict]:
    """Headers of the `mask.<camera>` messages a subscriber sees for `seconds` (every processed frame)."""
    import zmq

    from daemon.config import load_config
    from daemon.wire import recv

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(load_config(config).endpoint("publish"))
    sub.setsockopt(zmq.SUBSCRIBE, b"mask.")
    headers = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sub.poll(200):
                headers.append(recv(sub).header)
    finally:
        sub.close(0)
        ctx.term()
    return headers


def test_calibration_sets_thresholds_the_worker_uses(make_config, start_daemon):
    # default_threshold 0: without a calibration every frame would flag every class. Calibration
    # sets live overrides; the camera's config threshold for dent (1.0) is the default a revert returns to.
    config = make_config({"cameras": [{"id": "belt1", "source": "synthetic", "fps": 4, "classes": ["scratch", "dent"],
                                       "thresholds": {"dent": 1.0},
                                       "synthetic": {"seed": 3, "width": 160, "height": 120, "defect_every": 0}}],
                          "alerts": {"default_threshold": 0.0},
                          "calibration": {"quantile": 0.9, "margin": 0.05}})
    done = iseg("calibrate", "--config", str(config), "--camera", "belt1", "--frames", "8", timeout=150)
    assert done.returncode == 0, done.stderr
    state = config.parent / "state"
    document = json.loads((state / "calibration" / "belt1.json").read_text())
    scratch = document["per_class"]["scratch"]
    assert scratch["n"] == 8 and scratch["min"] <= scratch["p50"] <= scratch["max"] <= 1.0
    assert scratch["threshold"] == pytest.approx(min(1.0, scratch["p90"] + 0.05))
    assert "threshold" in done.stdout
    assert scratch["min"] > 0.0, "presence 0 would not tell a calibrated threshold from the default one"
    # Calibration writes through the live-override path: audited, shown as overrides; the config's values stay defaults.
    shown = json.loads(iseg("thresholds", "show", "--json", "--config", str(config)).stdout)
    assert {(r["class"], r["source"], r["default_source"]) for r in shown["thresholds"]} == {
        ("scratch", "override", "calibration"), ("dent", "override", "config")}
    assert {e["user"] for e in shown["audit"]} == {"calibrate"}
    # Put the scratch threshold inside the range of presence scores (through the same path), so that which
    # frames flag depends on it: those above it must flag scratch, those below must not; dent back to the config's.
    threshold = (scratch["min"] + scratch["max"]) / 2 if scratch["max"] > scratch["min"] else scratch["threshold"]
    for args in (["set", "--cls", "scratch", "--value", str(threshold)], ["revert", "--cls", "dent"]):
        assert iseg("thresholds", *args, "--camera", "belt1", "--config", str(config)).returncode == 0
    daemon = start_daemon(config)
    daemon.wait_for(lambda s: s["roles"]["worker.0"]["state"].get("ready"), 120, "worker ready")
    headers = [h for h in _results(config, 12) if h.get("camera") == "belt1"]
    daemon.terminate()
    assert len(headers) >= 5, daemon.tail()
    for header in headers:
        presence = header["presence"]
        assert ("scratch" in header["flagged"]) == (presence["scratch"] > threshold), header
        assert "dent" not in header["flagged"] and presence["dent"] > 0.0, header
    assert not all("scratch" in h["flagged"] for h in headers) or scratch["max"] == scratch["min"], \
        "every frame flagged scratch: the default threshold (0) was applied, not the calibration"
