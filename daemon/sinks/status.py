"""The sinks role's live state in its heartbeat, and the `sinks` part of the supervisor's /stats.

Heartbeat state is flat (scalars only, at most 64 keys, checked by the supervisor), so each
sink's snapshot travels as `sink.<name>.<field>` keys.
"""

from __future__ import annotations

from typing import Any, Iterable

from daemon.metrics import parse_labels

LIVE_FIELDS = ("state", "last_error", "lag_seconds", "cursor", "dead_letters")
MAX_ERROR_CHARS = 500
COUNTERS = {"iseg_sink_delivered_total": "delivered", "iseg_sink_retries_total": "retries",
            "iseg_sink_failures_total": "failures"}


def heartbeat_fields(snapshots: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flat heartbeat state for the sinks' snapshots."""
    out: dict[str, Any] = {}
    for name, snapshot in snapshots.items():
        for field in LIVE_FIELDS:
            value = snapshot.get(field)
            out[f"sink.{name}.{field}"] = value[:MAX_ERROR_CHARS] if isinstance(value, str) else value
    return out


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
        state = (heartbeat or {}).get("state") or {}
        for name, entry in out.items():
            if f"sink.{name}.state" in state:
                entry.update({field: state.get(f"sink.{name}.{field}") for field in LIVE_FIELDS})
    return out
