"""The publisher's line-statistics hook: every published frame goes to the summary store (queued,
written by a thread) and to the health checks; self-test outcomes arrive from workers; `tick`
publishes `health.<camera>` at start, on every change and every `health.interval_s`, and turns
state changes into stored, replayable alerts of kind `health`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import numpy as np

from daemon.calibration import health_baselines
from daemon.config import DaemonConfig
from daemon.linestats.health import STATES, HealthMonitor
from daemon.linestats.store import STORE_NAME, FrameSummary, SummaryWriter
from daemon.messages import SelfTest
from daemon.metrics import Registry

TICK_S = 0.5
HEALTH_FILE = "health.json"
MAX_DETAIL_CHARS = 500


class LineTap:
    """Summary writer + health monitor, fed from the publisher's loop."""

    def __init__(self, config: DaemonConfig, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.writer = None
        if config.stats.enabled:
            self.writer = SummaryWriter(config.state_path / STORE_NAME, config.stats.flush_s,
                                        config.stats.retention_days, config.stats.queue_max, log).start()
        self.cameras = [c.id for c in config.cameras]
        self.monitor = HealthMonitor(config.health, self.cameras, health_baselines(config))
        self.served: dict[str, set[str]] = {}
        self.next_tick = 0.0
        self.next_periodic = 0.0
        metrics.inc("iseg_publisher_linestats_dropped_frames_total", 0)
        for camera in self.cameras:
            self._gauge(camera, "ok")

    def observe(self, camera: str, ts: float, presence: dict[str, float], flagged: list[str],
                area_frac: dict[str, float], alerts: list[str], frame: np.ndarray, worker: str | None) -> None:
        """One published frame."""
        if self.writer is not None and not self.writer.add(
                FrameSummary(camera, ts, dict(presence), tuple(flagged), area_frac, tuple(alerts))):
            self.metrics.inc("iseg_publisher_linestats_dropped_frames_total")
        self.monitor.observe(camera, ts, frame, presence)
        if worker:
            self.served.setdefault(worker, set()).add(camera)

    def self_test(self, outcome: SelfTest) -> None:
        """A worker's checked `selftest` message: the verdict applies to every camera that worker serves."""
        cameras = self.served.get(outcome.worker, set()) | {outcome.camera}
        passed = outcome.ok
        detail = f"self-test of {outcome.worker}: {outcome.detail[:MAX_DETAIL_CHARS]}"
        self.monitor.self_test(sorted(cameras), passed, detail)

    def tick(self, publish: Callable[[str, dict[str, Any]], None], store_alert: Callable[[dict[str, Any]], int],
             now: float | None = None) -> None:
        """Apply held health conditions; publish changes (as health alerts, stored first) and the periodic states."""
        now = time.time() if now is None else now
        if now < self.next_tick:
            return
        self.next_tick = now + TICK_S
        changed = set()
        for camera, old, new, reason in self.monitor.tick(now):
            changed.add(camera)
            self._gauge(camera, new)
            alert = {"kind": "health", "camera": camera, "capture_ts": now, "published_ts": now, "state": new,
                     "previous": old, "reason": reason or "recovered", "recovered": new == "ok",
                     "message": f"{camera}: recovered (was {old})" if new == "ok" else f"{camera}: {new} - {reason}"}
            store_alert(alert)
            (self.log.info if new == "ok" else self.log.warning)("HEALTH %s: %s -> %s (%s)", camera, old, new,
                                                                 reason or "recovered")
            publish(f"health.{camera}", {**self.monitor.snapshot(camera), "alert": alert})
        periodic = now >= self.next_periodic
        if periodic:
            self.next_periodic = now + self.config.health.interval_s
        for camera in self.cameras:
            if periodic and camera not in changed:
                publish(f"health.{camera}", self.monitor.snapshot(camera))
        if periodic or changed:
            self._write_report(now)

    def _write_report(self, now: float) -> None:
        """health.json in the state dir: what `GET /api/health` and `iseg stats` show without a socket."""
        path = self.config.state_path / HEALTH_FILE
        report = {"ts": now, "interval_s": self.config.health.interval_s,
                  "cameras": {c: self.monitor.snapshot(c) for c in self.cameras}}
        try:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(report))
            os.replace(tmp, path)
        except OSError as err:
            self.log.warning("cannot write %s: %s", path, err)

    def _gauge(self, camera: str, current: str) -> None:
        for state in STATES:
            self.metrics.set("iseg_camera_health_state", 1 if state == current else 0, camera=camera, state=state)

    def close(self) -> None:
        """Write what is queued."""
        if self.writer is not None:
            self.writer.close()
