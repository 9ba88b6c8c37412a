"""The whole daemon as real processes: frames flow, overlays and alerts are published,
flagged frames are recorded, every frame is accounted for; a stalled subscriber does
not slow anything; a returning subscriber replays missed alerts; SIGTERM is clean;
systemd hears READY only after the first frame; a killed worker comes back."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq

from conftest import iseg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class NotifyListener:
    """Stands in for systemd: records sd_notify datagrams with their arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.time(), line))

    def times(self, line: str) -> list[float]:
        """Arrival times of one message kind."""
        return [t for t, m in self.messages if m == line]

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


def subscribe(config: Path, *args: str, timeout: float = 90) -> list[dict]:
    """Run `iseg subscribe` and parse its JSON lines."""
    done = iseg("subscribe", "--config", str(config), *args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def published(stats: dict) -> float:
    return stats["cameras"]["belt1"].get("published", 0)


def test_demo_flow_subscribers_replay_and_sigterm(make_config, start_daemon, tmp_path):
    config = make_config({"sockets": {"publish_hwm": 8}})
    notify = NotifyListener(tmp_path / "notify.sock")
    ctx = zmq.Context()
    try:
        daemon = start_daemon(config, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
        stats = daemon.wait_ready(120)
        ready_times = notify.times("READY=1")
        assert len(ready_times) == 1, notify.messages
        publisher_state = stats["roles"]["publisher"]["state"]
        assert stats["roles"]["worker.0"]["state"]["ready"] is True
        assert publisher_state["first_frame_at"] <= ready_times[0], "READY was sent before the first frame went through"

        # Overlays, masks and alerts are published (a live subscriber sees them).
        lines = subscribe(config, "--topic", "overlay.", "--topic", "alert.", "--topic", "mask.", "--duration", "6")
        topics = {line["topic"] for line in lines}
        assert {"overlay.belt1", "mask.belt1", "alert.belt1"} <= topics, topics
        overlay = next(line for line in lines if line["topic"] == "overlay.belt1")
        assert overlay["payloads"][0]["format"] == "jpeg" and overlay["header"]["latency_ms"] > 0
        assert next(line for line in lines if line["topic"] == "mask.belt1")["payloads"][0]["format"] == "png"
        alert = next(line for line in lines if line["topic"] == "alert.belt1")["header"]
        assert alert["class"] == "scratch" and alert["id"] >= 1 and alert["classes"]["scratch"]["boxes"]

        # A subscriber that reads nothing does not slow the pipeline.
        before = published(daemon.stats())
        time.sleep(5)
        rate_free = (published(daemon.stats()) - before) / 5
        stalled = ctx.socket(zmq.SUB)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(f"ipc://{daemon.state}/run/publish.sock")
        time.sleep(3)  # its queues fill up (publish_hwm is 8 here)
        before = published(daemon.stats())
        time.sleep(5)
        rate_stalled = (published(daemon.stats()) - before) / 5
        assert rate_free > 0.5 and rate_stalled >= 0.6 * rate_free, (rate_free, rate_stalled)
        assert daemon.stats()["roles"]["publisher"]["up"]

        # A subscriber that was away replays what it missed.
        first = subscribe(config, "--topic", "alert.", "--count", "1", "--duration", "60")
        last_seen = first[0]["header"]["id"]
        daemon.wait_for(lambda s: s["cameras"]["belt1"].get("alerts", 0) >= last_seen + 2, 60, "two more alerts")
        back = subscribe(config, "--topic", "alert.", "--since", str(last_seen), "--count", "2", "--duration", "30")
        assert [line["header"]["id"] for line in back] == [last_seen + 1, last_seen + 2]
        assert all(line.get("replayed") for line in back)

        # SIGTERM: clean exit within the stop timeout, nothing half-written.
        started = time.monotonic()
        assert daemon.terminate(40) == 0, daemon.tail()
        assert time.monotonic() - started < 20 + 5
    finally:
        notify.close()
        ctx.destroy(linger=0)
    assert notify.times("STOPPING=1") and notify.times("WATCHDOG=1")

    final = json.loads((daemon.state / "last_stats.json").read_text())["cameras"]["belt1"]
    assert final["published"] >= 20
    # The dispatcher's accounting after a clean stop: every frame published (failed ones included) or
    # dropped at admission, none lost, none left in flight.
    assert final["lost"] == 0 and final["in_flight"] == 0, final
    assert final["captured"] == final["published"] + final["dropped"], final

    recordings = daemon.state / "recordings"
    assert not any((recordings / ".tmp").iterdir()) if (recordings / ".tmp").exists() else True
    folders = [p for p in recordings.glob("*/belt1/*") if p.is_dir()]
    assert folders and final["recorded"] == len(folders)
    for folder in folders:
        names = {f.name for f in folder.iterdir()}
        assert {"mask.png", "meta.json", "original.png", "overlay.jpg"} <= names, names
        assert names - {"mask.png", "meta.json", "original.png", "overlay.jpg"} <= {
            f"{kind}-{i}.jpg" for kind in ("before", "after") for i in (1, 2)}, names
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["flagged"] == ["scratch"]
    listing = iseg("review", "list", "--config", str(config), "--limit", "1000")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == len(folders)
    first_id = listing.stdout.split()[0]
    assert iseg("review", "mark", first_id, "false-alarm", "--config", str(config)).returncode == 0
    shown = json.loads(iseg("review", "show", first_id, "--config", str(config)).stdout)
    assert shown["status"] == "false-alarm" and Path(shown["files"]["original.png"]).is_file()


def test_worker_kill_restart_and_watchdog(make_config, start_daemon, tmp_path):
    config = make_config()
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = start_daemon(config, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
        stats = daemon.wait_ready(120)
        roles = stats["roles"]
        worker_pid = roles["worker.0"]["pid"]
        others = {name: roles[name]["pid"] for name in ("capture.belt1", "publisher", "recorder")}
        done_before = published(stats)

        os.kill(worker_pid, signal.SIGKILL)
        stats = daemon.wait_for(lambda s: s["roles"]["worker.0"]["pid"] not in (None, worker_pid)
                                and s["roles"]["worker.0"]["state"].get("ready")
                                and published(s) > done_before + 5, 90, "worker restarted and frames flowing again")
        assert stats["roles"]["worker.0"]["restarts"] == 1
        assert {name: stats["roles"][name]["pid"] for name in others} == others, "capture/publisher/recorder must live on"
        assert stats["roles"]["capture.belt1"]["restarts"] == 0

        # A frozen publisher: watchdog pings stop, the supervisor kills and restarts it, pings resume.
        publisher_pid = stats["roles"]["publisher"]["pid"]
        os.kill(publisher_pid, signal.SIGSTOP)
        stopped_at = time.time()
        stats = daemon.wait_for(lambda s: s["roles"]["publisher"]["pid"] not in (None, publisher_pid)
                                and s["roles"]["publisher"]["up"], 60, "frozen publisher replaced")
        pings = notify.times("WATCHDOG=1")
        silent_from = stopped_at + 6 + 1.5  # heartbeat_timeout_s is 6
        restarted_at = time.time()
        gap = [t for t in pings if silent_from < t < restarted_at - 3]
        assert not gap, f"watchdog pinged while the publisher was frozen: {gap}"
        time.sleep(3)
        assert [t for t in notify.times("WATCHDOG=1") if t > restarted_at], "watchdog pings did not resume"
        metrics = daemon.get("/metrics")[1]
        assert 'iseg_role_restarts_total{role="worker.0"} 1' in metrics
        assert 'iseg_role_restarts_total{role="publisher"} 1' in metrics
        assert daemon.terminate() == 0
    finally:
        notify.close()
