"""Sinks end to end against real receivers: mosquitto, an HTTP server, pymodbus's server.

Outages are shorter than the issue's 30 s (broker) and 20 s (webhook) to keep CI lean;
ISEG_SINK_OUTAGE_S sets them (e.g. 30) — the properties checked do not depend on the
length: alerts stored during the outage queue up, arrive in order, none missing, and a
daemon restarted during the outage resumes from its cursor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import REPO, iseg
from daemon.alerts import AlertStore
from daemon.sinks.outbox import CursorStore
from plant_receivers import Broker, HttpReceiver, ModbusServer, MqttCollector, free_port

OUTAGE_S = float(os.environ.get("ISEG_SINK_OUTAGE_S", "6"))
FAST_RETRY = {"retry_initial_s": 0.1, "retry_max_s": 0.5, "breaker_failures": 5, "breaker_open_s": 0.5}


class AlertFeed:
    """Stores an alert every `interval` seconds, as the publisher does, until stopped."""

    def __init__(self, state: Path, interval: float = 0.1, camera: str = "belt1") -> None:
        self.path = state / "alerts.sqlite3"
        self.interval = interval
        self.camera = camera
        self.ids: list[int] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        store = AlertStore(self.path)
        while not self._stop.is_set():
            now = time.time()
            self.ids.append(store.add({"camera": self.camera, "capture_ts": now, "published_ts": now,
                                            "class": "scratch", "classes": {"scratch": {"presence": 0.6}}}))
            self._stop.wait(self.interval)
        store.close()

    def stop(self) -> list[int]:
        """Stop storing; the ids stored."""
        self._stop.set()
        self.thread.join(5)
        return self.ids


class ResultTimes:
    """Arrival times of the publisher's `mask.` results (one per inspected frame), seen by the test."""

    def __init__(self, socket_path: Path) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"mask.")
        self.sub.connect(f"ipc://{socket_path}")
        self.times: list[float] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sub.poll(100):
                self.sub.recv_multipart()
                self.times.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sub.close(0)
        self.ctx.term()


