"""Is each camera being inspected right now? Judged by frame results leaving the publisher.

The "vision OK" heartbeat must stop whenever inspection stops, whatever the cause:
camera stalled, capture dead, worker dead or hung, publisher dead. All of these end
the same way — no more `mask.<camera>` results on the publisher's PUB socket — so the
sinks role subscribes to those (small PNG label maps) and calls a camera inspected
while its last result is younger than a gap. This needs no trust in any role's own
report, works on a split host, and fails safe: if this process dies, nobody toggles.
The publisher's `stats` topic is kept for the MQTT stats message, and each `alert.`
message wakes the sink runners at once (they still read the alert itself from the store).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable

import zmq

from daemon.wire import WireError, recv


class InspectionMonitor:
    """Last result time per camera, from a SUB socket on the publisher (own thread)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.last_frame: dict[str, float] = {}
        self.publisher_stats: dict[str, Any] | None = None
        self.wakers: list[threading.Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inspection-monitor", daemon=True)

    def start(self) -> "InspectionMonitor":
        """Begin listening."""
        self._thread.start()
        return self

    def _run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100)
        sub.setsockopt(zmq.SUBSCRIBE, b"mask.")
        sub.setsockopt(zmq.SUBSCRIBE, b"stats")
        sub.setsockopt(zmq.SUBSCRIBE, b"alert.")
        sub.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if not sub.poll(100):
                    continue
                try:
                    message = recv(sub, zmq.NOBLOCK)
                except (WireError, zmq.Again):
                    continue
                if message.topic.startswith("mask."):
                    camera = str(message.header.get("camera", ""))
                    if message.topic == f"mask.{camera}":
                        self.last_frame[camera] = time.monotonic()
                elif message.topic == "stats":
                    self.publisher_stats = message.header
                elif message.topic.startswith("alert."):
                    for event in self.wakers:
                        event.set()
        finally:
            sub.close()

    def frame_age(self, camera: str) -> float | None:
        """Seconds since the camera's last published result (None: none seen yet)."""
        seen = self.last_frame.get(camera)
        return None if seen is None else time.monotonic() - seen

    def inspecting(self, cameras: Iterable[str], max_gap_s: float) -> bool:
        """True when every camera had a result within max_gap_s."""
        ages = [self.frame_age(c) for c in cameras]
        return bool(ages) and all(age is not None and age <= max_gap_s for age in ages)

    def stop(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(timeout=2.0)
