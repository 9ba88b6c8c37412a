"""The console's HTTP API: JSON in and out, images and live streams by id only.

Every route but login needs a user (401 otherwise); changes need an operator (viewers
get 403) and, for browsers, a same-origin request. Bad input is a 4xx whose JSON
`error` names the field that is wrong and what would be right.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import wraps
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import cv2
import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from daemon.config import DaemonConfig
from daemon.console.auth import COOKIE, UNSAFE_METHODS, Authenticator, LoginLimiter, Sessions, same_origin
from daemon.console.live import LiveFeed
from daemon.console.stores import AlertReader, RecordingReader
from daemon.console.users import UserDirectory
from daemon.linestats import api as linestats_api
from daemon.metrics import Registry
from daemon.recorder import STATUSES, RecordingStore
from daemon.render import PALETTE_RGB
from daemon.review import NotFound, ReviewError, ReviewLog, acknowledge, mark_verdict

MAX_BODY_BYTES = 16 * 1024
MAX_LIMIT = 1000
SSE_QUEUE = 200
Handler = Callable[[Request], Awaitable[Response]]


class EventHub:
    """Fan-out of server-sent events; a client whose queue fills up is cut off (it reconnects and
    replays from its last alert id), so one stuck browser never holds the others back."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        """A new client's queue."""
        queue: asyncio.Queue = asyncio.Queue(SSE_QUEUE)
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        """Forget a client."""
        self.queues.discard(queue)

    def publish(self, kind: str, data: dict[str, Any], event_id: int | None = None) -> None:
        """Send one event to every client."""
        for queue in list(self.queues):
            try:
                queue.put_nowait((kind, data, event_id))
            except asyncio.QueueFull:
                self.queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)


