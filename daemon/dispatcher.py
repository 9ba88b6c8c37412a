"""Dispatcher role: one per capture host, between the cameras and the workers.

Captures push frames to it over local ipc (`sockets.intake`). Workers connect to its ROUTER
(`sockets.dispatch` locally, `dispatch.port` with CurveZMQ from other hosts) as DEALERs and ask
for work with credits (free batch slots); they heartbeat from their inference loop, so a frozen
loop falls silent. Publishers connect to the same ROUTER: the leading one heartbeats with its
epoch (a fencing number) and acknowledges each frame once its result is stored; a publisher with
an older epoch is answered `fenced`. A frame stays here until acknowledged; the frames of a worker
silent for `dispatch.worker_timeout_ms` go to the other workers, newest first, or are recorded as
lost with the reason (log line, `lost-frames.jsonl` in the state dir, counters) when older than
`dispatch.max_frame_age_ms`. See daemon/dispatch_core.py for the accounting rules.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Any, Callable

import zmq

from daemon.config import DaemonConfig
from daemon.dispatch_core import LOST_REASONS, DispatchCore, FlightFrame, Lost
from daemon.messages import Boundary, Rejected, Rejections, control
from daemon.metrics import Registry
from daemon.role import Heartbeat, StopFlag
from daemon.security import bind_curve_server, stop_authenticators
from daemon.wire import encode_header

INTAKE_BURST = 64
FROM_PEERS = ("hello", "beat", "credit", "done", "leader", "watch", "ack", "stats")
COUNTERS = {"captured": "iseg_dispatch_captured_frames_total", "dropped": "iseg_dispatch_dropped_frames_total",
            "published": "iseg_dispatch_published_frames_total", "resent": "iseg_dispatch_resent_frames_total"}


class LostRecord:
    """Appends one JSON line per lost frame to the state dir: the per-frame record an audit can read."""

    def __init__(self, config: DaemonConfig, log: logging.Logger) -> None:
        self.path = config.state_path / "lost-frames.jsonl"
        self.log = log

    def write(self, lost: list[Lost], instance: str) -> None:
        """Log and record each lost frame; a full disk still leaves the log line and the counter."""
        if not lost:
            return
        lines = []
        for item in lost:
            camera, session, seq = item.key
            self.log.warning("frame %s/%s (session %s) LOST: %s, %.1fs after capture, sent %d time(s)",
                             camera, seq, session, item.reason, item.age_s, item.sends)
            lines.append(json.dumps({"ts": time.time(), "camera": camera, "session": session, "seq": seq,
                                     "reason": item.reason, "age_s": round(item.age_s, 3), "sends": item.sends,
                                     "dispatcher": instance}))
        try:
            with open(self.path, "a") as out:
                out.write("\n".join(lines) + "\n")
        except OSError as err:
            self.log.error("cannot record lost frames in %s: %s", self.path, err)


class Dispatcher:
    """The socket side of DispatchCore: reads intake and peers, sends frames and replies."""

    def __init__(self, config: DaemonConfig, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.settings = config.dispatch
        self.metrics = metrics
        self.log = log
        self.instance = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self.boundary = Boundary.from_config(config)
        self.rejections = Rejections(metrics, "dispatch", log)
        self.core = DispatchCore([c.id for c in config.cameras], self.settings.worker_timeout_ms / 1000,
                                 self.settings.max_frame_age_ms / 1000, self.settings.ack_timeout_ms / 1000,
                                 self.settings.queue_frames, wall=time.time)
        self.record = LostRecord(config, log)
        self.router: zmq.Socket | None = None
        self.next_beat = 0.0
        for camera in config.cameras:
            for name in COUNTERS.values():
                metrics.inc(name, 0, camera=camera.id)
            for reason in LOST_REASONS:
                metrics.inc("iseg_dispatch_lost_frames_total", 0, camera=camera.id, reason=reason)
            metrics.set("iseg_dispatch_in_flight_frames", 0, camera=camera.id)
        metrics.inc("iseg_dispatch_workers_lost_total", 0)
        metrics.set("iseg_dispatch_workers", 0)
        metrics.set("iseg_dispatch_leader_epoch", 0)

    # -- inputs ------------------------------------------------------------------------------------

    def take_frame(self, frames: list[Any]) -> None:
        """One frame from a local capture, checked against its schema; kept as [topic, its checked header
        fields, pixels], so each send only adds the route."""
        frame = self.boundary.frame(frames)
        header = {**frame.header(), "shape": list(frame.image.shape), "dtype": "uint8"}
        self.core.intake(frame.camera, frame.session, frame.seq, frame.ts, [frames[0], header, frames[2]])

    def read(self, sock: zmq.Socket, name: str, take: Callable[[list[Any]], None]) -> None:
        """Take up to INTAKE_BURST queued messages from a socket; a message that fails its schema is
        counted under the socket's name and skipped."""
        for _ in range(INTAKE_BURST):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                take(frames)
            except Rejected as err:
                self.rejections.count(name, err)

    def take_peer(self, frames: list[Any], now: float) -> None:
        """One control message from a worker, a publisher or a local tool."""
        if len(frames) < 2:
            raise Rejected("parts", "a peer message needs an identity and a topic")
        peer, body = bytes(frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0]), frames[1:]
        topic, h = control(body, self.boundary, FROM_PEERS)
        core = self.core
        if topic == "hello":
            if core.worker_hello(peer, h["worker"], h["credits"], now):
                self.log.info("worker %s joined with %d free slot(s)", h["worker"], h["credits"])
        elif topic == "beat":
            if not core.worker_beat(peer, now):
                self.reply(peer, "who", {})
        elif topic == "credit":
            if not core.worker_credit(peer, h["n"], now):
                self.reply(peer, "who", {})
        elif topic == "done":
            core.worker_done(peer, h["frames"], now)
            if h["credit"] and not core.worker_credit(peer, h["credit"], now):
                self.reply(peer, "who", {})
        elif topic == "leader":
            before = core.leader
            accepted, epoch, requeued = core.leader_beat(peer, h["publisher"], h["epoch"], h["instance"], now)
            if not accepted:
                self.reply(peer, "fenced", self.status_body(now))
                self.log.warning("fenced publisher %s: epoch %d is older than epoch %d in force",
                                 h["publisher"], h["epoch"], epoch)
                return
            if before is None or before.route != core.leader.route:
                self.log.info("publisher %s leads (epoch %d, %s)%s", h["publisher"], epoch, h["instance"],
                              f"; {len(requeued)} unacknowledged frame(s) re-sent to it" if requeued else "")
            self.reply(peer, "lease", self.status_body(now))
        elif topic == "watch":
            self.reply(peer, "status", self.status_body(now))
        elif topic == "ack":
            core.ack(h["frames"], h["epoch"])
        elif topic == "stats":
            self.reply(peer, "stats", {"instance": self.instance, "cameras": core.accounting(),
                                       "workers": sorted(s.name for s in core.workers.values()),
                                       "worker_slots": {s.name: {"credits": s.credits, "holding": len(s.holding),
                                                                 "heard_ms_ago": round((now - s.heard_at) * 1000)}
                                                        for s in core.workers.values()},
                                       **self.status_body(now)})

    def status_body(self, now: float) -> dict[str, Any]:
        """What publishers learn from a dispatcher: the epoch in force, its leader and how long ago it spoke."""
        leader = self.core.leader
        age = self.core.leader_age(now)
        return {"epoch": leader.epoch if leader else 0, "instance": self.instance,
                "leader": leader.name if leader else "", "leader_age_ms": None if age is None else age * 1000}

    # -- outputs -----------------------------------------------------------------------------------

    def reply(self, peer: bytes, topic: str, body: dict[str, Any]) -> None:
        """A control message to one peer; a peer that is gone is simply skipped."""
        assert self.router is not None
        try:
            self.router.send_multipart([peer, topic.encode(), encode_header(body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def send_frame(self, peer: bytes, frame: FlightFrame) -> bool:
        """Hand a frame to a worker, tagged with its route (the publisher its result must go to)."""
        assert self.router is not None and frame.route is not None
        topic, checked, pixels = frame.parts
        header = {**checked, "route": {"publisher": frame.route[0], "epoch": frame.route[1], "instance": frame.route[2],
                                       "dispatcher": self.instance, "admitted": frame.admit_seq}}
        try:
            self.router.send_multipart([peer, topic, encode_header(header), pixels], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:
            return False

    def pump(self, now: float) -> None:
        """Send every frame that has a free worker slot; a send that fails gives the frame back."""
        for peer, frame in self.core.assign(now):
            if not self.send_frame(peer, frame):
                name = self.core.worker_unreachable(peer, frame)
                self.log.warning("worker %s unreachable; its frames go to the others", name or "?")

    def housekeeping(self, now: float, heartbeat: Heartbeat) -> None:
        """Heartbeats to workers, timeouts, lost frames, metrics and this role's state for the supervisor
        (every dispatch.heartbeat_ms)."""
        if now < self.next_beat:
            return
        self.next_beat = now + self.settings.heartbeat_ms / 1000
        for peer in list(self.core.workers):
            self.reply(peer, "dbeat", {"instance": self.instance})
        gone, lost = self.core.tick(now)
        for name in gone:
            self.metrics.inc("iseg_dispatch_workers_lost_total")
            self.log.warning("worker %s lost: no heartbeat for %.0f ms; its frames go to the other workers",
                             name, self.settings.worker_timeout_ms)
        self.record.write(lost, self.instance)
        self.export()
        leader = self.core.leader
        heartbeat.update(workers=len(self.core.workers), in_flight=len(self.core.frames),
                         leader=leader.name if leader else "", epoch=leader.epoch if leader else 0)

    def export(self) -> None:
        """Counters to the metrics registry (one process, one snapshot: the accounting adds up in it)."""
        for camera, flow in self.core.accounting().items():
            for key, name in COUNTERS.items():
                delta = flow[key] - self.metrics.counter(name, camera=camera)
                if delta:
                    self.metrics.inc(name, delta, camera=camera)
            for reason, count in flow["lost_reasons"].items():
                delta = count - self.metrics.counter("iseg_dispatch_lost_frames_total", camera=camera, reason=reason)
                if delta:
                    self.metrics.inc("iseg_dispatch_lost_frames_total", delta, camera=camera, reason=reason)
            self.metrics.set("iseg_dispatch_in_flight_frames", flow["in_flight"], camera=camera)
        self.metrics.set("iseg_dispatch_workers", len(self.core.workers))
        self.metrics.set("iseg_dispatch_leader_epoch", self.core.leader.epoch if self.core.leader else 0)

    def admitted_in_flight(self) -> int:
        """Frames handed to a worker and not yet acknowledged."""
        return sum(1 for frame in self.core.frames.values() if frame.admitted)


def bind_dispatch_sockets(ctx: zmq.Context, config: DaemonConfig) -> tuple[zmq.Socket, zmq.Socket, list[str]]:
    """Intake PULL (local captures) and the ROUTER (workers, publishers; Curve TCP when dispatch.port is set)."""
    config.run_path.mkdir(parents=True, exist_ok=True)
    intake = ctx.socket(zmq.PULL)
    intake.setsockopt(zmq.RCVHWM, max(4, config.sockets.frames_hwm))
    intake.setsockopt(zmq.MAXMSGSIZE, config.limits.max_image_pixels * 3 + 65536)
    intake.bind(config.endpoint("intake"))
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(config.endpoint("dispatch"))
    endpoints = [config.endpoint("intake"), config.endpoint("dispatch")]
    if config.dispatch.port is not None:
        endpoints.append(bind_curve_server(ctx, router, config, config.dispatch.port))
    return intake, router, endpoints


def run_dispatcher(config: DaemonConfig, stop: StopFlag) -> int:
    """Dispatcher process body. On stop it takes no more frames, waits up to dispatch.drain_s for the
    frames in flight to be acknowledged, and records what is left as lost (reason shutdown)."""
    log = logging.getLogger("iseg.dispatch")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "dispatch", "dispatch", metrics, stop).start()
    intake, router, endpoints = bind_dispatch_sockets(ctx, config)
    dispatcher = Dispatcher(config, metrics, log)
    dispatcher.router = router
    log.info("dispatching frames on %s (dispatcher %s)", ", ".join(endpoints), dispatcher.instance)
    heartbeat.update(ready=True, instance=dispatcher.instance)
    poller = zmq.Poller()
    poller.register(intake, zmq.POLLIN)
    poller.register(router, zmq.POLLIN)
    drain_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            if stop.stopping and drain_until is None:
                drain_until = now + config.dispatch.drain_s
                poller.unregister(intake)
                log.info("stopping: waiting up to %.1fs for %d frame(s) in flight", config.dispatch.drain_s,
                         dispatcher.admitted_in_flight())
            if drain_until is not None and (now > drain_until or not dispatcher.admitted_in_flight()):
                break
            events = dict(poller.poll(50))
            now = time.monotonic()
            if intake in events:
                dispatcher.read(intake, "intake", dispatcher.take_frame)
            if router in events:
                dispatcher.read(router, "dispatch", lambda frames: dispatcher.take_peer(frames, now))
            dispatcher.pump(now)
            dispatcher.housekeeping(now, heartbeat)
            heartbeat.progress()
        dispatcher.record.write(dispatcher.core.shutdown(), dispatcher.instance)
        dispatcher.export()
        log.info("dispatcher stopped (%s)", stop.signal_name or "done")
    finally:
        heartbeat.stop()
        intake.close(0)
        router.close(0)
        stop_authenticators()
        ctx.term()
    return 0
