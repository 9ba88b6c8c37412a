"""The `sinks` part of the supervisor's /stats: per sink, totals across restarts plus live state."""

from __future__ import annotations

from typing import Any, Iterable

from daemon.metrics import parse_labels

COUNTERS = {"iseg_sink_delivered_total": "delivered", "iseg_sink_retries_total": "retries",
            "iseg_sink_failures_total": "failures"}


def sink_stats(merged: dict[str, Any], heartbeats: Iterable[dict[str, Any] | None], sinks: Iterable[Any]) -> dict[str, Any]:
    """`delivered`, `retries`, `failures` (merged counters, so restarts do not reset them), and
    `lag_seconds`, `last_error`, `state`, `cursor`, `dead_letters` from the sinks role's heartbeat;
    a sink whose role is silent is reported `down`."""
    out: dict[str, dict[str, Any]] = {}
    for sink in sinks:
        out[sink.name] = {"type": sink.type, "delivered": 0, "retries": 0, "failures": 0, "lag_seconds": None,
                          "last_error": "", "state": "down", "cursor": None, "dead_letters": None}
    for metric, key in COUNTERS.items():
        for labels, value in merged["counters"].get(metric, {}).items():
            name = parse_labels(labels).get("sink")
            if name in out:
                out[name][key] = int(value)
    for heartbeat in heartbeats:
        live = ((heartbeat or {}).get("state") or {}).get("sinks") or {}
        for name, snapshot in live.items():
            if name in out:
                out[name].update({k: snapshot.get(k) for k in ("lag_seconds", "last_error", "state", "cursor",
                                                              "dead_letters")})
    return out
