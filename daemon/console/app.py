"""The console's ASGI app and its role process (`iseg console`, or supervised by `iseg run`).

Pages are one HTML shell per URL (deep-linkable) that loads plain JS modules from
/static; no build step, no CDN, no inline script (the Content-Security-Policy forbids it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import uvicorn
import zmq
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.config import DaemonConfig
from daemon.console import api
from daemon.console.api import Console, guarded
from daemon.linestats import console_routes as linestats_routes
from daemon.metrics import Registry
from daemon.role import Heartbeat, StopFlag

STATIC = Path(__file__).parent / "static"
MAX_URL_BYTES = 4096
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                 b"connect-src 'self'; media-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                                 b"form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class Guardrails:
    """ASGI middleware: 414 for oversized URLs, 413 for oversized bodies, security headers on every
    response, request counts and durations for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Registry, max_body: int = api.MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"code": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["code"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b"")) > MAX_URL_BYTES:
            await self._reject(send_with_headers, 414, f"URL longer than {MAX_URL_BYTES} bytes")
        else:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            too_big = not length.isdigit() or int(length) > self.max_body
            if too_big:
                await self._reject(send_with_headers, 413, f"request body larger than {self.max_body} bytes")
            else:
                await self.app(scope, self._bounded(receive), send_with_headers)
        if not scope["path"].endswith((".mjpeg", "/events")):
            self.metrics.observe("iseg_console_request_seconds", time.perf_counter() - started, REQUEST_BUCKETS_S)
        self.metrics.inc("iseg_console_requests_total", code=str(status_holder["code"]))

    def _bounded(self, receive: Receive) -> Receive:
        """Stop reading a chunked body that grows past the limit."""
        seen = {"bytes": 0}

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_body:
                    message = {"type": "http.request", "body": b"", "more_body": False}
            return message
        return wrapped

    @staticmethod
    async def _reject(send: Send, status: int, text: str) -> None:
        response = JSONResponse({"error": text}, status_code=status)
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def page(name: str) -> Any:
    """A page route: the shell HTML for logged-in users, the login page otherwise."""
    @guarded("viewer", page=True)
    async def serve(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
    serve.__name__ = f"page_{name}"
    return serve


async def login_page(_request: Request) -> Response:
    """The login form (the only page without a session)."""
    return FileResponse(STATIC / "login.html", headers={"Cache-Control": "no-store"})


async def root(_request: Request) -> Response:
    """/ is the live wall."""
    return RedirectResponse("/live", status_code=303)


async def not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths: JSON for the API, a short text for the rest; never a stack trace."""
    status = getattr(exc, "status_code", 404)
    message = getattr(exc, "detail", "") or "not found"
    if status == 404:
        message = f"no such path {request.url.path[:200]}"
    return JSONResponse({"error": message}, status_code=status)


def build_app(console: Console) -> Starlette:
    """The whole console app around a Console (whose background tasks run while the app lives)."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        console.open_writers()
        tasks = [asyncio.create_task(coro) for coro in background(console)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            console.close()

    routes = [
        Route("/", root),
        Route("/login", login_page),
        Route("/live", page("live")),
        Route("/cameras/{camera:str}", page("camera")),
        Route("/alerts", page("alerts")),
        Route("/review", page("review")),
        Route("/review/{recording_id:int}", page("review_one")),
        Route("/health", page("health")),
        Route("/trends", page("trends")),
        Route("/thresholds", page("thresholds")),
        *linestats_routes.ROUTES,
        Route("/api/login", api.login, methods=["POST"]),
        Route("/api/logout", api.logout, methods=["POST"]),
        Route("/api/me", api.me),
        Route("/api/cameras", api.cameras),
        Route("/api/cameras/{camera:str}/latest.jpg", api.latest_jpeg),
        Route("/api/cameras/{camera:str}/live.mjpeg", api.live_mjpeg),
        Route("/api/cameras/{camera:str}/mask.png", api.latest_mask),
        Route("/api/alerts", api.alerts),
        Route("/api/alerts/{alert_id:int}/ack", api.ack_alert, methods=["POST"]),
        Route("/api/events", api.events),
        Route("/api/recordings", api.recordings),
        Route("/api/recordings/{recording_id:int}", api.recording),
        Route("/api/recordings/{recording_id:int}/verdict", api.verdict, methods=["POST"]),
        Route("/api/recordings/{recording_id:int}/{kind:str}", api.recording_image),
        Route("/api/health", api.health),
        Route("/api/audit", api.audit),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found, 404: not_found})
    app.state.console = console
    return Guardrails(app, console.metrics)  # type: ignore[return-value]


def background(console: Console) -> list[Any]:
    """The console's long-running tasks: SUB reader, /stats poller, alert and status watchers."""
    return [console.live.read_frames(), console.live.poll_stats(), watch_alerts(console), watch_cameras(console)]


async def watch_alerts(console: Console, interval_s: float = 0.5) -> None:
    """New rows of the alert store → `alert` events (the store is the source of truth, in id order)."""
    last = console.alerts.last_id()
    while True:
        await asyncio.sleep(interval_s)
        try:
            fresh = console.alerts.query(since=last, limit=api.MAX_LIMIT)
        except Exception as err:  # noqa: BLE001 - a locked or rotating store must not end the watcher
            console.log.warning("reading the alert store failed: %s", err)
            continue
        for alert in api.with_acks(console, fresh):
            last = alert["id"]
            console.metrics.inc("iseg_console_alerts_pushed_total")
            console.hub.publish("alert", alert, alert["id"])


async def watch_cameras(console: Console, interval_s: float = 1.0) -> None:
    """Camera status changes → `camera` events."""
    while True:
        for change in console.live.update_status():
            console.log.info("camera %s: %s → %s", change["camera"], change["old"], change["status"])
            console.hub.publish("camera", change)
        await asyncio.sleep(interval_s)


def run_console(config: DaemonConfig, stop: StopFlag) -> int:
    """Console process body: serve until SIGTERM, with a heartbeat to the supervisor."""
    log = logging.getLogger("iseg.console")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "console", "console", metrics, stop).start()
    console = Console(config, metrics, log)
    c = config.console
    server = uvicorn.Server(uvicorn.Config(
        build_app(console), host=c.host, port=c.port, log_level="warning", access_log=False,
        ssl_certfile=config.resolve(c.tls_cert) if c.tls_cert else None,
        ssl_keyfile=config.resolve(c.tls_key) if c.tls_key else None, lifespan="on", timeout_graceful_shutdown=2))

    async def serve() -> None:
        async def supervise() -> None:
            while not server.started:
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else c.port
            url = f"{'https' if c.tls else 'http'}://{c.host}:{port}"
            config.run_path.mkdir(parents=True, exist_ok=True)
            (config.run_path / "console.url").write_text(url)
            log.info("console at %s (users file %s)", url, console.users_path)
            heartbeat.update(ready=True, url=url)
            while not stop.stopping:
                heartbeat.progress()
                heartbeat.update(viewers=console.viewers, event_clients=len(console.hub.queues))
                await asyncio.sleep(0.5)
            server.should_exit = True

        watcher = asyncio.create_task(supervise())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    try:
        asyncio.run(serve())
    finally:
        heartbeat.stop()
        ctx.term()
    if not server.started and not stop.stopping:
        log.error("console could not listen on %s", c.listen)
        return 1
    log.info("console stopped (%s)", stop.signal_name or "done")
    return 0
