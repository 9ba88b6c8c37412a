"""Publisher role: takes worker results, renders overlays and masks, debounces alerts,
persists them, and publishes everything on one PUB socket.

Topics: `overlay.<camera>` (JPEG), `mask.<camera>` (PNG of labels 0..K),
`alert.<camera>` (JSON only), `flagged.<camera>` (for the recorder: raw frame, mask
PNG, overlay JPEG) and `stats`. PUB never waits for a subscriber, so a client that
reads nothing cannot slow the line; alerts it missed come back from the replay socket.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import zmq

from daemon.alerts import AlertStore, Debouncer
from daemon.config import DaemonConfig
from daemon.linestats.tap import LineTap
from daemon.metrics import Registry
from daemon.render import encode_jpeg, encode_png, overlay_rgb, regions
from daemon.role import Heartbeat, StopFlag
from daemon.security import bind_curve_server, stop_authenticators
from daemon.wire import Message, WireError, array_from, encode_header, now, recv, send

IDLE_DRAIN_S = 0.3
STATS_INTERVAL_S = 1.0


class SequenceTracker:
    """Counts frames the publisher never saw, from each camera session's sequence numbers."""

    def __init__(self) -> None:
        self.sessions: dict[str, str] = {}
        self.max_seq: dict[str, int] = {}

    def gaps(self, camera: str, session: str, seq: int) -> int:
        """Change in the gap count caused by this frame (negative when it fills an earlier gap)."""
        if self.sessions.get(camera) != session:
            self.sessions[camera] = session
            self.max_seq[camera] = seq
            return seq
        top = self.max_seq[camera]
        if seq > top:
            self.max_seq[camera] = seq
            return seq - top - 1
        return -1


class Publisher:
    """The result → topics logic, apart from process setup."""

    def __init__(self, config: DaemonConfig, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.store = AlertStore(config.state_path / "alerts.sqlite3")
        self.debouncer = Debouncer(config.alerts.k, config.alerts.n, config.alerts.cooldown_s)
        self.tracker = SequenceTracker()
        self.published = 0
        self.first_frame_at: float | None = None
        self.latency: dict[str, list[float]] = {}
        self.session = f"{time.time():.6f}"
        self.flag_seq: dict[str, int] = {}
        self.tap = LineTap(config, metrics, log)

    def handle(self, message: Message, pub: zmq.Socket) -> None:
        """One worker result → overlay, mask, maybe alert and flagged-frame messages."""
        h = message.header
        camera, seq = str(h["camera"]), int(h["seq"])
        labels_c = {"camera": camera}
        self.metrics.inc("iseg_publisher_gap_frames_total", self.tracker.gaps(camera, str(h.get("session")), seq), **labels_c)
        if not h.get("ok"):
            self.metrics.inc("iseg_publisher_failed_frames_total", **labels_c)
            return
        frame = array_from(message.payloads[0], h["frame"]["shape"], h["frame"]["dtype"])
        labels = array_from(message.payloads[1], h["labels"]["shape"], h["labels"]["dtype"])
        if labels.shape != frame.shape[:2]:
            raise WireError(f"labels {labels.shape} do not match frame {frame.shape}")
        classes, flagged, presence = list(h["classes"]), list(h["flagged"]), dict(h["presence"])
        roi = list(h.get("roi") or [0, 0])
        alerts_cfg = self.config.alerts
        info = regions(labels, classes, roi, alerts_cfg.min_area_px, alerts_cfg.max_boxes)
        overlay = encode_jpeg(overlay_rgb(frame, labels, classes, flagged, presence, info, roi),
                              self.config.recorder.jpeg_quality)
        mask_png = encode_png(labels)
        published_ts = now()
        latency_ms = (published_ts - float(h["ts"])) * 1000
        base = {"camera": camera, "seq": seq, "capture_ts": h["ts"], "published_ts": published_ts,
                "latency_ms": latency_ms, "worker": h.get("worker"), "infer_ms": h.get("infer_ms")}
        alert_ids = []
        firing = self.debouncer.update(camera, classes, flagged, float(h["ts"]))
        self.tap.observe(camera, float(h["ts"]), presence, flagged, {c: info[c]["area_frac"] for c in classes}, firing,
                         frame, h.get("worker"))
        for name in firing:
            alert = {**base, "kind": "defect", "class": name, "classes": {
                c: {"presence": presence[c], "threshold": h["thresholds"][c], **info[c]} for c in flagged},
                "frame_shape": list(frame.shape), "roi": roi}
            self.store.add(alert)
            alert_ids.append(alert["id"])
            send(pub, f"alert.{camera}", alert)
            self.metrics.inc("iseg_alerts_total", camera=camera, **{"class": name})
            self.log.info("ALERT %d camera %s class %s presence %.3f > %.3f (frame %d, %.0f ms after capture)",
                          alert["id"], camera, name, presence[name], h["thresholds"][name], seq, latency_ms)
        common = {**base, "flagged": flagged, "presence": presence}
        send(pub, f"overlay.{camera}", {**common, "format": "jpeg"}, [overlay])
        send(pub, f"mask.{camera}", {**common, "format": "png", "classes": classes}, [mask_png])
        if flagged:
            self.metrics.inc("iseg_flagged_frames_total", **labels_c)
            self.flag_seq[camera] = self.flag_seq.get(camera, 0) + 1
            meta = {**common, "classes": classes, "flag_seq": self.flag_seq[camera], "publisher_session": self.session, "thresholds": h["thresholds"], "regions": info,
                    "alert_ids": alert_ids, "roi": roi, "frame": h["frame"]}
            send(pub, f"flagged.{camera}", meta, [frame, mask_png, overlay])
        self.published += 1
        if self.first_frame_at is None:
            self.first_frame_at = published_ts
            self.log.info("first frame published (camera %s, %.0f ms after capture)", camera, latency_ms)
        self.metrics.inc("iseg_publisher_frames_total", **labels_c)
        self.metrics.observe("iseg_e2e_latency_ms", latency_ms, **labels_c)
        recent = self.latency.setdefault(camera, [])
        recent.append(latency_ms)
        del recent[:-200]

    def replay(self, request: bytes) -> bytes:
        """Answer a replay request `{"since": id, "limit": n, "camera": optional}` with stored alerts."""
        try:
            query = json.loads(request)
            since = int(query.get("since", 0))
            limit = max(1, min(int(query.get("limit", 1000)), 10000))
            alerts = self.store.since(since, limit, query.get("camera"))
            return encode_header({"ok": True, "alerts": alerts, "last_id": self.store.last_id()})
        except (ValueError, TypeError, AttributeError) as err:
            return encode_header({"ok": False, "error": f"bad replay request: {err}"})

    def stats(self) -> dict[str, Any]:
        """The `stats` topic body."""
        cameras = {}
        for camera, values in self.latency.items():
            ordered = sorted(values)
            cameras[camera] = {"latency_p50_ms": float(np.percentile(ordered, 50)),
                               "latency_p99_ms": float(np.percentile(ordered, 99)),
                               "frames": self.metrics.counter("iseg_publisher_frames_total", camera=camera)}
        return {"ts": now(), "published": self.published, "last_alert_id": self.store.last_id(), "cameras": cameras}


def bind_result_sockets(ctx: zmq.Context, config: DaemonConfig) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, list[str]]:
    """Results PULL (ipc, plus Curve TCP for remote workers), the PUB and the replay REP."""
    config.run_path.mkdir(parents=True, exist_ok=True)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, config.sockets.results_hwm)
    pull.bind(config.endpoint("results"))
    endpoints = [config.endpoint("results")]
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, config.sockets.publish_hwm)
    pub.setsockopt(zmq.LINGER, 1000)
    pub.bind(config.endpoint("publish"))
    rep = ctx.socket(zmq.REP)
    rep.bind(config.endpoint("replay"))
    endpoints += [config.endpoint("publish"), config.endpoint("replay")]
    if config.sockets.remote is not None:
        endpoints.append(bind_curve_server(ctx, pull, config, config.sockets.remote.results_port))
    return pull, pub, rep, endpoints


