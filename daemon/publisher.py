"""Publisher role: takes worker results, renders overlays and masks, debounces alerts,
persists them, and publishes everything on one PUB socket.

Topics: `overlay.<camera>` (JPEG), `mask.<camera>` (PNG of labels 0..K),
`alert.<camera>` (JSON only), `flagged.<camera>` (for the recorder: raw frame, mask
PNG, overlay JPEG) and `stats`. PUB never waits for a subscriber, so a client that
reads nothing cannot slow the line; alerts it missed come back from the replay socket.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any, Callable

import numpy as np
import zmq

from daemon.alerts import AlertStore, Debouncer
from daemon.config import DaemonConfig
from daemon.linestats.tap import LineTap
from daemon.messages import Boundary, Rejected, Rejections, Result
from daemon.metrics import Registry
from daemon.publisher_link import PublisherLink
from daemon.publisher_state import PublisherState
from daemon.render import encode_jpeg, encode_png, overlay_rgb, regions
from daemon.role import Heartbeat, StopFlag
from daemon.security import bind_curve_server, stop_authenticators
from daemon.wire import encode_header, now, send

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

    def export(self) -> dict[str, Any]:
        """Last session and sequence number per camera, as JSON."""
        return {camera: {"session": session, "max_seq": self.max_seq[camera]} for camera, session in self.sessions.items()}

    def restore(self, saved: Any, cameras: set[str]) -> None:
        """Take back what `export` wrote, for configured cameras only."""
        for camera, entry in (saved.items() if isinstance(saved, dict) else ()):
            if camera in cameras and isinstance(entry, dict) and isinstance(entry.get("session"), str) \
                    and type(entry.get("max_seq")) is int and entry["max_seq"] >= 0:
                self.sessions[camera] = entry["session"]
                self.max_seq[camera] = entry["max_seq"]


class LeadLost(Exception):
    """This publisher lost the lead while handling a result (fenced, or its lease ran out while it was
    frozen): the alerts it just stored are taken back unpublished and the frame is not acknowledged,
    so the leader handles it."""


class DoneFrames:
    """Frames whose results were stored, per camera session, so a re-sent frame's second result is
    acknowledged again but not published twice (a bounded window of recent sequence numbers)."""

    WINDOW = 4096

    def __init__(self) -> None:
        self.sessions: dict[str, str] = {}
        self.seqs: dict[str, set[int]] = {}
        self.order: dict[str, list[int]] = {}

    def seen(self, camera: str, session: str, seq: int) -> bool:
        """True when this frame's result was handled already."""
        return self.sessions.get(camera) == session and seq in self.seqs.get(camera, ())

    def add(self, camera: str, session: str, seq: int) -> None:
        """Remember a handled frame (a new capture session starts a new window)."""
        if self.sessions.get(camera) != session:
            self.sessions[camera] = session
            self.seqs[camera] = set()
            self.order[camera] = []
        if seq not in self.seqs[camera]:
            self.seqs[camera].add(seq)
            self.order[camera].append(seq)
            if len(self.order[camera]) > self.WINDOW:
                self.seqs[camera].discard(self.order[camera].pop(0))

    def export(self, last: int = 512) -> dict[str, Any]:
        """The newest `last` sequence numbers per camera, as JSON (enough to cover frames in flight)."""
        return {camera: {"session": session, "seqs": self.order[camera][-last:]} for camera, session in self.sessions.items()}

    def restore(self, saved: Any, cameras: set[str]) -> None:
        """Take back what `export` wrote, for configured cameras only."""
        for camera, entry in (saved.items() if isinstance(saved, dict) else ()):
            if camera in cameras and isinstance(entry, dict) and isinstance(entry.get("session"), str) \
                    and isinstance(entry.get("seqs"), list):
                self.sessions.pop(camera, None)
                for seq in entry["seqs"]:
                    if type(seq) is int and seq >= 0:
                        self.add(camera, entry["session"], seq)


