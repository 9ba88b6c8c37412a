"""The runner with a scripted receiver: order, retries, breaker, dead letters, filters, rewinds."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from daemon.alerts import AlertStore
from daemon.metrics import Registry
from daemon.sinks.config import parse_sink
from daemon.sinks.delivery import DeliveryError, Rejected, Sink, SinkContext
from daemon.sinks.outbox import CursorStore
from daemon.sinks.runner import SinkRunner


class ScriptedSink(Sink):
    """Fails while `failing` is set, rejects ids in `reject`, records deliveries."""

    def __init__(self, config, failing=False, reject=(), problem=None):
        super().__init__(config, SinkContext(instance="inst", resolve=Path, cameras=("a", "b")))
        self.failing = failing
        self.reject = set(reject)
        self.attempts: list[int] = []
        self.delivered: list[tuple[int, str, int]] = []
        self._problem = problem

    def describe(self):
        return "scripted"

    def problem(self):
        return self._problem

    def deliver(self, alert, key, seq):
        self.attempts.append(alert["id"])
        if self.failing:
            raise DeliveryError("receiver down")
        if alert["id"] in self.reject:
            raise Rejected("HTTP 400")
        self.delivered.append((alert["id"], key, seq))


def sink_config(**extra):
    return parse_sink({"type": "webhook", "name": "s", "url": "http://x", "retry_initial_s": 0.02,
                       "retry_max_s": 0.05, "breaker_failures": 3, "breaker_open_s": 0.3, **extra}, 0)


def wait(predicate, timeout=10.0, show=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    raise AssertionError(f"condition not reached {show()}")


@pytest.fixture
def world(tmp_path):
    alerts = AlertStore(tmp_path / "alerts.sqlite3")
    stop = threading.Event()
    runners = []

    def run(sink):
        runner = SinkRunner(sink, tmp_path, "inst", Registry(), stop).start()
        runners.append(runner)
        cursors = CursorStore(tmp_path)
        wait(lambda: cursors.status("s") is not None)  # a new sink starts after the alerts stored before it
        cursors.close()
        return runner

    def add(camera="a", name="x", presence=0.9):
        return alerts.add({"camera": camera, "capture_ts": time.time(), "published_ts": time.time(), "class": name,
                           "classes": {name: {"presence": presence}}})
    yield run, add, tmp_path
    stop.set()
    for runner in runners:
        runner.join(5)
    alerts.close()


def test_delivers_in_order_with_keys_and_sequence(world):
    run, add, _ = world
    sink = ScriptedSink(sink_config())
    runner = run(sink)
    ids = [add() for _ in range(20)]
    wait(lambda: len(sink.delivered) == 20)
    assert [d[0] for d in sink.delivered] == ids
    assert [d[1] for d in sink.delivered] == [f"inst:{i}" for i in ids]
    assert [d[2] for d in sink.delivered] == list(range(1, 21))
    assert runner.state == "ok" and runner.counts["delivered"] == 20


def test_retries_then_breaker_then_recovers_without_losing_or_reordering(world, caplog):
    run, add, _ = world
    caplog.set_level(logging.INFO, logger="iseg.sinks")
    sink = ScriptedSink(sink_config(), failing=True)
    runner = run(sink)
    ids = [add() for _ in range(5)]
    wait(lambda: runner.state == "down")
    attempts_when_open = len(sink.attempts)
    assert attempts_when_open == 3 and set(sink.attempts) == {ids[0]}, "only the oldest alert is tried"
    time.sleep(0.15)
    assert len(sink.attempts) == attempts_when_open, "an open breaker does not hammer the receiver"
    sink.failing = False
    wait(lambda: len(sink.delivered) == 5)
    assert [d[0] for d in sink.delivered] == ids
    assert runner.state == "ok" and runner.counts["failures"] >= 3 and runner.counts["retries"] >= 3
    lines = [r.getMessage() for r in caplog.records if r.name == "iseg.sinks.s"]
    assert sum("degraded" in line for line in lines) == 1 and sum(line.startswith("sink s down:") for line in lines) == 1, lines


def test_rejected_alerts_are_dead_lettered_and_the_rest_flow(world):
    run, add, state = world
    sink = ScriptedSink(sink_config(), reject={2, 4})
    runner = run(sink)
    for _ in range(5):
        add()
    wait(lambda: runner.cursor_id == 5)
    assert [d[0] for d in sink.delivered] == [1, 3, 5]
    store = CursorStore(state)
    assert [d["alert_id"] for d in store.dead_letters("s")] == [2, 4]
    assert runner.snapshot()["dead_letters"] == 2
    sink.reject.clear()
    store.rewind("s", 2)
    wait(lambda: len(sink.delivered) == 7)
    assert [d[0] for d in sink.delivered[3:]] == [2, 3, 4, 5], "resend goes from --from on, in order"
    wait(lambda: store.dead_letter_count("s") == 0)
    store.close()


def test_filters_skip_without_delivery(world):
    run, add, _ = world
    sink = ScriptedSink(sink_config(cameras=["a"], min_presence=0.5))
    runner = run(sink)
    ids = [add(camera="b"), add(presence=0.1), add(), add(camera="b")]
    wait(lambda: runner.cursor_id == ids[-1], show=lambda: f"ids {ids} runner {runner.snapshot()} {sink.attempts}")
    assert [d[0] for d in sink.delivered] == [ids[2]]


def test_a_connection_problem_means_down_and_no_attempts(world):
    run, add, _ = world
    sink = ScriptedSink(sink_config(), problem="broker refused the connection: Not authorized")
    runner = run(sink)
    add()
    wait(lambda: runner.state == "down")
    time.sleep(0.3)
    assert sink.attempts == [] and "Not authorized" in runner.last_error
    assert runner.lag_s >= 0.0
    sink._problem = None
    wait(lambda: len(sink.delivered) == 1)
