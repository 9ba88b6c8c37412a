"""Capture role: one process per camera, reading frames and pushing them to the workers.

It never waits for a worker: frames go out on a bounded PUSH socket without blocking,
and a full queue means the frame is dropped and counted. A source error or a stall
closes the source and reconnects with exponential backoff, logging the reason.
"""

from __future__ import annotations

import logging
import time

import zmq

from daemon.config import DaemonConfig
from daemon.metrics import Registry
from daemon.role import Heartbeat, StopFlag
from daemon.security import bind_curve_server, stop_authenticators
from daemon.sources import EndOfStream, FrameSource, SourceError, apply_roi, open_source
from daemon.wire import BoundedPusher, frame_header, now

LIVE_KINDS = {"rtsp", "http", "usb"}


def bind_frames_socket(ctx: zmq.Context, config: DaemonConfig, camera_id: str) -> tuple[zmq.Socket, list[str]]:
    """The camera's PUSH socket: to this host's dispatcher (dispatch.enabled), else bound for the
    workers to pull from: ipc for local workers, plus Curve TCP when remote workers may join.

    LINGER is half the stop timeout: frames already queued when capture stops still reach
    a worker (which is stopped after capture), so every captured frame stays accounted for."""
    camera = config.camera(camera_id)
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, config.sockets.frames_hwm)
    sock.setsockopt(zmq.LINGER, int(config.supervisor.stop_timeout_s * 500))
    config.run_path.mkdir(parents=True, exist_ok=True)
    if config.dispatch.enabled:
        sock.setsockopt(zmq.SNDHWM, max(4, config.sockets.frames_hwm))
        endpoint = config.endpoint("intake")
        sock.connect(endpoint)
        return sock, [f"{endpoint} (dispatcher)"]
    endpoint = config.endpoint("frames", camera.id)
    sock.bind(endpoint)
    endpoints = [endpoint]
    if camera.tcp_port is not None:
        endpoints.append(bind_curve_server(ctx, sock, config, camera.tcp_port))
    return sock, endpoints


def run_capture(config: DaemonConfig, camera_id: str, stop: StopFlag, max_frames: int | None = None) -> int:
    """Read, crop and push frames until stopped (or a non-looping file ends); exit code 0."""
    camera = config.camera(camera_id)
    log = logging.getLogger(f"iseg.capture.{camera.id}")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "capture", f"capture.{camera.id}", metrics, stop).start()
    sock, endpoints = bind_frames_socket(ctx, config, camera.id)
    pusher = BoundedPusher(sock)
    session = f"{time.time():.6f}"
    live = camera.source_kind in LIVE_KINDS
    interval = 1.0 / camera.fps
    labels = {"camera": camera.id}
    for series in ("iseg_capture_frames_total", "iseg_capture_dropped_frames_total", "iseg_capture_reconnects_total"):
        metrics.inc(series, 0, **labels)
    metrics.set("iseg_capture_connected", 0, **labels)
    metrics.set("iseg_capture_frames_per_second", 0.0, **labels)
    log.info("capturing %s (%s) at <= %.2f fps, frames on %s", camera.id, camera.source_kind, camera.fps, ", ".join(endpoints))
    source: FrameSource | None = None
    backoff = camera.reconnect_initial_s
    seq = 0
    next_due = time.monotonic()
    last_frame = time.monotonic()
    fps_window: list[float] = []
    try:
        while not stop.stopping and (max_frames is None or seq < max_frames):
            heartbeat.progress()
            if source is None:
                candidate = open_source(camera, config.limits.max_image_pixels)
                try:
                    candidate.open()
                except SourceError as err:
                    metrics.inc("iseg_capture_reconnects_total", **labels)
                    log.warning("camera %s: %s; retrying in %.1fs", camera.id, err, backoff)
                    heartbeat.update(connected=False, last_error=str(err))
                    metrics.set("iseg_capture_connected", 0, **labels)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, camera.reconnect_max_s)
                    continue
                source = candidate
                last_frame = time.monotonic()
                heartbeat.update(connected=True)
                metrics.set("iseg_capture_connected", 1, **labels)
                log.info("camera %s: source open", camera.id)
            if not live:
                delay = next_due - time.monotonic()
                if delay > 0 and stop.wait(min(delay, 0.5)):
                    break
                if delay > 0.5:
                    continue
            try:
                frame = source.read()
            except EndOfStream as err:
                log.info("camera %s: %s; capture done", camera.id, err)
                break
            except SourceError as err:
                reason = str(err)
                if time.monotonic() - last_frame > camera.stall_timeout_s:
                    reason = f"stalled: no frame for {time.monotonic() - last_frame:.1f}s ({err})"
                source.close()
                source = None
                metrics.set("iseg_capture_connected", 0, **labels)
                metrics.inc("iseg_capture_reconnects_total", **labels)
                heartbeat.update(connected=False, last_error=reason)
                log.warning("camera %s: %s; reconnecting in %.1fs", camera.id, reason, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, camera.reconnect_max_s)
                continue
            mono = time.monotonic()
            last_frame = mono
            backoff = camera.reconnect_initial_s
            if live and mono < next_due:
                continue
            next_due = next_due + interval if mono - next_due < interval else mono + interval
            try:
                frame = apply_roi(frame, camera.roi)
            except SourceError as err:
                log.error("camera %s: %s", camera.id, err)
                stop.wait(1.0)
                continue
            header = frame_header(camera.id, seq, now(), frame, session=session,
                                  roi=list(camera.roi[:2]) if camera.roi else [0, 0])
            seq += 1
            metrics.inc("iseg_capture_frames_total", **labels)
            if not pusher.push(f"frame.{camera.id}", header, [frame]):
                metrics.inc("iseg_capture_dropped_frames_total", **labels)
            fps_window = [t for t in fps_window if mono - t < 5.0] + [mono]
            fps = len(fps_window) / 5.0 if len(fps_window) > 1 else 0.0
            metrics.set("iseg_capture_frames_per_second", fps, **labels)
            heartbeat.update(seq=seq, sent=pusher.sent, dropped=pusher.dropped)
    finally:
        if source is not None:
            source.close()
        log.info("camera %s: stopping after %d frames (%d dropped)", camera.id, seq, pusher.dropped)
        heartbeat.stop()
        sock.close()
        stop_authenticators()
        ctx.term()
    return 0