class Publisher:
    """The result → topics logic, apart from process setup."""

    def __init__(self, config: DaemonConfig, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.boundary = Boundary.from_config(config)
        self.rejections = Rejections(metrics, "publisher", log)
        self.state = PublisherState(config.state_path / "publisher-state.json", log)
        saved = self.state.load()
        self.debouncer = Debouncer(config.alerts.k, config.alerts.n, config.alerts.cooldown_s)
        restored = self.debouncer.restore(saved.get("debounce"), self.boundary.classes)
        self.tracker = SequenceTracker()
        self.tracker.restore(saved.get("sequences"), set(self.boundary.classes))
        self.done = DoneFrames()
        self.done.restore(saved.get("done"), set(self.boundary.classes))
        self.epoch = saved.get("epoch") if type(saved.get("epoch")) is int and saved.get("epoch") > 0 else 0
        self.unacked: list[tuple[str, str, int]] = []
        self.replicate: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
        self.replica: dict[str, Any] = saved
        first_id = saved.get("next_alert_id")
        self.store = AlertStore(config.state_path / "alerts.sqlite3", log,
                                first_id=first_id if type(first_id) is int and first_id > 0 else 1)
        if saved:
            log.info("restored publisher state: cooldowns of %d class(es), sequence numbers of %d camera(s), "
                     "next alert id %d", restored, len(self.tracker.sessions), self.store.next_id)
        self.published = 0
        self.first_frame_at: float | None = None
        self.latency: dict[str, list[float]] = {}
        self.session = f"{time.time():.6f}"
        self.flag_seq: dict[str, int] = {}
        self._counted = {"store": 0, "unstored": 0, "state": 0}
        for name in ("iseg_alert_store_errors_total", "iseg_alerts_unstored_total", "iseg_publisher_state_errors_total"):
            metrics.inc(name, 0)
        metrics.set("iseg_alerts_pending", 0)
        for name in ("iseg_publisher_duplicate_frames_total", "iseg_publisher_unled_results_total"):
            metrics.inc(name, 0)
        for camera in config.cameras:
            for series in ("iseg_publisher_frames_total", "iseg_publisher_failed_frames_total",
                           "iseg_publisher_gap_frames_total", "iseg_publisher_late_frames_total",
                           "iseg_flagged_frames_total"):
                metrics.inc(series, 0, camera=camera.id)
            for name in camera.classes:
                metrics.inc("iseg_alerts_total", 0, camera=camera.id, **{"class": name})
        self.tap = LineTap(config, metrics, log)

    def handle(self, result: Result, pub: zmq.Socket) -> None:
        """One checked worker result → overlay, mask, maybe alert and flagged-frame messages; the frame is
        then due for acknowledgement. A frame handled before (a re-sent frame's second result) is only
        acknowledged again."""
        key = (result.camera, result.session, result.seq)
        if self.done.seen(*key):
            self.metrics.inc("iseg_publisher_duplicate_frames_total")
            self.unacked.append(key)
            return
        self.done.add(*key)
        self._handle(result, pub)
        self.unacked.append(key)

    def due_acks(self) -> list[tuple[str, str, int]]:
        """Frames to acknowledge now: all handled ones once the alert store has committed their alerts
        (while it holds alerts in memory, none: the dispatcher keeps those frames)."""
        if self.store.pending:
            return []
        keys, self.unacked = self.unacked, []
        return keys

    def take_replica(self, document: dict[str, Any], alerts: list[dict[str, Any]]) -> None:
        """As follower: store the leader's alerts under their ids and keep its state document, saved as
        this publisher's own so a restart still has it."""
        for alert in alerts:
            self.store.put(alert)
        self.replica = document
        self.state.save({**document, "epoch": self.epoch})

    def adopt(self, document: dict[str, Any]) -> None:
        """Take the leader's replicated state when this publisher takes over: cooldowns, sequence numbers,
        frames done and the next alert id continue where the old leader left them."""
        cameras = set(self.boundary.classes)
        self.debouncer = Debouncer(self.config.alerts.k, self.config.alerts.n, self.config.alerts.cooldown_s)
        self.debouncer.restore(document.get("debounce"), self.boundary.classes)
        self.tracker = SequenceTracker()
        self.tracker.restore(document.get("sequences"), cameras)
        self.done = DoneFrames()
        self.done.restore(document.get("done"), cameras)
        next_id = document.get("next_alert_id")
        if type(next_id) is int and next_id > self.store.next_id:
            self.store.next_id = next_id
        self.save_state()

    def _handle(self, result: Result, pub: zmq.Socket) -> None:
        camera, seq = result.camera, result.seq
        labels_c = {"camera": camera}
        if result.dispatch is not None:
            change = self.tracker.gaps(camera, result.dispatch[0], result.dispatch[1])
        else:
            change = self.tracker.gaps(camera, result.session, seq)
        if change >= 0:
            self.metrics.inc("iseg_publisher_gap_frames_total", change, **labels_c)
        else:  # counters never go down (rate() would read a reset): a filled gap is counted apart
            self.metrics.inc("iseg_publisher_late_frames_total", -change, **labels_c)
        if not result.ok:
            self.metrics.inc("iseg_publisher_failed_frames_total", **labels_c)
            self._commit([])
            return
        frame, labels = result.frame, result.labels
        classes, flagged, presence, thresholds = list(result.classes), list(result.flagged), result.presence, result.thresholds
        roi = result.roi
        alerts_cfg = self.config.alerts
        info = regions(labels, classes, roi, alerts_cfg.min_area_px, alerts_cfg.max_boxes)
        overlay = encode_jpeg(overlay_rgb(frame, labels, classes, flagged, presence, info, roi),
                              self.config.recorder.jpeg_quality)
        mask_png = encode_png(labels)
        published_ts = now()
        latency_ms = (published_ts - result.ts) * 1000
        base = {"camera": camera, "seq": seq, "capture_ts": result.ts, "published_ts": published_ts,
                "latency_ms": latency_ms, "worker": result.worker, "infer_ms": result.infer_ms, "model": result.model}
        alert_ids = []
        firing = self.debouncer.update(camera, classes, flagged, result.ts)
        self.tap.observe(camera, result.ts, presence, flagged, {c: info[c]["area_frac"] for c in classes}, firing,
                         frame, result.worker)
        alerts = []
        for name in firing:
            alert = {**base, "kind": "defect", "class": name, "classes": {
                c: {"presence": presence[c], "threshold": thresholds[c], **info[c]} for c in flagged},
                "frame_shape": list(frame.shape), "roi": roi}
            self.store.add(alert)
            alerts.append(alert)
        self._commit(alerts)
        for alert in alerts:
            name = alert["class"]
            alert_ids.append(alert["id"])
            send(pub, f"alert.{camera}", alert)
            self.metrics.inc("iseg_alerts_total", camera=camera, **{"class": name})
            self.log.info("ALERT %d camera %s class %s presence %.3f > %.3f (frame %d, %.0f ms after capture)",
                          alert["id"], camera, name, presence[name], thresholds[name], seq, latency_ms)
        common = {**base, "flagged": flagged, "presence": presence, "thresholds": thresholds}
        send(pub, f"overlay.{camera}", {**common, "format": "jpeg"}, [overlay])
        send(pub, f"mask.{camera}", {**common, "format": "png", "classes": classes}, [mask_png])
        if flagged:
            self.metrics.inc("iseg_flagged_frames_total", **labels_c)
            self.flag_seq[camera] = self.flag_seq.get(camera, 0) + 1
            meta = {**common, "classes": classes, "flag_seq": self.flag_seq[camera], "publisher_session": self.session,
                    "thresholds": thresholds, "regions": info, "alert_ids": alert_ids, "roi": roi,
                    "frame": result.frame_spec}
            send(pub, f"flagged.{camera}", meta, [frame, mask_png, overlay])
        self.published += 1
        if self.first_frame_at is None:
            self.first_frame_at = published_ts
            self.log.info("first frame published (camera %s, %.0f ms after capture)", camera, latency_ms)
        self.metrics.inc("iseg_publisher_frames_total", **labels_c)
        self.metrics.observe("iseg_capture_to_publish_seconds", published_ts - result.ts, **labels_c)
        recent = self.latency.setdefault(camera, [])
        recent.append(latency_ms)
        del recent[:-200]

    def state_document(self) -> dict[str, Any]:
        """What a restart (or the backup publisher) needs to carry on: next alert id, cooldowns, sequence
        numbers, frames done, epoch."""
        return {"next_alert_id": self.store.next_id, "debounce": self.debouncer.export(),
                "sequences": self.tracker.export(), "done": self.done.export(), "epoch": self.epoch}

    def save_state(self) -> None:
        """Persist the state document."""
        self.state.save(self.state_document())

    def _commit(self, alerts: list[dict[str, Any]]) -> None:
        """After every result, before its alerts are published: the state document, built once, goes to
        the follower with the alerts (a pair) and to disk. A lead lost meanwhile takes the stored alerts
        back (LeadLost goes on to the caller)."""
        document = self.state_document()
        if self.replicate is not None:
            try:
                self.replicate(document, alerts)
            except LeadLost:
                for alert in alerts:
                    self.store.remove(alert["id"])
                raise
        self.state.save(document)

    def maintain(self) -> str:
        """Retry writing held alerts and update the storage metrics; returns why the publisher is
        degraded ('' when it is not)."""
        self.store.flush()
        self.metrics.set("iseg_alerts_pending", len(self.store.pending))
        for key, total, metric in (("store", self.store.errors, "iseg_alert_store_errors_total"),
                                   ("unstored", self.store.unstored, "iseg_alerts_unstored_total"),
                                   ("state", self.state.errors, "iseg_publisher_state_errors_total")):
            if total > self._counted[key]:
                self.metrics.inc(metric, total - self._counted[key])
                self._counted[key] = total
        if self.store.error:
            return (f"alert store failing ({self.store.error}); {len(self.store.pending)} alert(s) published and "
                    "held in memory until it can be written")
        return ""

    def replay(self, frames: list[Any]) -> bytes:
        """Answer a replay request `{"since": id, "limit": n, "camera": optional}` with stored alerts."""
        try:
            request = self.boundary.replay(frames)
        except Rejected as err:
            self.rejections.count("replay", err)
            return encode_header({"ok": False, "error": f"bad replay request: {err}"})
        try:
            alerts = self.store.since(request.since, request.limit, request.camera)
        except sqlite3.Error as err:
            return encode_header({"ok": False, "error": f"alert store cannot be read now: {err}"})
        return encode_header({"ok": True, "alerts": alerts, "last_id": self.store.last_id()})

    def stats(self) -> dict[str, Any]:
        """The `stats` topic body."""
        cameras = {}
        for camera, values in self.latency.items():
            ordered = sorted(values)
            cameras[camera] = {"latency_p50_ms": float(np.percentile(ordered, 50)),
                               "latency_p99_ms": float(np.percentile(ordered, 99)),
                               "frames": self.metrics.counter("iseg_publisher_frames_total", camera=camera)}
        return {"ts": now(), "published": self.published, "last_alert_id": self.store.last_id(), "cameras": cameras,
                "alert_store": {"pending": len(self.store.pending), "unstored": self.store.unstored,
                                "error": self.store.error}}


def bind_result_sockets(ctx: zmq.Context, config: DaemonConfig) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, list[str]]:
    """Results PULL (ipc, plus Curve TCP for remote workers), the PUB and the replay REP."""
    config.run_path.mkdir(parents=True, exist_ok=True)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, config.sockets.results_hwm)
    pull.setsockopt(zmq.MAXMSGSIZE, config.limits.max_image_pixels * 4 + 65536)
    pull.bind(config.endpoint("results"))
    endpoints = [config.endpoint("results")]
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, config.sockets.publish_hwm)
    pub.setsockopt(zmq.LINGER, 1000)
    pub.bind(config.endpoint("publish"))
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.MAXMSGSIZE, 65536)
    rep.bind(config.endpoint("replay"))
    endpoints += [config.endpoint("publish"), config.endpoint("replay")]
    if config.sockets.remote is not None:
        endpoints.append(bind_curve_server(ctx, pull, config, config.sockets.remote.results_port))
    return pull, pub, rep, endpoints


