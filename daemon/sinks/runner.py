"""One thread per sink: read alerts after the cursor, filter, deliver in order, move the cursor.

A failed attempt is retried after an exponential backoff with jitter (so many daemons
do not hammer a receiver in step); after `breaker_failures` failures in a row the
circuit opens: the sink is `down` and only one probe goes out every `breaker_open_s`.
A sink reporting a connection problem (broker unreachable, login refused) is `down`
and not tried at all until it reconnects. State changes are logged once each, never
per attempt, so a dead receiver cannot flood the journal. Each sink has its own thread,
so a slow or dead receiver never holds up another sink or the pipeline.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from daemon.metrics import Registry
from daemon.sinks.delivery import DeliveryError, Rejected, Sink, SinkSetupError
from daemon.sinks.outbox import AlertSource, Cursor, CursorStore

STATES = ("ok", "degraded", "down")
POLL_S = 0.05
"""Idle re-read of the local alert store (a published alert wakes the runner sooner)."""
REPLAY_POLL_S = 1.0
"""Idle re-ask of the publisher's replay socket: rare, so its loop can go idle and stop when asked."""
BATCH = 100


def backoff_s(failures: int, initial_s: float, max_s: float, rng: random.Random = random.Random()) -> float:
    """Delay before the next attempt after `failures` failures in a row: doubling, capped, half-jittered."""
    delay = min(max_s, initial_s * 2 ** max(0, failures - 1))
    return delay * (0.5 + 0.5 * rng.random())


