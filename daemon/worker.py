"""Detection worker: pulls frames from every camera, batches them, runs the engine and
pushes results to the publisher.

One worker per GPU; more may connect from other hosts over CurveZMQ. Each camera's
class set has its text embedding cached before the first frame, so the hot path is
VAE + one truncated UNet forward. A frame that fails is logged, counted and reported
to the publisher as failed (so it stays accounted for); it never kills the worker.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from daemon.config import DaemonConfig
from daemon.dispatch_client import DispatchClient, Route
from daemon.linestats import selftest
from daemon.linestats.overrides import OverrideWatcher, effective_thresholds
from daemon.messages import Boundary, Rejected, Rejections
from daemon.metrics import Registry
from daemon.model_setup import load_segmenter
from daemon.role import EX_CONFIG, Heartbeat, StopFlag
from daemon.security import connect_curve_client, stop_authenticators
from daemon.wire import array_header, now, send
from engine import InputError, ModelLoadError, SettingsError

IDLE_DRAIN_S = 0.3
DRAIN_MAX_S = 5.0


@dataclass
class PendingFrame:
    """A decoded frame waiting for its batch (`route`: where a dispatched frame's result goes)."""

    header: dict[str, Any]
    frame: np.ndarray
    route: Route | None = None


def connect_sockets(ctx: zmq.Context, config: DaemonConfig, remote: bool) -> tuple[zmq.Socket, zmq.Socket, list[str]]:
    """PULL from every camera, PUSH to the publisher; over Curve TCP when `remote`."""
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, config.sockets.frames_hwm)
    pull.setsockopt(zmq.MAXMSGSIZE, config.limits.max_image_pixels * 3 + 65536)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, config.sockets.results_hwm)
    push.setsockopt(zmq.SNDTIMEO, 5000)
    push.setsockopt(zmq.LINGER, 5000)
    endpoints = []
    if remote:
        settings = config.sockets.remote
        if settings is None:
            raise ValueError("--remote needs sockets.remote in the config")
        for camera in config.cameras:
            if camera.tcp_port is not None:
                endpoints.append(connect_curve_client(pull, config, camera.tcp_port))
        endpoints.append(connect_curve_client(push, config, settings.results_port))
    else:
        for camera in config.cameras:
            endpoint = config.endpoint("frames", camera.id)
            pull.connect(endpoint)
            endpoints.append(endpoint)
        push.connect(config.endpoint("results"))
        endpoints.append(config.endpoint("results"))
    return pull, push, endpoints