def run_publisher(config: DaemonConfig, stop: StopFlag, backup: bool = False) -> int:
    """Publisher process body; drains queued results on stop, exit code 0. With dispatch it
    acknowledges stored results to the dispatchers; `backup` makes it the pair's backup."""
    log = logging.getLogger("iseg.publisher")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "publisher", "publisher", metrics, stop).start()
    pull, pub, rep, endpoints = bind_result_sockets(ctx, config)
    publisher = Publisher(config, metrics, log)
    link: PublisherLink | None = None
    if config.dispatch.enabled:
        link = PublisherLink(ctx, config, backup, publisher.epoch, metrics, publisher.rejections, log)
        publisher.epoch = link.epoch
        if link.pair:
            def replicate(state: dict[str, Any], alerts: list[dict[str, Any]]) -> None:
                confirmed = link.replicate(state, alerts, wait=bool(alerts))
                if alerts and not confirmed and not link.may_publish(time.monotonic()):
                    raise LeadLost(f"lost the lead (epoch {link.epoch}) before the follower confirmed")
            publisher.replicate = replicate
        log.info("%s publisher, epoch %d, %s", link.name, link.epoch,
                 "leading" if link.leading else "following until the leader falls silent")
    log.info("publishing on %s; alerts in %s", ", ".join(endpoints), config.state_path / "alerts.sqlite3")
    heartbeat.update(ready=True, first_frame=False, degraded=publisher.maintain())
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(rep, zmq.POLLIN)
    for sock in link.sockets if link is not None else ():
        poller.register(sock, zmq.POLLIN)

    def store_and_replicate(alert: dict[str, Any]) -> int:
        alert_id = publisher.store.add(alert)
        if publisher.replicate is not None:
            publisher.replicate(publisher.state_document(), [alert])
        return alert_id

    next_stats = time.monotonic()
    try:
        while True:
            draining = stop.stopping
            events = dict(poller.poll(IDLE_DRAIN_S * 1000 if draining else 50 if link is not None else 200))
            heartbeat.progress()
            if link is not None:
                now_m = time.monotonic()
                for sock in link.sockets:
                    if sock in events:
                        link.take(sock, now_m, publisher.take_replica)
                if link.tick(now_m):
                    publisher.adopt(publisher.replica)
                publisher.epoch = link.epoch
                heartbeat.update(leading=link.leading, epoch=link.epoch)
            if rep in events:
                rep.send(publisher.replay(rep.recv_multipart(copy=False)))
            if pull in events:
                try:
                    frames = pull.recv_multipart(copy=False)
                    if link is not None and not link.may_publish(time.monotonic()):
                        metrics.inc("iseg_publisher_unled_results_total")
                    elif frames and bytes(frames[0].buffer if isinstance(frames[0], zmq.Frame) else frames[0]) == b"selftest":
                        publisher.tap.self_test(publisher.boundary.self_test(frames))
                    else:
                        publisher.handle(publisher.boundary.result(frames), pub)
                except Rejected as err:
                    publisher.rejections.count("results", err)
                except LeadLost as err:
                    metrics.inc("iseg_publisher_unled_results_total")
                    log.warning("result not published: %s", err)
                except Exception as err:  # noqa: BLE001 (a result that passed its schema yet fails is skipped, never fatal)
                    publisher.rejections.internal("results", err)
                if publisher.first_frame_at is not None:
                    heartbeat.update(first_frame=True, first_frame_at=publisher.first_frame_at, published=publisher.published)
            elif draining and rep not in events:
                break
            if link is not None:
                link.ack(publisher.due_acks())
            publisher.tap.tick(lambda topic, body: send(pub, topic, body), store_and_replicate)
            if time.monotonic() >= next_stats:
                degraded = publisher.maintain()
                if degraded != heartbeat.state.get("degraded", ""):
                    heartbeat.update(degraded=degraded)
                send(pub, "stats", publisher.stats())
                next_stats = time.monotonic() + STATS_INTERVAL_S
        log.info("publisher stopped after %d frames (%s)", publisher.published, stop.signal_name or "done")
    finally:
        publisher.maintain()
        if link is not None:
            link.ack(publisher.due_acks())
            link.close()
        publisher.tap.close()
        publisher.store.close()
        publisher.save_state()
        publisher.state.close()
        heartbeat.stop()
        for sock in (pull, pub, rep):
            sock.close()
        stop_authenticators()
        ctx.term()
    return 0