def wait_until(predicate, timeout: float, what: str, on_fail=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{on_fail()}")


def cursor_of(state: Path, sink: str) -> dict[str, Any] | None:
    store = CursorStore(state)
    try:
        return store.status(sink)
    finally:
        store.close()


def first_arrivals(ids: list[int]) -> list[int]:
    seen: set[int] = set()
    return [i for i in ids if not (i in seen or seen.add(i))]


@pytest.mark.slow
def test_mqtt_broker_outage_and_daemon_restart_lose_nothing(tmp_path, make_config, start_daemon):
    broker = Broker(tmp_path / "broker").start()
    collector = MqttCollector(broker.port, "iseg/+/alert")
    config = make_config({"worker": {"count": 0}, "sinks": [
        {"type": "mqtt", "name": "plant", "host": "127.0.0.1", "port": broker.port, "ack_timeout_s": 1.0,
         "connect_timeout_s": 2.0, **FAST_RETRY}]})
    daemon = start_daemon(config)
    feed = None
    try:
        daemon.wait_for(lambda s: s["sinks"]["plant"]["state"] == "ok", 60, "the MQTT sink connected")
        feed = AlertFeed(daemon.state)
        wait_until(lambda: len(collector.bodies()) >= 5, 20, "alerts flowing before the outage")
        broker.stop()
        outage_started = time.monotonic()
        stats = daemon.wait_for(lambda s: s["sinks"]["plant"]["state"] == "down", 20, "the sink down")
        assert "broker" in stats["sinks"]["plant"]["last_error"]
        time.sleep(max(0.0, outage_started + OUTAGE_S / 2 - time.monotonic()))
        assert daemon.terminate() == 0, daemon.tail()
        resumed_at = cursor_of(daemon.state, "plant")["cursor"]
        daemon = start_daemon(config)
        daemon.wait_for(lambda s: s["roles"]["sinks"]["up"], 60, "the restarted sinks role")
        time.sleep(max(0.0, outage_started + OUTAGE_S - time.monotonic()))
        broker.start()
        time.sleep(1.0)
        stored = feed.stop()
        feed = None
        wait_until(lambda: set(stored) <= {b["id"] for b in collector.bodies()}, 60, "every stored alert at the subscriber",
                   lambda: f"missing {sorted(set(stored) - {b['id'] for b in collector.bodies()})[:20]}; "
                           f"sink {daemon.stats()['sinks']}\n{daemon.tail()}")
        received = [b["id"] for b in collector.bodies()]
        assert first_arrivals(received) == sorted(stored), "in order, none missing"
        assert len(received) - len(stored) <= 3, f"resent far more than the alerts in flight: {received}"
        assert f"resumes after alert {resumed_at}" in daemon.log_path.read_text()
        assert 5 <= resumed_at < stored[-1]
        bodies = collector.bodies()
        assert all(b["instance"] == bodies[0]["instance"] and b["camera"] == "belt1" for b in bodies)
        stats = daemon.wait_for(lambda s: s["sinks"]["plant"]["lag_seconds"] == 0 and s["sinks"]["plant"]["delivered"]
                                >= len(stored) - resumed_at, 20, "lag back to 0, the rest counted delivered")
        assert stats["sinks"]["plant"]["state"] == "ok"
        status, metrics = daemon.get("/metrics")
        assert status == 200 and 'iseg_sink_state{sink="plant",state="ok"} 1' in metrics
        for name in ("iseg_sink_delivered_total", "iseg_sink_retries_total", "iseg_sink_failures_total",
                     "iseg_sink_lag_seconds"):
            assert f'{name}{{sink="plant"}}' in metrics, name
        status, body = daemon.get("/healthz")
        assert json.loads(body)["sinks"] == {"plant": "ok"}
        retained = MqttCollector(broker.port, "iseg/available", client_id="test-available")
        wait_until(lambda: retained.bodies("/available") == ["online"], 10, "retained online")
        retained.close()
    finally:
        if feed is not None:
            feed.stop()
        collector.close()
        daemon.close()
        broker.stop()


@pytest.mark.slow
def test_webhook_failing_then_recovering_delivers_all_and_dead_letters_only_4xx(tmp_path, make_config):
    receiver = HttpReceiver()
    receiver.reject = {3, 8}
    (tmp_path / "hook.secret").write_text("plant-secret\n")
    config = make_config({"worker": {"count": 0}, "sinks": [
        {"type": "webhook", "name": "hook", "url": receiver.url, "secret_file": "hook.secret", "timeout_s": 0.5,
         **FAST_RETRY}]})
    state = tmp_path / "state"
    log = open(tmp_path / "sinks.log", "w")
    role = subprocess.Popen([sys.executable, "-m", "daemon", "sinks", "--config", str(config)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    tail = lambda: (tmp_path / "sinks.log").read_text()[-3000:]  # noqa: E731
    feed = None
    try:
        wait_until(lambda: cursor_of(state, "hook") is not None, 30, "the sink's cursor", tail)
        feed = AlertFeed(state)
        wait_until(lambda: len(receiver.ids()) >= 4, 20, "alerts flowing", tail)
        for mode in ("500", "hang", "close"):
            receiver.mode = mode
            time.sleep(OUTAGE_S / 3)
        receiver.mode = "ok"
        time.sleep(0.5)
        stored = feed.stop()
        feed = None
        wait_until(lambda: (cursor_of(state, "hook") or {}).get("cursor") == stored[-1], 60, "the cursor at the end", tail)
        assert all(receiver.attempts.get(mode, 0) >= 1 for mode in ("500", "hang", "close")), receiver.attempts
        expected = [i for i in stored if i not in receiver.reject]
        assert first_arrivals(receiver.ids()) == expected, "every alert but the 4xx ones, in order"
        store = CursorStore(state)
        instance = store.instance_id()
        assert [d["alert_id"] for d in store.dead_letters("hook")] == [3, 8], "dead letters only for 4xx"
        store.close()
        for alert, headers, _ in receiver.delivered:
            body = json.dumps(alert, separators=(",", ":")).encode()
            mac = hmac.new(b"plant-secret", headers["X-Iseg-Timestamp"].encode() + b"." + body, hashlib.sha256)
            assert headers["X-Iseg-Signature"] == "sha256=" + mac.hexdigest()
            assert headers["Idempotency-Key"] == f"{instance}:{alert['id']}"
        shown = iseg("sinks", "status", "--config", str(config))
        assert shown.returncode == 0 and "dead letters 2" in shown.stdout and "alert 3" in shown.stdout, shown.stdout
        receiver.reject.clear()
        before = len(receiver.ids())
        resend = iseg("sinks", "resend", "--config", str(config), "--sink", "hook", "--from", "3")
        assert resend.returncode == 0, resend.stderr
        wait_until(lambda: len(receiver.ids()) >= before + len(stored) - 2, 30, "the resend", tail)
        assert receiver.ids()[before:before + len(stored) - 2] == stored[2:]
        wait_until(lambda: "dead letters 0" in iseg("sinks", "status", "--config", str(config)).stdout, 10,
                   "dead letters resolved")
        tested = iseg("sinks", "test", "--config", str(config), "--sink", "hook")
        assert tested.returncode == 0 and "delivered" in tested.stdout, tested.stderr
        assert receiver.delivered[-1][0]["test"] is True
        role.send_signal(signal.SIGTERM)
        assert role.wait(20) == 0, tail()
        text = tail()
        assert "sink hook degraded" in text and "Traceback" not in text
    finally:
        if feed is not None:
            feed.stop()
        if role.poll() is None:
            role.kill()
            role.wait(10)
        log.close()
        receiver.close()


@pytest.mark.slow
def test_wrong_credentials_and_unreachable_receivers_are_down_with_one_line_and_no_restarts(tmp_path, make_config,
                                                                                           start_daemon):
    broker = Broker(tmp_path / "broker", users={"line": "right-password"}).start()
    (tmp_path / "mqtt.password").write_text("wrong-password\n")
    config = make_config({"worker": {"count": 0}, "sinks": [
        {"type": "mqtt", "name": "badlogin", "host": "127.0.0.1", "port": broker.port, "username": "line",
         "password_file": "mqtt.password", "connect_timeout_s": 2.0},
        {"type": "mqtt", "name": "nobroker", "host": "127.0.0.1", "port": free_port(), "connect_timeout_s": 2.0},
        {"type": "modbus", "name": "noplc", "host": "127.0.0.1", "port": free_port(), "counter_register": 1},
        {"type": "webhook", "name": "nohook", "url": f"http://127.0.0.1:{free_port()}/x", **FAST_RETRY}]})
    daemon = start_daemon(config)
    feed = None
    try:
        daemon.wait_for(lambda s: s["roles"]["sinks"]["up"], 60, "the sinks role")
        feed = AlertFeed(daemon.state, interval=0.5)
        stats = daemon.wait_for(lambda s: all(v["state"] == "down" for v in s["sinks"].values()), 30, "every sink down")
        pid = stats["roles"]["sinks"]["pid"]
        time.sleep(5)
        stats = daemon.stats()
        assert stats["roles"]["sinks"]["pid"] == pid and stats["roles"]["sinks"]["restarts"] == 0, "no crash loop"
        sinks = stats["sinks"]
        assert all(v["state"] == "down" for v in sinks.values()), sinks
        assert "refused the connection" in sinks["badlogin"]["last_error"]
        assert "cannot connect" in sinks["nobroker"]["last_error"]
        assert "cannot reach PLC" in sinks["noplc"]["last_error"]
        assert "cannot connect" in sinks["nohook"]["last_error"]
        log = daemon.log_path.read_text()
        for name in ("badlogin", "nobroker", "noplc"):
            lines = [line for line in log.splitlines() if f"sinks.{name}[" in line and " INFO " not in line]
            assert len(lines) == 1 and f"sink {name} down:" in lines[0], lines
        hook = [line for line in log.splitlines() if "sinks.nohook[" in line and " INFO " not in line
                and "unsigned" not in line]
        assert len(hook) == 2 and "degraded" in hook[0] and "down" in hook[1], hook
        assert "Traceback" not in log and "password" not in log.replace("password_file", "")
        assert "wrong-password" not in log
        tested = iseg("sinks", "test", "--config", str(config), "--sink", "badlogin")
        assert tested.returncode == 1 and "refused the connection" in tested.stderr, tested.stderr
        assert len(tested.stderr.strip().splitlines()) == 1
    finally:
        if feed is not None:
            feed.stop()
        daemon.close()
        broker.stop()


@pytest.mark.slow
def test_modbus_alert_pulses_and_heartbeat_follows_the_worker(tmp_path, make_config, start_daemon):
    plc = ModbusServer()
    heartbeat_ms = 1000
    # The supervisor waits 3 s before restarting the worker: the heartbeat must be seen to stop in that window.
    config = make_config({"supervisor": {"restart_backoff_s": 3.0}, "sinks": [
        {"type": "modbus", "name": "plc", "host": "127.0.0.1", "port": plc.port, "pulse_ms": 200,
         "outputs": [{"camera": "belt1", "coil": 10}], "counter_register": 5, "heartbeat_coil": 1,
         "heartbeat_ms": heartbeat_ms, "max_frame_gap_ms": 1500, **FAST_RETRY}]})
    daemon = start_daemon(config)
    results = ResultTimes(daemon.state / "run" / "publish.sock")
    try:
        daemon.wait_ready(120)
        wait_until(lambda: len(plc.of("coil", 1)) >= 3, 30, "heartbeat toggles while inspecting", daemon.tail)
        beats = [v for _, v in plc.of("coil", 1)]
        assert all(a != b for a, b in zip(beats, beats[1:])), "the heartbeat coil toggles"
        wait_until(lambda: [v for _, v in plc.of("coil", 10)].count(0) >= 2, 60, "an alert pulse (on, then off)",
                   daemon.tail)
        writes = plc.of("coil", 10)
        on = next(t for t, v in writes[1:] if v == 1)
        off = next(t for t, v in writes if v == 0 and t > on)
        assert 0.15 <= off - on <= 1.0, f"pulse of {off - on:.3f}s for pulse_ms 200"
        stats = daemon.wait_for(lambda s: s["sinks"]["plc"]["delivered"] >= 1 and s["sinks"]["plc"]["lag_seconds"] == 0,
                                30, "delivered")
        delivered = cursor_of(daemon.state, "plc")["delivered"]
        assert plc.of("register", 5)[-1][1] == delivered, "the counter register counts delivered alerts"
        old_pid = stats["roles"]["worker.0"]["pid"]
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        back = daemon.wait_for(lambda s: s["roles"]["worker.0"]["pid"] not in (None, old_pid)
                               and s["roles"]["worker.0"]["state"].get("ready"), 120, "the worker restarted")
        assert back["roles"]["worker.0"]["restarts"] >= 1
        back_at = wait_until(lambda: next((t for t in results.times if t > killed_at + 1.0), None), 60,
                             "a result from the restarted worker")
        assert back_at - killed_at > 2 * heartbeat_ms / 1000 + 1.0, "the worker came back too soon to see a stop"
        late = [t - killed_at for t, _ in plc.of("coil", 1) if killed_at + 2 * heartbeat_ms / 1000 < t < back_at]
        assert not late, f"heartbeat still toggled {late} s after the worker was killed"
        wait_until(lambda: any(t > back_at for t, _ in plc.of("coil", 1)), 60, "the heartbeat resumes", daemon.tail)
    finally:
        results.close()
        daemon.close()
        plc.close()


@pytest.mark.slow
def test_sinks_role_on_a_split_host_reads_through_the_replay_socket(tmp_path, make_config):
    """`iseg sinks` with its own state directory (another host): alerts come from the publisher's
    replay socket; a publisher outage is `down`, and what was stored meanwhile follows in order."""
    receiver = HttpReceiver()
    line_sockets = {"publish": f"tcp://127.0.0.1:{free_port()}", "replay": f"tcp://127.0.0.1:{free_port()}"}
    publisher_config = make_config({"worker": {"count": 0}, "sockets": line_sockets}, name="line.yaml")
    line_state = tmp_path / "state"
    sinks_config = make_config({"worker": {"count": 0}, "state_dir": str(tmp_path / "sinks-host"),
                                "sockets": line_sockets,
                                "sinks": [{"type": "webhook", "name": "hook", "url": receiver.url, **FAST_RETRY}]},
                               name="sinks-host.yaml")
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("publisher", "sinks")}

    def start(args: list[str], name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "daemon", *args], cwd=REPO, stdout=logs[name],
                                stderr=subprocess.STDOUT)
    publisher = start(["publish", "--config", str(publisher_config)], "publisher")
    role = start(["sinks", "--config", str(sinks_config)], "sinks")
    tail = lambda: "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in logs)  # noqa: E731
    feed = None
    try:
        wait_until(lambda: cursor_of(tmp_path / "sinks-host", "hook") is not None, 30, "the sink's cursor", tail)
        assert not (tmp_path / "sinks-host" / "alerts.sqlite3").exists()
        feed = AlertFeed(line_state)
        wait_until(lambda: len(receiver.ids()) >= 5, 30, "alerts through the replay socket", tail)
        publisher.send_signal(signal.SIGTERM)
        assert publisher.wait(20) == 0, tail()
        wait_until(lambda: (cursor_of(tmp_path / "sinks-host", "hook") or {}).get("state") == "down", 20,
                   "the sink down while the publisher is", tail)
        time.sleep(1.0)
        stored = feed.stop()
        feed = None
        publisher = start(["publish", "--config", str(publisher_config)], "publisher")
        wait_until(lambda: set(receiver.ids()) >= set(stored), 30, "the alerts stored during the outage", tail)
        assert first_arrivals(receiver.ids()) == sorted(stored)
        assert "replay socket" in (cursor_of(tmp_path / "sinks-host", "hook") or {}).get("last_error", "")
    finally:
        if feed is not None:
            feed.stop()
        for proc in (role, publisher):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
        for log in logs.values():
            log.close()
        receiver.close()