class Worker:
    """The batching loop, separate from process setup so calibration and benchmarks reuse it."""

    def __init__(self, config: DaemonConfig, name: str, segmenter: Any, class_sets: dict[str, Any],
                 metrics: Registry, heartbeat: Heartbeat | None, log: logging.Logger) -> None:
        self.config = config
        self.name = name
        self.segmenter = segmenter
        self.class_sets = class_sets
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.log = log
        self.boundary = Boundary.from_config(config)
        self.rejections = Rejections(metrics, name, log)
        self.thresholds: dict[str, dict[str, float]] = {}
        metrics.inc("iseg_worker_batches_total", 0, worker=name)
        for camera in config.cameras:
            for series in ("iseg_worker_frames_total", "iseg_worker_failed_frames_total",
                           "iseg_worker_unsent_results_total"):
                metrics.inc(series, 0, worker=name, camera=camera.id)
        for result in ("pass", "fail"):
            metrics.inc("iseg_worker_self_tests_total", 0, worker=name, result=result)
        self.client: DispatchClient | None = None
        self.watcher = OverrideWatcher(config.state_path)
        self.load_thresholds()
        self.golden = selftest.load_golden(config)
        self.next_self_test = time.monotonic()

    def load_thresholds(self) -> None:
        """Thresholds in force: live overrides from the state dir, else config, calibration, default."""
        for camera in self.config.cameras:
            chosen = effective_thresholds(self.config, camera)
            values = {name: value for name, (value, _) in chosen.items()}
            if values != self.thresholds.get(camera.id):
                self.thresholds[camera.id] = values
                self.log.info("camera %s thresholds: %s", camera.id,
                              ", ".join(f"{n}={v:.3f} ({src})" for n, (v, src) in chosen.items()))

    def self_test(self, push: zmq.Socket) -> None:
        """Run the golden images through the batch path when due and report the outcome to the publisher."""
        if self.golden is None or time.monotonic() < self.next_self_test:
            return
        self.next_self_test = time.monotonic() + self.config.health.self_test_s
        golden = self.golden
        header = {"camera": golden.camera, "seq": 0, "ts": now(), "session": "selftest", "roi": [0, 0]}
        outcomes = self.run_batch([PendingFrame(header, golden.defect), PendingFrame(dict(header), golden.good)])
        thresholds = self.thresholds[golden.camera]
        if any(result is None for _, result, _ in outcomes):
            passed, detail = False, "golden images failed to segment: " + outcomes[0][2] + outcomes[1][2]
        else:
            scores = [{n: float(s) for n, s in zip(result.classes, result.presence)} for _, result, _ in outcomes]
            passed, detail = selftest.judge(golden, scores[0], scores[1], thresholds)
        self.metrics.inc("iseg_worker_self_tests_total", worker=self.name, result="pass" if passed else "fail")
        (self.log.info if passed else self.log.error)("self-test %s: %s", "passed" if passed else "FAILED", detail)
        out = self.client.results_socket(self.client.last_route) if self.client is not None else push
        try:
            send(out, "selftest", selftest.message(self.name, golden, passed, detail),
                 flags=zmq.NOBLOCK if self.client is not None else 0)
        except zmq.Again:
            self.log.error("publisher not taking results; self-test outcome lost")

    def decode(self, frames: list[Any]) -> PendingFrame:
        """Check a raw frame message against its schema (Rejected when it fails; a dispatched one still
        gives its slot back)."""
        route = self.client.last_route if self.client is not None else None
        try:
            frame = self.boundary.frame(frames)
            if frame.camera not in self.class_sets:
                raise Rejected("camera", f"camera {frame.camera!r} has no class set in this worker")
            if self.client is not None:
                route = self.client.route()
        except Rejected:
            if self.client is not None:
                self.client.rejected(route)
            raise
        return PendingFrame(frame.header(), frame.image, route)

    def collect(self, pull: Any, stop: StopFlag, draining: bool) -> list[PendingFrame]:
        """Up to batch_size frames: wait for the first, then at most max_wait_ms for the rest."""
        batch: list[PendingFrame] = []
        deadline: float | None = None
        while len(batch) < self.config.worker.batch_size:
            if deadline is None:
                timeout_ms = IDLE_DRAIN_S * 1000 if draining else 200
            else:
                timeout_ms = max(0.0, (deadline - time.monotonic()) * 1000)
            if self.client is not None:
                self.client.beat()
            if not pull.poll(timeout_ms):
                if deadline is not None or draining or stop.stopping:
                    break
                if self.heartbeat:
                    self.heartbeat.progress()
                continue
            try:
                batch.append(self.decode(pull.recv_multipart(copy=False)))
            except Rejected as err:
                self.rejections.count("frames", err)
                continue
            if deadline is None:
                deadline = time.monotonic() + self.config.worker.max_wait_ms / 1000
        return batch

    def run_batch(self, batch: list[PendingFrame]) -> list[tuple[PendingFrame, Any, str]]:
        """Segment a batch; if it fails, frame by frame so one bad frame fails alone."""
        sets = [self.class_sets[p.header["camera"]] for p in batch]
        if self.heartbeat:
            self.heartbeat.busy(True)
        try:
            try:
                started = time.perf_counter()
                results = self.segmenter.segment([p.frame for p in batch], sets, keep_maps=False)
                self._count_batch(time.perf_counter() - started)
                return [(p, r, "") for p, r in zip(batch, results)]
            except Exception as err:  # noqa: BLE001 (a frame the engine cannot take fails alone, never the worker)
                if len(batch) == 1:
                    return [(batch[0], None, f"{type(err).__name__}: {err}")]
            outcomes = []
            for pending, class_set in zip(batch, sets):
                try:
                    started = time.perf_counter()
                    outcomes.append((pending, self.segmenter.segment([pending.frame], class_set, keep_maps=False)[0], ""))
                    self._count_batch(time.perf_counter() - started)
                except Exception as err:  # noqa: BLE001
                    outcomes.append((pending, None, f"{type(err).__name__}: {err}"))
            return outcomes
        finally:
            if self.heartbeat:
                self.heartbeat.busy(False)

    def _count_batch(self, seconds: float) -> None:
        self.metrics.inc("iseg_worker_batches_total", worker=self.name)
        self.metrics.observe("iseg_worker_batch_seconds", seconds, worker=self.name)

    def result_message(self, pending: PendingFrame, result: Any, error: str) -> tuple[dict[str, Any], list[Any]]:
        """Header and payloads of one result for the publisher."""
        header = {key: pending.header.get(key) for key in ("camera", "seq", "ts", "session", "roi")}
        header["worker"] = self.name
        if pending.route is not None:
            header["dispatch"] = {"session": pending.route.dispatcher, "seq": pending.route.admitted}
        header["model"] = self.segmenter.fingerprint
        header["done_ts"] = now()
        if result is None:
            header.update(ok=False, error=error)
            return header, []
        thresholds = self.thresholds[header["camera"]]
        presence = {name: float(score) for name, score in zip(result.classes, result.presence)}
        header.update(ok=True, classes=list(result.classes), presence=presence, thresholds=thresholds,
                      flagged=[name for name in result.classes if presence[name] > thresholds[name]],
                      infer_ms=float(result.timings_ms.get("total_ms", 0.0)),
                      frame=array_header(pending.frame), labels=array_header(result.labels))
        return header, [pending.frame, np.ascontiguousarray(result.labels, dtype=np.uint8)]

    def handle(self, batch: list[PendingFrame], push: Any) -> None:
        """Run one batch and send every frame's outcome (dispatched frames: to the publisher their route
        names, then `done` to their dispatchers, which keep them until the publisher acknowledges)."""
        for pending, result, error in self.run_batch(batch):
            camera = pending.header["camera"]
            if result is None:
                self.metrics.inc("iseg_worker_failed_frames_total", worker=self.name, camera=camera)
                self.log.warning("frame %s/%s failed: %s", camera, pending.header["seq"], error)
            else:
                self.metrics.inc("iseg_worker_frames_total", worker=self.name, camera=camera)
                self.metrics.observe("iseg_worker_inference_seconds", result.timings_ms.get("total_ms", 0.0) / 1000,
                                     camera=camera)
            header, payloads = self.result_message(pending, result, error)
            if self.client is not None:
                try:
                    send(self.client.results_socket(pending.route), "result", header, payloads, flags=zmq.NOBLOCK)
                except zmq.Again:
                    self.metrics.inc("iseg_worker_unsent_results_total", worker=self.name, camera=camera)
                    self.log.warning("publisher %s not taking results; frame %s/%s goes back to its dispatcher",
                                     pending.route.publisher if pending.route else "?", camera, pending.header["seq"])
                continue
            try:
                send(push, "result", header, payloads)
            except zmq.Again:
                self.metrics.inc("iseg_worker_unsent_results_total", worker=self.name, camera=camera)
                self.log.error("publisher not taking results; result %s/%s lost", camera, pending.header["seq"])
        if self.client is not None:
            self.client.done([p.route for p in batch if p.route is not None])

    def loop(self, pull: Any, push: Any, stop: StopFlag) -> None:
        """Until stopped; then drain what is already queued so no frame goes unaccounted
        (for at most DRAIN_MAX_S: a capture that is still running would never let us finish)."""
        drain_until: float | None = None
        while True:
            draining = stop.stopping
            if draining and drain_until is None:
                drain_until = time.monotonic() + DRAIN_MAX_S
            if self.watcher.changed():
                self.load_thresholds()
            if not draining:
                self.self_test(push)
            batch = self.collect(pull, stop, draining)
            if batch:
                self.handle(batch, push)
            if draining and (not batch or time.monotonic() > drain_until):
                return
            if self.heartbeat:
                self.heartbeat.progress()
            if self.client is not None:
                self.client.beat()


