"""The line-statistics routes of the operator console, under its auth: the handlers of
`daemon.linestats.api` run in a worker thread (what-if over a week takes seconds), and a bad
request is a 400 whose `error` names what is wrong and what would be right."""

from __future__ import annotations

from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.console.api import console_of, error, guarded, json_body
from daemon.linestats import api

QUERY_MAX = 64


def _query(request: Request, name: str, default: str | None) -> str | None:
    value = request.query_params.get(name)
    return default if value in (None, "") else value[:QUERY_MAX]


async def _answer(call: Callable[[], Any]) -> Response:
    try:
        return JSONResponse(await run_in_threadpool(call))
    except api.RequestError as err:
        return error(400, str(err))


@guarded("viewer")
async def stats(request: Request) -> Response:
    """GET /api/stats?camera=&since=24h&by=hour|shift: frames, flagged, alerts, verdicts and p-chart limits."""
    config = console_of(request).config
    return await _answer(lambda: api.stats(config, _query(request, "camera", None), _query(request, "since", "24h"),
                                           _query(request, "by", "hour")))


@guarded("viewer")
async def thresholds(request: Request) -> Response:
    """GET /api/thresholds: every threshold in force, its source and override, and the latest changes."""
    config = console_of(request).config
    return await _answer(lambda: api.thresholds(config))


@guarded("viewer")
async def whatif(request: Request) -> Response:
    """GET /api/thresholds/{camera}/{cls}/whatif?range=0.1:0.9:0.01&since=7d."""
    config = console_of(request).config
    camera, cls = request.path_params["camera"], request.path_params["cls"]
    return await _answer(lambda: api.whatif(config, camera, cls, _query(request, "range", "0.1:0.9:0.01"),
                                            _query(request, "since", "7d")))


@guarded("operator")
async def set_threshold(request: Request) -> Response:
    """PUT /api/thresholds/{camera}/{cls} {"value": V, "reason": TEXT}: a live, audited override."""
    console = console_of(request)
    camera, cls = request.path_params["camera"], request.path_params["cls"]
    body = await json_body(request)
    user = request.state.user.name
    response = await _answer(lambda: api.set_threshold(console.config, camera, cls, body, user))
    if response.status_code == 200:
        console.log.info("threshold %s/%s set to %s by %s", camera, cls, body.get("value"), user)
    return response


ROUTES = [
    Route("/api/stats", stats),
    Route("/api/thresholds", thresholds),
    Route("/api/thresholds/{camera:str}/{cls:str}/whatif", whatif),
    Route("/api/thresholds/{camera:str}/{cls:str}", set_threshold, methods=["PUT"]),
]
"""Mounted by daemon.console.app next to the console's own routes."""
