"""Supervisor restart limits (a role that keeps dying makes the daemon exit 1 for systemd's
Restart=), and calibration thresholds that the worker then applies."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import iseg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_restart_rate_is_bounded(make_config, start_daemon):
    config = make_config({"worker": {"count": 0}, "supervisor": {"max_restarts": 2, "restart_window_s": 60}})
    daemon = start_daemon(config)
    stats = daemon.wait_for(lambda s: s["roles"]["recorder"]["up"], 30, "recorder up")
    killed = []
    deadline = time.monotonic() + 60
    while daemon.proc.poll() is None and time.monotonic() < deadline:
        pid = daemon.stats()["roles"]["recorder"]["pid"] if daemon.get("/stats")[0] == 200 else None
        if pid and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.2)
    assert daemon.proc.wait(30) == 1, daemon.tail()
    assert len(killed) == 3, killed
    log = daemon.log_path.read_text()
    assert "recorder needed more than 2 restarts" in log and "killed by SIGKILL" in log
    assert stats["roles"]["capture.belt1"]["pid"] is not None


def test_calibration_sets_thresholds_the_worker_uses(make_config, start_daemon):
    config = make_config({"cameras": [{"id": "belt1", "source": "synthetic", "fps": 4, "classes": ["scratch", "dent"],
                                       "thresholds": {"dent": 1.0},
                                       "synthetic": {"seed": 3, "width": 160, "height": 120, "defect_every": 0}}],
                          "calibration": {"quantile": 0.9, "margin": 0.05}})
    done = iseg("calibrate", "--config", str(config), "--camera", "belt1", "--frames", "8", timeout=150)
    assert done.returncode == 0, done.stderr
    state = config.parent / "state"
    document = json.loads((state / "calibration" / "belt1.json").read_text())
    scratch = document["per_class"]["scratch"]
    assert scratch["n"] == 8 and scratch["min"] <= scratch["p50"] <= scratch["max"] <= 1.0
    assert scratch["threshold"] == pytest.approx(min(1.0, scratch["p90"] + 0.05))
    assert "threshold" in done.stdout
    # calibration writes through the live-override path: audited, shown as overrides, the config's values stay defaults
    shown = json.loads(iseg("thresholds", "show", "--json", "--config", str(config)).stdout)
    dent = document["per_class"]["dent"]["threshold"]
    assert {(r["class"], r["source"], r["default_source"]) for r in shown["thresholds"]} == {
        ("scratch", "override", "calibration"), ("dent", "override", "config")}
    assert {e["user"] for e in shown["audit"]} == {"calibrate"}
    daemon = start_daemon(config)
    daemon.wait_for(lambda s: s["roles"]["worker.0"]["state"].get("ready"), 120, "worker ready")
    daemon.terminate()
    log = daemon.log_path.read_text()
    assert f"scratch={scratch['threshold']:.3f} (override), dent={dent:.3f} (override)" in log