class SinkRunner:
    """Delivers one sink's alerts; `snapshot()` is read by the role for heartbeats and /stats."""

    def __init__(self, sink: Sink, state_path: Path, instance: str, metrics: Registry, stop: threading.Event,
                 ctx: zmq.Context | None = None, replay_endpoint: str | None = None) -> None:
        self.sink = sink
        self.config = sink.config
        self.name = sink.name
        self.state_path = state_path
        self.ctx = ctx
        self.replay_endpoint = replay_endpoint
        self.instance = instance
        self.metrics = metrics
        self.stop = stop
        self.log = logging.getLogger(f"iseg.sinks.{self.name}")
        self.state = "starting"
        self.last_error = ""
        self.lag_s = 0.0
        self.cursor_id = 0
        self.dead_letters = 0
        self.failures_in_row = 0
        self.next_attempt = 0.0
        self.breaker_until = 0.0
        self.counts = {"delivered": 0, "retries": 0, "failures": 0}
        self.failed: BaseException | None = None
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"sink-{self.name}", daemon=True)
        self._publish_state("down")
        for counter in ("iseg_sink_delivered_total", "iseg_sink_retries_total", "iseg_sink_failures_total"):
            metrics.inc(counter, 0, sink=self.name)
        metrics.set("iseg_sink_lag_seconds", 0, sink=self.name)

    # -- state -------------------------------------------------------------------------------

    def _publish_state(self, state: str) -> None:
        for name in STATES:
            self.metrics.set("iseg_sink_state", 1 if name == state else 0, sink=self.name, state=name)

    def _set_state(self, state: str, error: str, store: CursorStore | None) -> None:
        if error:
            self.last_error = error
        if state == self.state:
            return
        previous, self.state = self.state, state
        self._publish_state(state)
        if state == "ok":
            if previous == "starting":
                self.log.info("sink %s ready: %s", self.name, self.sink.describe())
            else:
                self.log.info("sink %s ok again: delivering to %s", self.name, self.sink.describe())
        elif state == "degraded":
            self.log.warning("sink %s degraded: %s; retrying with backoff (up to %gs)", self.name, error,
                             self.config.retry_max_s)
        elif state == "down":
            retry = (f"probing again every {self.config.breaker_open_s:g}s" if self.breaker_until
                     else "reconnecting in the background")
            self.log.error("sink %s down: %s; alerts wait in the store, %s", self.name, error, retry)
        if store is not None:
            store.record_state(self.name, state, self.last_error)

    def snapshot(self) -> dict[str, Any]:
        """State, counters of this process, lag, cursor and dead letters (JSON-safe)."""
        return {"state": "down" if self.state == "starting" else self.state, "last_error": self.last_error,
                "lag_seconds": round(self.lag_s, 3), "cursor": self.cursor_id, "dead_letters": self.dead_letters,
                **self.counts}

    @property
    def alive(self) -> bool:
        """False once the thread ended without being asked to stop."""
        return self.thread.is_alive() or self.stop.is_set()

    # -- main loop ---------------------------------------------------------------------------

    def start(self) -> "SinkRunner":
        """Start the thread."""
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        """Wait for the thread to end."""
        self.thread.join(timeout)

    def _main(self) -> None:
        store = CursorStore(self.state_path)
        reader = AlertSource(self.state_path, self.ctx, self.replay_endpoint)
        try:
            self._start_sink(store)
            if not self.stop.is_set():
                self._loop(store, reader)
        except BaseException as err:  # noqa: BLE001 — reported to the role, which exits and is restarted
            self.failed = err
            self.log.exception("sink %s stopped on an unexpected error", self.name)
        finally:
            try:
                self.sink.close()
            finally:
                reader.close()
                store.close()

    def _start_sink(self, store: CursorStore) -> None:
        while not self.stop.is_set():
            try:
                self.sink.start()
                return
            except SinkSetupError as err:
                self._set_state("down", str(err), store)
                self.stop.wait(self.config.breaker_open_s)

    def _loop(self, store: CursorStore, reader: AlertSource) -> None:
        known = store.status(self.name) is not None
        start_at = reader.last_id()
        while not known and reader.error and not self.stop.is_set():
            self._set_state("down", reader.error, None)  # a new sink starts after the store's last alert: ask again
            self.stop.wait(1.0)
            start_at = reader.last_id()
        cursor = store.cursor(self.name, start_at=start_at)
        if known:
            self.log.info("sink %s resumes after alert %d", self.name, cursor.alert_id)
        elif cursor.alert_id:
            self.log.info("sink %s is new: it starts after alert %d (iseg sinks resend --from ID sends older ones)",
                          self.name, cursor.alert_id)
        self.cursor_id = cursor.alert_id
        self.dead_letters = store.dead_letter_count(self.name)
        self.metrics.set("iseg_sink_dead_letters", self.dead_letters, sink=self.name)
        while not self.stop.is_set():
            if store.generation(self.name) != cursor.generation:
                cursor = store.cursor(self.name)
                self.cursor_id = cursor.alert_id
                self.log.info("sink %s rewound: resending from alert %d", self.name, cursor.alert_id + 1)
            problem = self.sink.problem()
            if problem:
                self._update_lag(reader.after(cursor.alert_id, 1))
                self._set_state("down", problem, store)
                self.stop.wait(REPLAY_POLL_S if reader.remote_now else 0.2)
                continue
            wait = max(self.next_attempt, self.breaker_until) - time.monotonic()
            if wait > 0:
                self.stop.wait(min(wait, 0.2))
                continue
            batch = reader.after(cursor.alert_id, BATCH)
            self._update_lag(batch)
            if not batch and reader.error:
                self._set_state("down", reader.error, store)
                self.stop.wait(1.0)
                continue
            if not batch:
                if self.failures_in_row == 0:
                    self._set_state("ok", "", store)
                self.wake.wait(REPLAY_POLL_S if reader.remote_now else POLL_S)
                self.wake.clear()
                continue
            self._run_batch(batch, cursor, store)

    def _run_batch(self, batch: list[dict[str, Any]], cursor: Cursor, store: CursorStore) -> None:
        skipped_to = 0
        for i, alert in enumerate(batch):
            if self.stop.is_set():
                break
            if not self.config.accepts(alert):
                skipped_to = alert["id"]
                continue
            if skipped_to and not store.advance(self.name, cursor, skipped_to):
                return
            skipped_to = 0
            outcome = self._attempt(alert, cursor.delivered + 1, store)
            if outcome == "retry":
                return
            moved = store.advance(self.name, cursor, alert["id"], delivered=outcome == "delivered",
                                  dead_error=self.last_error if outcome == "dead" else None)
            if not moved:
                return
            if outcome == "dead":
                self.dead_letters += 1
            elif self.dead_letters:
                self.dead_letters = store.dead_letter_count(self.name)
            self.metrics.set("iseg_sink_dead_letters", self.dead_letters, sink=self.name)
            self.cursor_id = cursor.alert_id
            self._update_lag(batch[i + 1:])
        if skipped_to and store.advance(self.name, cursor, skipped_to):
            self.cursor_id = cursor.alert_id

    def _attempt(self, alert: dict[str, Any], seq: int, store: CursorStore) -> str:
        """'delivered', 'dead' (rejected for good) or 'retry'."""
        if self.failures_in_row:
            self.counts["retries"] += 1
            self.metrics.inc("iseg_sink_retries_total", sink=self.name)
        try:
            self.sink.deliver(alert, f"{self.instance}:{alert['id']}", seq)
        except Rejected as err:
            self._count_failure()
            self.last_error = f"alert {alert['id']} rejected: {err}"
            self.log.warning("sink %s dead-lettered alert %d: %s (iseg sinks resend --sink %s --from %d re-sends it)",
                             self.name, alert["id"], err, self.name, alert["id"])
            self.failures_in_row = 0
            store.record_state(self.name, self.state, self.last_error)
            return "dead"
        except DeliveryError as err:
            self._fail(str(err), store)
            return "retry"
        except Exception as err:  # noqa: BLE001 — a receiver library's surprise is one more failed attempt
            self._fail(f"{type(err).__name__}: {err}", store)
            return "retry"
        self.counts["delivered"] += 1
        self.metrics.inc("iseg_sink_delivered_total", sink=self.name)
        self.failures_in_row = 0
        self.next_attempt = self.breaker_until = 0.0
        self._set_state("ok", "", store)
        return "delivered"

    def _count_failure(self) -> None:
        self.counts["failures"] += 1
        self.metrics.inc("iseg_sink_failures_total", sink=self.name)

    def _fail(self, error: str, store: CursorStore) -> None:
        self._count_failure()
        self.failures_in_row += 1
        now = time.monotonic()
        if self.failures_in_row >= self.config.breaker_failures:
            self.breaker_until = now + self.config.breaker_open_s
            self._set_state("down", error, store)
        else:
            self.next_attempt = now + backoff_s(self.failures_in_row, self.config.retry_initial_s, self.config.retry_max_s)
            self._set_state("degraded", error, store)
        store.record_state(self.name, self.state, self.last_error)

    def _update_lag(self, pending: list[dict[str, Any]]) -> None:
        if pending:
            first = pending[0]
            stored = float(first.get("published_ts") or first.get("capture_ts") or time.time())
            self.lag_s = max(0.0, time.time() - stored)
        else:
            self.lag_s = 0.0
        self.metrics.set("iseg_sink_lag_seconds", self.lag_s, sink=self.name)