class Console:
    """Everything the handlers share: config, users and sessions, stores, live feed, metrics."""

    def __init__(self, config: DaemonConfig, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        users_path = Path(config.console.users_file).expanduser()
        self.users_path = users_path if users_path.is_absolute() else config.state_path / users_path
        self.users = UserDirectory(self.users_path, log)
        self.sessions = Sessions(config.console.session_hours * 3600)
        self.auth = Authenticator(self.users, self.sessions, config.console.anonymous_role)
        self.limiter = LoginLimiter(config.console.login_attempts_per_minute)
        self.live = LiveFeed(config, metrics, log)
        self.hub = EventHub()
        self.alerts = AlertReader(config.state_path)
        self.recordings = RecordingReader(config.state_path)
        self.review_log: ReviewLog | None = None
        self.recording_store: RecordingStore | None = None
        self.viewers = 0

    def open_writers(self) -> None:
        """The review log and the recordings index for verdicts (the `iseg review mark` code path)."""
        self.review_log = ReviewLog(self.config.state_path)
        self.recording_store = RecordingStore(self.config.state_path, self.log)

    def close(self) -> None:
        """Close every database."""
        for closable in (self.review_log, self.recording_store, self.alerts.store, self.recordings):
            if closable is not None:
                closable.close()


class BadInput(ValueError):
    """A request field that is wrong; becomes a 400 naming it."""


def error(status: int, message: str, **headers: str) -> JSONResponse:
    """A JSON error response."""
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def console_of(request: Request) -> Console:
    """The Console behind this app."""
    return request.app.state.console


def guarded(role: str, page: bool = False) -> Callable[[Handler], Handler]:
    """Require a user of at least `role`; pages redirect to the login page instead of a 401."""
    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        async def inner(request: Request) -> Response:
            console = console_of(request)
            user, how = console.auth.identify(request.headers, request.cookies)
            if user is None:
                if page:
                    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
                return error(401, "not logged in: POST /api/login or send an Authorization: Bearer token")
            if not user.may(role):
                return error(403, f"user {user.name} is a {user.role}; this needs {role} or above")
            if request.method in UNSAFE_METHODS and how in ("cookie", "anonymous") and \
                    not same_origin(request.headers, request.url.scheme):
                return error(403, "cross-site request refused: Origin does not match this console")
            request.state.user = user
            try:
                return await handler(request)
            except BadInput as err:
                return error(400, str(err))
        return inner
    return wrap


def query_int(request: Request, name: str, default: int | None = None, low: int = 0,
              high: int | None = None) -> int | None:
    """An integer query parameter within [low, high]; BadInput names it otherwise."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"{name}: {raw[:40]!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise BadInput(f"{name}: {value} must be between {low} and {high}" if high is not None
                       else f"{name}: {value} must be >= {low}")
    return value


def query_float(request: Request, name: str) -> float | None:
    """A number (e.g. a Unix time) from the query; BadInput names it otherwise."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise BadInput(f"{name}: {raw[:40]!r} is not a number (Unix seconds)") from None


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; BadInput when it is not one."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise BadInput(f"body: {len(body)} bytes, at most {MAX_BODY_BYTES}")
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise BadInput(f"body: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise BadInput("body: expected a JSON object")
    return value


def string_field(body: dict[str, Any], name: str, required: bool = True) -> str:
    """A string member of a JSON body; BadInput names it otherwise."""
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadInput(f"{name}: required, a non-empty string")
    return value


# -- session ------------------------------------------------------------------------------

async def login(request: Request) -> Response:
    """POST /api/login {"user", "password"} → session cookie."""
    console = console_of(request)
    if request.headers.get("origin") and not same_origin(request.headers, request.url.scheme):
        return error(403, "cross-site login refused: Origin does not match this console")
    try:
        body = await json_body(request)
        name, password = string_field(body, "user"), string_field(body, "password")
    except BadInput as err:
        return error(400, str(err))
    client = request.client.host if request.client else "?"
    wait = console.limiter.retry_after(f"ip:{client}", f"user:{name}")
    if wait:
        console.metrics.inc("iseg_console_logins_total", result="limited")
        return error(429, f"too many failed logins; try again in {wait:.0f}s", **{"Retry-After": str(int(wait) + 1)})
    user = await asyncio.to_thread(console.users.check_password, name, password)
    if user is None:
        console.limiter.failed(f"ip:{client}", f"user:{name}")
        console.metrics.inc("iseg_console_logins_total", result="failed")
        console.log.warning("failed login for %r from %s", name[:64], client)
        reason = "no users are configured on this console (see the console's log)" if console.users.error else "wrong user or password"
        return error(401, reason)
    console.metrics.inc("iseg_console_logins_total", result="ok")
    console.log.info("login: %s (%s) from %s", user.name, user.role, client)
    response = JSONResponse({"user": user.name, "role": user.role})
    response.set_cookie(COOKIE, console.sessions.create(user.name), max_age=int(console.sessions.lifetime_s),
                        httponly=True, samesite="strict", secure=console.config.console.tls, path="/")
    return response


async def logout(request: Request) -> Response:
    """POST /api/logout: end this browser's session."""
    sid = request.cookies.get(COOKIE)
    if sid:
        if not same_origin(request.headers, request.url.scheme):
            return error(403, "cross-site request refused: Origin does not match this console")
        console_of(request).sessions.end(sid)
    response = JSONResponse({"ok": True})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=console_of(request).config.console.tls)
    return response


@guarded("viewer")
async def me(request: Request) -> Response:
    """GET /api/me: who is logged in."""
    user = request.state.user
    return JSONResponse({"user": user.name, "role": user.role})


# -- cameras ------------------------------------------------------------------------------

def known_camera(request: Request) -> str | None:
    """The path's camera id when the config has it."""
    camera = request.path_params["camera"]
    return camera if camera in console_of(request).live.cameras else None


@guarded("viewer")
async def cameras(request: Request) -> Response:
    """GET /api/cameras: every camera's status, rates and scores."""
    console = console_of(request)
    live = console.live
    health = linestats_api.health(console.config)["cameras"]
    return JSONResponse({"cameras": [{**live.describe(c), "health": health.get(c)} for c in live.cameras]})


@guarded("viewer")
async def latest_jpeg(request: Request) -> Response:
    """GET /api/cameras/{id}/latest.jpg: the newest overlay."""
    camera = known_camera(request)
    if camera is None:
        return error(404, f"no camera {request.path_params['camera'][:64]!r}")
    frame = console_of(request).live.frames.get(camera)
    if frame is None:
        return error(404, f"camera {camera} has no frame yet")
    return Response(frame.jpeg, media_type="image/jpeg",
                    headers={"Cache-Control": "no-store", "X-Seq": str(frame.seq), "X-Capture-Ts": f"{frame.capture_ts:.6f}"})


@guarded("viewer")
async def latest_mask(request: Request) -> Response:
    """GET /api/cameras/{id}/mask.png: the newest label mask (pixel value k = class k, 0 = none)."""
    camera = known_camera(request)
    if camera is None:
        return error(404, f"no camera {request.path_params['camera'][:64]!r}")
    mask = console_of(request).live.masks.get(camera)
    if mask is None:
        return error(404, f"camera {camera} has no mask yet")
    return Response(mask, media_type="image/png", headers={"Cache-Control": "no-store"})


@guarded("viewer")
async def live_mjpeg(request: Request) -> Response:
    """GET /api/cameras/{id}/live.mjpeg: newest overlays as they come (a slow reader skips frames)."""
    camera = known_camera(request)
    if camera is None:
        return error(404, f"no camera {request.path_params['camera'][:64]!r}")
    console = console_of(request)

    async def parts() -> AsyncIterator[bytes]:
        console.viewers += 1
        console.metrics.set("iseg_console_live_viewers", console.viewers)
        last = 0
        try:
            while True:
                frame = await console.live.next_frame(camera, last, 10.0)
                if frame is None:
                    continue
                last = frame.number
                console.metrics.inc("iseg_console_live_frames_sent_total", camera=camera)
                yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(frame.jpeg)).encode()
                       + f"\r\nX-Seq: {frame.seq}\r\nX-Capture-Ts: {frame.capture_ts:.6f}"
                         f"\r\nX-Console-Ts: {frame.received_ts:.6f}\r\n\r\n".encode()
                       + frame.jpeg + b"\r\n")
        finally:
            console.viewers -= 1
            console.metrics.set("iseg_console_live_viewers", console.viewers)

    return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                             headers={"Cache-Control": "no-store"})