def run_publisher(config: DaemonConfig, stop: StopFlag) -> int:
    """Publisher process body; drains queued results on stop, exit code 0."""
    log = logging.getLogger("iseg.publisher")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "publisher", "publisher", metrics, stop).start()
    pull, pub, rep, endpoints = bind_result_sockets(ctx, config)
    publisher = Publisher(config, metrics, log)
    log.info("publishing on %s; alerts in %s", ", ".join(endpoints), config.state_path / "alerts.sqlite3")
    heartbeat.update(ready=True, first_frame=False)
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(rep, zmq.POLLIN)
    next_stats = time.monotonic()
    try:
        while True:
            draining = stop.stopping
            events = dict(poller.poll(IDLE_DRAIN_S * 1000 if draining else 200))
            heartbeat.progress()
            if rep in events:
                rep.send(publisher.replay(rep.recv()))
            if pull in events:
                try:
                    message = recv(pull)
                    if message.topic == "selftest":
                        publisher.tap.self_test(message.header)
                    else:
                        publisher.handle(message, pub)
                except (WireError, KeyError, TypeError, ValueError) as err:
                    metrics.inc("iseg_publisher_bad_messages_total")
                    log.warning("rejected a malformed result: %s", err)
                if publisher.first_frame_at is not None:
                    heartbeat.update(first_frame=True, first_frame_at=publisher.first_frame_at, published=publisher.published)
            elif draining and not events:
                break
            publisher.tap.tick(lambda topic, body: send(pub, topic, body), publisher.store.add)
            if time.monotonic() >= next_stats:
                heartbeat.update(**publisher.tap.state())
                send(pub, "stats", publisher.stats())
                next_stats = time.monotonic() + STATS_INTERVAL_S
        log.info("publisher stopped after %d frames (%s)", publisher.published, stop.signal_name or "done")
    finally:
        heartbeat.stop()
        publisher.tap.close()
        publisher.store.close()
        for sock in (pull, pub, rep):
            sock.close()
        stop_authenticators()
        ctx.term()
    return 0