def run_worker(config: DaemonConfig, stop: StopFlag, name: str = "worker.0", remote: bool = False) -> int:
    """Worker process body; exit code 0 on a clean stop."""
    log = logging.getLogger(f"iseg.{name}")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "worker", name, metrics, stop).start()
    heartbeat.update(ready=False)
    pull = push = None
    try:
        try:
            segmenter, class_sets = load_segmenter(config, log)
            worker = Worker(config, name, segmenter, class_sets, metrics, heartbeat, log)
        except (ModelLoadError, SettingsError, InputError, selftest.SelfTestError) as err:
            log.critical("worker %s cannot start with this configuration: %s", name, err)
            return EX_CONFIG
        if config.dispatch.enabled:
            client = DispatchClient(ctx, config, name, remote, config.worker.batch_size, worker.rejections, log)
            worker.client = client
            pull = client
            push = client.results["primary"]
            endpoints = client.endpoints
        else:
            pull, push, endpoints = connect_sockets(ctx, config, remote)
        log.info("worker %s (pid %d) ready: batch %d, max wait %.0f ms, on %s", name, os.getpid(),
                 config.worker.batch_size, config.worker.max_wait_ms, ", ".join(endpoints))
        heartbeat.progress()  # loading took long; without this the first "ready" heartbeat looks like a stuck loop
        heartbeat.update(ready=True, backend=segmenter.backend_name, cuda_graphs=segmenter.cuda_graphs)
        if worker.client is not None:
            worker.client.start()
        worker.loop(pull, push, stop)
        log.info("worker %s stopped (%s)", name, stop.signal_name or "done")
    finally:
        heartbeat.stop()
        if isinstance(pull, DispatchClient):
            pull.close()
        else:
            for sock in (pull, push):
                if sock is not None:
                    sock.close()
        stop_authenticators()
        ctx.term()
    return 0