# -- alerts -------------------------------------------------------------------------------

def with_acks(console: Console, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alerts with their acknowledgement and the recording they link to."""
    acks = console.review_log.acks([a["id"] for a in alerts]) if console.review_log else {}
    out = []
    for alert in alerts:
        out.append({**alert, "ack": acks.get(alert["id"]), "recording_id": recording_of(console, alert)})
    return out


def recording_of(console: Console, alert: dict[str, Any]) -> int | None:
    """The recording of the alert's frame (the recorder indexes alert ids with it)."""
    rows = console.recordings.index.rows("SELECT id FROM recordings WHERE camera = ? AND seq = ? AND capture_ts = ?",
                                         (alert["camera"], alert["seq"], alert["capture_ts"]))
    return int(rows[0][0]) if rows else None


@guarded("viewer")
async def alerts(request: Request) -> Response:
    """GET /api/alerts?since=&camera=&cls=&from=&to=&state=acked|unacked&limit=."""
    console = console_of(request)
    limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
    since = query_int(request, "since")
    state = request.query_params.get("state") or None
    if state not in (None, "acked", "unacked"):
        raise BadInput(f"state: {state[:20]!r} must be acked or unacked")
    start, end = query_float(request, "from"), query_float(request, "to")
    camera, cls = request.query_params.get("camera") or None, request.query_params.get("cls") or None
    if state is None:
        rows = console.alerts.query(since, camera, cls, start, end, limit)
    else:
        acked = console.review_log.acked_ids()
        rows = [a for a in console.alerts.query(since, camera, cls, start, end, 100000)
                if (a["id"] in acked) == (state == "acked")][:limit]
    return JSONResponse({"alerts": with_acks(console, rows), "last_id": console.alerts.last_id()})


@guarded("operator")
async def ack_alert(request: Request) -> Response:
    """POST /api/alerts/{id}/ack {"note": optional}."""
    console = console_of(request)
    alert_id = request.path_params["alert_id"]
    body = await json_body(request)
    note = string_field(body, "note", required=False)
    try:
        done = acknowledge(console.review_log, console.alerts.get(alert_id) is not None, alert_id,
                           request.state.user.name, note)
    except NotFound as err:
        return error(404, str(err))
    except ReviewError as err:
        return error(400, str(err))
    console.metrics.inc("iseg_console_acks_total")
    console.hub.publish("ack", done)
    console.log.info("alert %d acknowledged by %s", alert_id, request.state.user.name)
    return JSONResponse(done)


def sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One server-sent event."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@guarded("viewer")
async def events(request: Request) -> Response:
    """GET /api/events (SSE): alert, ack, verdict and camera events; Last-Event-ID (or ?since=)
    replays the alerts missed."""
    console = console_of(request)
    since = query_int(request, "since")
    last_event = request.headers.get("last-event-id", "")
    if since is None and last_event.isdigit():
        since = int(last_event)
    queue = console.hub.subscribe()
    console.metrics.set("iseg_console_event_clients", len(console.hub.queues))

    async def stream() -> AsyncIterator[bytes]:
        replayed = 0
        try:
            yield b"retry: 2000\n\n"
            if since is not None:
                for alert in with_acks(console, console.alerts.query(since=since, limit=MAX_LIMIT)):
                    replayed = alert["id"]
                    yield sse("alert", alert, alert["id"])
            for camera in console.live.cameras:
                yield sse("camera", {"camera": camera, "status": console.live.cameras[camera].status})
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 15.0)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if item is None:
                    return
                kind, data, event_id = item
                if kind == "alert" and event_id is not None and event_id <= replayed:
                    continue
                yield sse(kind, data, event_id)
        finally:
            console.hub.unsubscribe(queue)
            console.metrics.set("iseg_console_event_clients", len(console.hub.queues))

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# -- recordings ---------------------------------------------------------------------------

