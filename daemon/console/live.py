"""The console's live state: the latest overlay per camera (conflated) and each camera's status.

The SUB socket is read as fast as messages come and only the newest overlay per camera
is kept; its receive queue is small, so when the console falls behind the publisher
drops messages *for the console only* and never waits. Browsers wait on `changed` and
always get the newest frame, so a slow browser skips frames and slows nobody else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from daemon.config import DaemonConfig
from daemon.metrics import Registry
from daemon.messages import Boundary, Picture, Rejected, Rejections

STATUSES = ("live", "stalled", "reconnecting", "offline")


@dataclass
class LiveFrame:
    """One camera's newest overlay as the console received it."""

    number: int
    camera: str
    seq: int
    capture_ts: float
    received_ts: float
    jpeg: bytes
    presence: dict[str, float]
    flagged: list[str]
    thresholds: dict[str, float]


@dataclass
class CameraState:
    """What the live wall shows for one camera besides its picture."""

    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    status: str = "offline"
    connected: bool | None = None
    dropped: float = 0.0
    captured_fps: float | None = None


class LiveFeed:
    """SUB reader plus camera status, driven by the console's event loop."""

    def __init__(self, config: DaemonConfig, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.frames: dict[str, LiveFrame] = {}
        self.masks: dict[str, bytes] = {}
        self.cameras = {c.id: CameraState() for c in config.cameras}
        self.changed = asyncio.Event()
        self.received = 0
        self.stats: dict[str, Any] = {}
        self.stats_error = ""
        self.ctx: zmq.asyncio.Context | None = None
        self.boundary = Boundary.from_config(config)
        self.rejections = Rejections(metrics, "console", log)

    # -- frames ----------------------------------------------------------------------------

    async def read_frames(self) -> None:
        """Receive overlays and label masks until cancelled, keeping the newest per camera."""
        self.ctx = zmq.asyncio.Context()
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 4 * max(1, len(self.config.cameras)))
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"overlay.")
        sub.setsockopt(zmq.SUBSCRIBE, b"mask.")
        sub.connect(self.config.endpoint("publish"))
        try:
            while True:
                frames = await sub.recv_multipart(copy=False)
                try:
                    self.accept(self.boundary.picture(frames))
                except Rejected as err:
                    self.rejections.count("publish", err)
        finally:
            sub.close()
            self.ctx.term()

    def accept(self, picture: Picture) -> None:
        """Keep one checked overlay (or mask) as its camera's newest and wake the waiting streams."""
        camera = picture.camera
        state = self.cameras[camera]
        if picture.kind == "mask":
            self.masks[camera] = picture.image
            return
        self.received += 1
        now = time.time()
        self.frames[camera] = LiveFrame(self.received, camera, picture.seq, picture.capture_ts, now, picture.image,
                                        picture.presence, list(picture.flagged), picture.thresholds)
        state.arrivals.append(now)
        self.metrics.inc("iseg_console_frames_received_total", camera=camera)
        waiting, self.changed = self.changed, asyncio.Event()
        waiting.set()

    async def next_frame(self, camera: str, after: int, timeout: float) -> LiveFrame | None:
        """The camera's newest frame once it is newer than `after`; None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frames.get(camera)
            if frame is not None and frame.number > after:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    # -- status ----------------------------------------------------------------------------

    def fps(self, camera: str) -> float:
        """Overlays per second over the last 10 s."""
        now = time.time()
        recent = [t for t in self.cameras[camera].arrivals if now - t <= 10.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def compute_status(self, camera: str, now: float) -> str:
        """live: frames at about the camera's rate; stalled: late; reconnecting: capture is reopening the
        source; offline: nothing for a long while (or ever)."""
        cfg = self.config.camera(camera)
        state = self.cameras[camera]
        frame = self.frames.get(camera)
        age = now - frame.received_ts if frame else None
        if state.connected is False:
            return "reconnecting"
        if age is None or age > max(30.0, cfg.stall_timeout_s * 3):
            return "offline"
        if age > max(5.0, 4.0 / cfg.fps):
            return "stalled"
        return "live"

    def update_status(self) -> list[dict[str, Any]]:
        """Recompute every camera's status; returns the changes."""
        now = time.time()
        changes = []
        for camera, state in self.cameras.items():
            status = self.compute_status(camera, now)
            if status != state.status:
                changes.append({"camera": camera, "old": state.status, "status": status, "ts": now})
                state.status = status
        return changes

    def describe(self, camera: str) -> dict[str, Any]:
        """The /api/cameras entry of one camera."""
        cfg = self.config.camera(camera)
        state = self.cameras[camera]
        frame = self.frames.get(camera)
        now = time.time()
        thresholds = {c: self.config.threshold(cfg, c) for c in cfg.classes}
        if frame is not None:
            thresholds.update(frame.thresholds)
        return {"id": camera, "status": state.status, "fps": round(self.fps(camera), 2),
                "camera_fps": state.captured_fps, "dropped": state.dropped,
                "last_frame_age_s": round(now - frame.received_ts, 2) if frame else None,
                "latency_s": round(frame.received_ts - frame.capture_ts, 3) if frame else None,
                "seq": frame.seq if frame else None, "classes": list(cfg.classes), "thresholds": thresholds,
                "presence": frame.presence if frame else {}, "flagged": frame.flagged if frame else []}

    # -- the supervisor's /stats -----------------------------------------------------------

    def stats_url(self) -> str:
        """Where the supervisor serves /stats."""
        return self.config.console.stats_url or f"http://{self.config.metrics.listen}/stats"

    def _fetch_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.stats_url(), timeout=2.0) as response:
            return json.loads(response.read())

    async def poll_stats(self, interval_s: float = 2.0) -> None:
        """Keep the supervisor's /stats (roles, restarts, per-camera drops) fresh; a split host without
        a reachable supervisor just shows less."""
        while True:
            try:
                self.stats = await asyncio.to_thread(self._fetch_stats)
                self.stats_error = ""
            except (OSError, ValueError) as err:
                if not self.stats_error:
                    self.log.info("supervisor stats not available at %s (%s); health shows the console only",
                                  self.stats_url(), err)
                self.stats_error = str(err)
                self.stats = {}
            for camera, state in self.cameras.items():
                cam = self.stats.get("cameras", {}).get(camera, {})
                role = self.stats.get("roles", {}).get(f"capture.{camera}", {})
                state.dropped = float(cam.get("dropped", 0))
                state.captured_fps = cam.get("fps")
                connected = role.get("state", {}).get("connected") if role.get("up") else None
                state.connected = connected if isinstance(connected, bool) else None
            await asyncio.sleep(interval_s)

