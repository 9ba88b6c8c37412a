"""Credit-based dispatch on one host, under the supervisor: a frozen worker, a killed worker and a
killed publisher lose no admitted frame, every alert is stored once, and the accounting
captured = dropped + published + lost + in_flight holds in every /stats read."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def flow_of(stats: dict) -> dict:
    """belt1's flow, with the accounting identity checked."""
    flow = stats["cameras"]["belt1"]
    assert flow["captured"] == flow["dropped"] + flow["published"] + flow["lost"] + flow["in_flight"], flow
    return flow


def watch(daemon, seconds: float) -> dict:
    """Read /stats every 0.3 s for `seconds`, checking the identity each time; the last flow."""
    deadline = time.monotonic() + seconds
    flow = {}
    while time.monotonic() < deadline:
        flow = flow_of(daemon.stats())
        time.sleep(0.3)
    return flow


def settle(daemon, timeout: float = 30) -> dict:
    """Until nothing is in flight past the admission queue (published caught up)."""
    return flow_of(daemon.wait_for(lambda s: flow_of(s)["in_flight"] <= 2 and flow_of(s)["published"] > 0,
                                   timeout, "frames in flight to settle"))


def alerts_once(state) -> int:
    """Every stored alert is for a distinct (camera, frame, class); returns how many there are."""
    with sqlite3.connect(state / "alerts.sqlite3") as db:
        rows = [json.loads(body) for (body,) in db.execute("SELECT body FROM alerts WHERE body LIKE '%\"defect\"%'")]
    keys = [(a["camera"], a["seq"], a["class"]) for a in rows]
    assert len(keys) == len(set(keys)), "an alert was stored twice"
    return len(keys)


def role_pid(daemon, name: str) -> int:
    return daemon.wait_for(lambda s: s["roles"][name]["pid"] and s["roles"][name]["up"], 90,
                           f"{name} up")["roles"][name]["pid"]


@pytest.fixture
def dispatch_daemon(make_config, start_daemon):
    config = make_config({"worker": {"count": 2, "batch_size": 1, "max_wait_ms": 10},
                          "cameras": [{"id": "belt1", "source": "synthetic", "fps": 3, "classes": ["scratch", "dent"],
                                       "thresholds": {"scratch": 0.0, "dent": 1.0},
                                       "synthetic": {"seed": 3, "width": 160, "height": 120}}],
                          "alerts": {"k": 1, "n": 1, "cooldown_s": 0.0},
                          "dispatch": {"worker_timeout_ms": 1500, "max_frame_age_ms": 8000, "queue_frames": 2},
                          "supervisor": {"heartbeat_timeout_s": 20, "restart_backoff_s": 0.2}})
    daemon = start_daemon(config)
    daemon.wait_ready(120)
    daemon.wait_for(lambda s: s["roles"]["worker.0"]["up"] and s["roles"]["worker.1"]["up"], 90, "both workers")
    return daemon


def test_frozen_and_killed_worker_lose_nothing(dispatch_daemon):
    daemon = dispatch_daemon
    watch(daemon, 3)
    pid = role_pid(daemon, "worker.1")
    os.killpg(pid, signal.SIGSTOP)
    try:
        during = watch(daemon, 4)
    finally:
        os.killpg(pid, signal.SIGCONT)
    assert during["resent"] >= 1 or during["published"] > 0, during
    frozen = settle(daemon)
    assert frozen["lost"] == 0, frozen
    pid = role_pid(daemon, "worker.0")
    os.kill(pid, signal.SIGKILL)
    watch(daemon, 4)
    final = settle(daemon)
    assert final["lost"] == 0, final
    assert final["gaps"] == 0, final
    assert final["resent"] >= 1, final
    alerts_once(daemon.state)
    assert daemon.terminate() == 0
    last = json.loads((daemon.state / "last_stats.json").read_text())["cameras"]["belt1"]
    assert last["captured"] == last["dropped"] + last["published"] + last["lost"], last
    assert last["lost_reasons"].get("worker_lost", 0) == 0, last


def test_killed_publisher_and_dispatcher_recover_without_duplicate_alerts(dispatch_daemon):
    daemon = dispatch_daemon
    watch(daemon, 3)
    before = alerts_once(daemon.state)
    pid = role_pid(daemon, "publisher")
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for(lambda s: s["roles"]["publisher"]["pid"] not in (None, pid) and s["roles"]["publisher"]["up"],
                    60, "the publisher restarted")
    watch(daemon, 4)
    final = settle(daemon)
    assert final["lost"] == 0, final
    assert alerts_once(daemon.state) > before
    ids = [row[0] for row in sqlite3.connect(daemon.state / "alerts.sqlite3").execute("SELECT id FROM alerts ORDER BY id")]
    assert ids == sorted(set(ids))

    # The dispatcher itself dies: what it held counts as lost (dispatcher_lost), the identity still
    # holds, and workers and publisher find its successor on their own.
    published = final["published"]
    pid = role_pid(daemon, "dispatch")
    os.kill(pid, signal.SIGKILL)
    after = flow_of(daemon.wait_for(lambda s: s["roles"]["dispatch"]["pid"] not in (None, pid)
                                    and flow_of(s)["published"] > published + 3, 90, "frames flowing again"))
    assert set(after["lost_reasons"]) >= {"dispatcher_lost"} and after["lost"] == after["lost_reasons"]["dispatcher_lost"]
    assert daemon.terminate() == 0


def test_stats_command_and_hostile_messages_against_the_dispatcher(dispatch_daemon):
    import zmq

    from tests.hostile_messages import hostile_controls, hostile_frames

    daemon = dispatch_daemon
    frames, controls = hostile_frames(), hostile_controls()
    ctx = zmq.Context()
    intake = ctx.socket(zmq.PUSH)
    intake.connect(f"ipc://{daemon.state}/run/intake.sock")
    peer = ctx.socket(zmq.DEALER)
    peer.connect(f"ipc://{daemon.state}/run/dispatch.sock")
    try:
        for _, parts in frames:
            intake.send_multipart(parts)
        for _, parts in controls:
            peer.send_multipart(parts)
        expected = len(frames) + len(controls)
        stats = daemon.wait_for(lambda s: sum(s["roles"]["dispatch"]["rejected"].values()) >= expected, 60,
                                "every hostile message counted")
        assert stats["roles"]["dispatch"]["restarts"] == 0 and stats["roles"]["dispatch"]["up"]
        assert sum(stats["roles"]["dispatch"]["rejected"].values()) == expected, stats["roles"]["dispatch"]["rejected"]
        assert not peer.poll(500), "the dispatcher answered a hostile message"
        before = flow_of(stats)["published"]
        final = flow_of(daemon.wait_for(lambda s: flow_of(s)["published"] > before + 3, 60, "frames still published"))
        assert final["lost"] == 0, final
        done = subprocess.run([sys.executable, "-m", "daemon", "dispatch", "stats", "--json", "--config",
                               str(daemon.config)], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        flow = stats["cameras"]["belt1"]
        assert flow["captured"] == flow["dropped"] + flow["published"] + flow["lost"] + flow["in_flight"]
        assert sorted(stats["workers"]) == ["worker.0", "worker.1"] and stats["leader"] == "primary"
        text = subprocess.run([sys.executable, "-m", "daemon", "dispatch", "stats", "--config", str(daemon.config)],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
        assert "belt1" in text.stdout and "in flight" in text.stdout
    finally:
        intake.close(0)
        peer.close(0)
        ctx.term()
    assert daemon.terminate() == 0