@guarded("viewer")
async def recordings(request: Request) -> Response:
    """GET /api/recordings?status=&camera=&limit=&order=asc|desc."""
    console = console_of(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadInput(f"status: {status[:20]!r} must be one of {', '.join(STATUSES)}")
    order = (request.query_params.get("order") or "desc").upper()
    if order not in ("ASC", "DESC"):
        raise BadInput("order: must be asc or desc")
    limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
    rows = console.recordings.query(status, request.query_params.get("camera") or None, limit, order)
    return JSONResponse({"recordings": rows})


def why_flagged(console: Console, record: dict[str, Any]) -> dict[str, Any]:
    """Presence vs threshold and mask area per class, the k-of-n window, model and config version."""
    meta = record["meta"]
    presence, thresholds = meta.get("presence", {}), meta.get("thresholds", {})
    regions = meta.get("regions", {})
    classes = [{"class": c, "presence": presence.get(c), "threshold": thresholds.get(c),
                "flagged": c in meta.get("flagged", []), "area_px": regions.get(c, {}).get("area_px"),
                "area_frac": regions.get(c, {}).get("area_frac"), "boxes": regions.get(c, {}).get("boxes", [])}
               for c in meta.get("classes", list(presence))]
    window = meta.get("window") or {}
    return {"classes": classes,
            "window": {"k": window.get("k", console.config.alerts.k), "n": window.get("n", console.config.alerts.n),
                       "frames": window.get("frames", [])},
            "alert_ids": meta.get("alert_ids", []), "model": meta.get("model"),
            "config_version": meta.get("config_version"), "latency_ms": meta.get("latency_ms")}


@guarded("viewer")
async def recording(request: Request) -> Response:
    """GET /api/recordings/{id}: metadata, why it was flagged, its audit trail."""
    console = console_of(request)
    recording_id = request.path_params["recording_id"]
    record = console.recordings.get(recording_id)
    if record is None:
        return error(404, f"no recording {recording_id}")
    record["why"] = why_flagged(console, record)
    record["audit"] = console.review_log.audit(20, f"recording:{recording_id}") if console.review_log else []
    return JSONResponse(record)


def colour_mask(path: Path) -> bytes:
    """The label PNG (0 background, k = class k) as a coloured PNG a person can see."""
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise OSError(f"unreadable mask {path}")
    if labels.ndim == 3:
        labels = labels[..., 0]
    palette = np.zeros((256, 3), np.uint8)
    for k, colour in enumerate(PALETTE_RGB, start=1):
        palette[k::len(PALETTE_RGB)] = colour[::-1]
    ok, data = cv2.imencode(".png", palette[labels])
    if not ok:
        raise OSError("PNG encoding failed")
    return data.tobytes()


@guarded("viewer")
async def recording_image(request: Request) -> Response:
    """GET /api/recordings/{id}/{original|overlay|mask|before-N|after-N}."""
    console = console_of(request)
    recording_id, kind = request.path_params["recording_id"], request.path_params["kind"]
    path = console.recordings.image(recording_id, kind)
    if path is None:
        return error(404, f"recording {recording_id} has no image {kind[:32]!r} "
                          "(one of original, overlay, mask, before-N, after-N)")
    headers = {"Cache-Control": "private, max-age=3600"}
    if kind == "mask":
        return Response(await asyncio.to_thread(colour_mask, path), media_type="image/png", headers=headers)
    return FileResponse(path, headers=headers)


@guarded("operator")
async def verdict(request: Request) -> Response:
    """POST /api/recordings/{id}/verdict {"verdict": confirmed|false-alarm|unsure, "note": optional}."""
    console = console_of(request)
    recording_id = request.path_params["recording_id"]
    body = await json_body(request)
    value = body.get("verdict")
    if not isinstance(value, str):
        raise BadInput("verdict: required, one of confirmed, false-alarm, unsure")
    note = string_field(body, "note", required=False) if "note" in body else ""
    try:
        change = mark_verdict(console.recording_store, console.review_log, recording_id, value,
                              request.state.user.name, note)
    except NotFound as err:
        return error(404, str(err))
    except ReviewError as err:
        return error(400, str(err))
    console.metrics.inc("iseg_console_verdicts_total", verdict=value)
    console.hub.publish("verdict", {**change, "user": request.state.user.name})
    console.log.info("recording %d: %s → %s by %s", recording_id, change["old"], value, request.state.user.name)
    return JSONResponse({**change, "user": request.state.user.name})


# -- health -------------------------------------------------------------------------------

@guarded("viewer")
async def health(request: Request) -> Response:
    """GET /api/health: the supervisor's /stats (roles, restarts, per-camera flow) plus the console's own state."""
    console = console_of(request)
    return JSONResponse({"stats": console.live.stats, "stats_error": console.live.stats_error,
                         "cameras": linestats_api.health(console.config)["cameras"],
                         "console": {"viewers": console.viewers, "event_clients": len(console.hub.queues),
                                     "frames_received": console.live.received, "ts": time.time()}})


@guarded("operator")
async def audit(request: Request) -> Response:
    """GET /api/audit?limit=: the newest acknowledgements and verdicts with old → new."""
    console = console_of(request)
    return JSONResponse({"audit": console.review_log.audit(query_int(request, "limit", 100, 1, MAX_LIMIT))})
