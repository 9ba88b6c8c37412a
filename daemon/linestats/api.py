"""The line-statistics API as plain functions of the config: the console mounts them under /api/
(`GET /api/stats`, `GET /api/thresholds`, `GET /api/thresholds/{camera}/{cls}/whatif`,
`PUT /api/thresholds/{camera}/{cls}`, `GET /api/health`) and the `iseg stats` / `iseg thresholds`
commands call the same ones. Bad input raises `RequestError` (HTTP 400 / CLI exit 1) with a
one-line message naming what is wrong and what would be right.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from daemon.config import DaemonConfig
from daemon.linestats.overrides import ThresholdBook, ThresholdError, check_target
from daemon.linestats.report import StatsError, build_stats, parse_since
from daemon.linestats.shifts import ShiftCalendar
from daemon.linestats.store import STORE_NAME, SummaryStore
from daemon.linestats.tap import HEALTH_FILE
from daemon.linestats.verdicts import judged
from daemon.linestats.whatif import WhatIfError, parse_range, what_if

RequestError = (ThresholdError, StatsError, WhatIfError)
"""Every error a bad request can raise (all ValueErrors with a one-line message)."""


def _calendar(config: DaemonConfig) -> ShiftCalendar:
    return ShiftCalendar(config.shifts, config.stats.timezone)


def _minutes(config: DaemonConfig, **query: Any) -> list[dict[str, Any]]:
    path = config.state_path / STORE_NAME
    if not path.is_file():
        return []
    store = SummaryStore(path, repair=False)
    try:
        return store.minutes(**query)
    finally:
        store.close()


def stats(config: DaemonConfig, camera: str | None = None, since: str = "24h", by: str = "hour",
          now: float | None = None) -> dict[str, Any]:
    """Statistics per camera/class and hour or shift over the window, with p-chart limits."""
    if camera is not None and camera not in {c.id for c in config.cameras}:
        raise StatsError(f"unknown camera {camera!r} (known: {', '.join(c.id for c in config.cameras)})")
    start = (time.time() if now is None else now) - parse_since(since)
    rows = build_stats(_minutes(config, camera=camera, since=start), judged(config.state_path, camera, start),
                       _calendar(config), by)
    return {"from": start, "by": by, "timezone": config.stats.timezone,
            "shifts": [{"name": s.name, "start": s.start} for s in config.shifts], "rows": rows}


def thresholds(config: DaemonConfig) -> dict[str, Any]:
    """Every threshold in force with its source and override, and the latest changes."""
    book = ThresholdBook(config)
    return {"thresholds": book.show(), "audit": book.audit(limit=50)}


def whatif(config: DaemonConfig, camera: str, cls: str, range_text: str = "0.1:0.9:0.01", since: str = "7d",
           now: float | None = None) -> dict[str, Any]:
    """What each candidate threshold would have done for one camera/class over the last `since`."""
    check_target(config, camera, cls)
    candidates = parse_range(range_text)
    start = (time.time() if now is None else now) - parse_since(since)
    current = next(r for r in ThresholdBook(config).show() if r["camera"] == camera and r["class"] == cls)
    result = what_if(_minutes(config, camera=camera, cls=cls, since=start), judged(config.state_path, camera, start),
                     cls, candidates, _calendar(config), config.alerts.k, config.alerts.n, config.alerts.cooldown_s)
    return {"camera": camera, "current": {"value": current["value"], "source": current["source"]}, **result}


def set_threshold(config: DaemonConfig, camera: str, cls: str, body: Mapping[str, Any], user: str) -> dict[str, Any]:
    """`PUT /api/thresholds/{camera}/{cls}` with `{"value": V, "reason": TEXT}`; returns the audit entry."""
    if not isinstance(body, Mapping) or "value" not in body:
        raise ThresholdError('body must be a JSON object {"value": number in [0, 1], "reason": text}')
    unknown = set(body) - {"value", "reason"}
    if unknown:
        raise ThresholdError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))} (known: value, reason)")
    reason = body.get("reason") or ""
    if not isinstance(reason, str):
        raise ThresholdError("reason must be text")
    return ThresholdBook(config).set(camera, cls, body["value"], user, reason)


def revert_threshold(config: DaemonConfig, camera: str, cls: str, user: str, reason: str = "") -> dict[str, Any]:
    """Undo the latest change of one threshold; returns the audit entry."""
    return ThresholdBook(config).revert(camera, cls, user, reason)


def health(config: DaemonConfig, now: float | None = None) -> dict[str, Any]:
    """Each camera's health as the publisher last reported it; 'unknown' when the report is missing or stale."""
    now = time.time() if now is None else now
    try:
        report = json.loads((config.state_path / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        report = {}
    fresh = bool(report) and now - float(report.get("ts", 0)) <= 3 * config.health.interval_s + 5
    cameras = {}
    for camera in config.cameras:
        entry = (report.get("cameras") or {}).get(camera.id) if fresh else None
        cameras[camera.id] = entry or {"camera": camera.id, "state": "unknown",
                                       "reason": "no recent health report (is the daemon running?)"}
    return {"ts": report.get("ts"), "fresh": fresh, "cameras": cameras}
