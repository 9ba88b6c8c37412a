"""Counters, gauges and histograms that roles keep and the supervisor serves as Prometheus text.

Each role owns a Registry; its heartbeat carries `snapshot()` (plain JSON) to the
supervisor, which merges the latest snapshot of every role and renders `/metrics`.
No client library: the text format is simple and this keeps roles free of globals.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Iterable

# Seconds, as Prometheus' conventions ask (base units): 5 ms (a GPU batch) to a minute
# (a loaded CPU), in 1-2-5 steps so p50/p99 land in a bucket of their own size.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)

# Every metric the daemon exposes, with its help text. Names follow Prometheus' rules:
# iseg_<role>_<what>_<unit>, base units (seconds, bytes), counters end in _total, no unit
# abbreviations; the README's metric table lists the same names (a test keeps them in step).
HELP = {
    "iseg_capture_frames_total": "Frames read from the camera (sent plus dropped).",
    "iseg_capture_dropped_frames_total": "Frames dropped because every worker queue was full.",
    "iseg_capture_reconnects_total": "Reconnect attempts after a camera error or stall.",
    "iseg_capture_frames_per_second": "Frames per second read from the camera over the last 5 seconds.",
    "iseg_capture_connected": "1 while the camera source is open, 0 while it is being reconnected.",
    "iseg_worker_frames_total": "Frames segmented by a worker.",
    "iseg_worker_failed_frames_total": "Frames a worker could not segment (logged, skipped).",
    "iseg_worker_unsent_results_total": "Results a worker could not hand to the publisher (its queue was full).",
    "iseg_worker_batches_total": "Engine batches run.",
    "iseg_worker_batch_seconds": "Seconds one engine batch took on a worker (all frames of the batch).",
    "iseg_worker_inference_seconds": "Engine seconds per frame, by camera.",
    "iseg_worker_ready": "1 once the worker's model is loaded and every class set's embedding is cached.",
    "iseg_publisher_frames_total": "Frame results published.",
    "iseg_dispatch_captured_frames_total": "Frames that reached the dispatcher from capture, plus those capture "
                                           "skipped on its way there.",
    "iseg_dispatch_dropped_frames_total": "Frames dropped at admission: never handed to a worker (queue full, "
                                          "too old waiting for a free worker slot).",
    "iseg_dispatch_published_frames_total": "Frames whose result the publisher acknowledged (stored; failed "
                                            "frames included).",
    "iseg_dispatch_resent_frames_total": "Frames sent again to another worker (worker lost, result not "
                                         "acknowledged, publisher changed).",
    "iseg_dispatch_lost_frames_total": "Frames admitted to a worker that ended with no result, by reason "
                                       "(each also logged and written to lost-frames.jsonl).",
    "iseg_dispatch_in_flight_frames": "Frames captured and not yet published, dropped or lost.",
    "iseg_dispatch_workers": "Workers connected to the dispatcher and heartbeating.",
    "iseg_dispatch_workers_lost_total": "Workers declared lost after missing heartbeats for "
                                        "dispatch.worker_timeout_ms.",
    "iseg_dispatch_leader_epoch": "Epoch of the publisher the dispatcher sends results to (0: none yet).",
    "iseg_publisher_duplicate_frames_total": "Results of frames already handled (a re-sent frame's second "
                                             "result): acknowledged again, not published.",
    "iseg_publisher_unled_results_total": "Results not handled because this publisher does not lead (backup, "
                                          "fenced or lease expired); the dispatcher re-sends those frames.",
    "iseg_publisher_leading": "1 while this publisher leads (publishes and acknowledges results).",
    "iseg_publisher_epoch": "This publisher's epoch, the fencing number of its turn as leader.",
    "iseg_publisher_failed_frames_total": "Frames reported failed by a worker.",
    "iseg_publisher_gap_frames_total":
        "Frames skipped in the sequence when a later frame arrived (late or lost; with dispatch the sequence "
        "is of admitted frames, so frames dropped at admission are no gap).",
    "iseg_publisher_late_frames_total":
        "Frames that arrived after a later one, filling a gap counted before; gap minus late is lost.",
    "iseg_capture_to_publish_seconds": "Seconds from frame capture to its result being published.",
    "iseg_alerts_total": "Alerts raised (after debouncing), persisted and published.",
    "iseg_flagged_frames_total": "Frames with at least one class above its threshold.",
    "iseg_recorder_frames_total": "Flagged frames written to the state directory.",
    "iseg_recorder_disk_full_total": "Flagged frames not written because the disk was full.",
    "iseg_recorder_write_errors_total": "Flagged frames whose write failed.",
    "iseg_recorder_deleted_total": "Recordings deleted by retention.",
    "iseg_recorder_missed_total": "Flagged frames the recorder never received (subscriber lag).",
    "iseg_rejected_messages_total": "Messages a role rejected at its socket boundary, by socket and reason.",
    "iseg_alerts_pending": "Alerts published but held in memory because the alert store cannot be written.",
    "iseg_alert_store_errors_total": "Failed writes to the alert store (full disk, SQLite error).",
    "iseg_alerts_unstored_total": "Alerts published but never stored (memory hold was full).",
    "iseg_publisher_state_errors_total": "Failed saves of the publisher's restart state (cooldowns, sequences).",
    "iseg_role_degraded": "1 while a role runs but cannot do its job (e.g. disk full); its reason is in /stats.",
    "iseg_camera_health_state": "1 for the camera's current health state (ok, frozen, defocus, exposure, "
                                "presence_drift, unreliable), 0 for the others.",
    "iseg_worker_self_tests_total": "Golden-sample self-tests run by a worker, by result (pass, fail).",
    "iseg_publisher_linestats_dropped_frames_total": "Frames left out of the summary store because its writer "
                                                     "fell behind.",
    "iseg_role_up": "1 while the role's process runs, its heartbeat is fresh and it is not degraded.",
    "iseg_role_restarts_total": "Times the supervisor restarted a role.",
    "iseg_sink_state": "1 for the sink's current state (ok, degraded or down), 0 for the others.",
    "iseg_sink_delivered_total": "Alerts a sink delivered.",
    "iseg_sink_retries_total": "Delivery attempts a sink retried.",
    "iseg_sink_failures_total": "Delivery attempts that failed.",
    "iseg_sink_lag_seconds": "Age of the oldest alert a sink has not delivered yet (0 when caught up).",
    "iseg_console_requests_total": "HTTP requests the console answered, by status code.",
    "iseg_console_request_seconds": "Seconds the console took per request (live streams and events excluded).",
    "iseg_console_logins_total": "Console login attempts, by result (ok, failed, limited).",
    "iseg_console_live_viewers": "Live MJPEG streams open on the console.",
    "iseg_console_event_clients": "Server-sent event streams open on the console.",
    "iseg_console_frames_received_total": "Overlays the console received from the publisher (it keeps the newest).",
    "iseg_console_live_frames_sent_total": "Overlays the console sent to live viewers.",
    "iseg_console_alerts_pushed_total": "Alerts the console pushed to its event streams.",
    "iseg_console_acks_total": "Alerts acknowledged in the console.",
    "iseg_console_verdicts_total": "Recording verdicts made in the console, by verdict.",
    "iseg_sink_dead_letters": "Alerts a receiver refused for good, kept for `iseg sinks resend`.",
}


def _key(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))


def render_labels(labels: dict[str, str]) -> str:
    """The series key a Registry uses for these labels (sorted, escaped), for code that edits snapshots."""
    return _key(labels)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Registry:
    """Thread-safe metric values of one role (the heartbeat thread reads while the loop writes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, float]] = {}
        self._gauges: dict[str, dict[str, float]] = {}
        self._histograms: dict[str, dict[str, dict[str, Any]]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = _key(labels)
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        with self._lock:
            self._gauges.setdefault(name, {})[_key(labels)] = float(value)

    def observe(self, name: str, value: float, buckets: Iterable[float] = LATENCY_BUCKETS_S, **labels: str) -> None:
        """Record one observation in a histogram."""
        with self._lock:
            series = self._histograms.setdefault(name, {})
            key = _key(labels)
            hist = series.get(key)
            if hist is None:
                bounds = list(buckets)
                hist = series[key] = {"bounds": bounds, "counts": [0] * len(bounds), "sum": 0.0, "count": 0}
            for i, bound in enumerate(hist["bounds"]):
                if value <= bound:
                    hist["counts"][i] += 1
            hist["sum"] += value
            hist["count"] += 1

    def counter(self, name: str, **labels: str) -> float:
        """Current value of one counter series (0 when never incremented)."""
        with self._lock:
            return self._counters.get(name, {}).get(_key(labels), 0.0)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe copy of every series."""
        with self._lock:
            return {
                "counters": {n: dict(s) for n, s in self._counters.items()},
                "gauges": {n: dict(s) for n, s in self._gauges.items()},
                "histograms": {n: {k: {**h, "counts": list(h["counts"])} for k, h in s.items()}
                               for n, s in self._histograms.items()},
            }


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum counters and histograms across roles (two workers both count frames); gauges: last wins."""
    merged: dict[str, Any] = {"counters": {}, "gauges": {}, "histograms": {}}
    for snap in snapshots:
        for name, series in snap.get("counters", {}).items():
            target = merged["counters"].setdefault(name, {})
            for key, value in series.items():
                target[key] = target.get(key, 0.0) + value
        for name, series in snap.get("gauges", {}).items():
            merged["gauges"].setdefault(name, {}).update(series)
        for name, series in snap.get("histograms", {}).items():
            target = merged["histograms"].setdefault(name, {})
            for key, hist in series.items():
                if key not in target:
                    target[key] = {**hist, "counts": list(hist["counts"])}
                else:
                    into = target[key]
                    into["counts"] = [a + b for a, b in zip(into["counts"], hist["counts"])]
                    into["sum"] += hist["sum"]
                    into["count"] += hist["count"]
    return merged


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_prometheus(snapshots: Iterable[dict[str, Any]]) -> str:
    """Prometheus text exposition (version 0.0.4) of the merged snapshots."""
    merged = merge(snapshots)
    lines: list[str] = []
    for kind, section in (("counter", "counters"), ("gauge", "gauges")):
        for name in sorted(merged[section]):
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(merged[section][name].items()):
                lines.append(f"{name}{{{key}}} {_number(value)}" if key else f"{name} {_number(value)}")
    for name in sorted(merged["histograms"]):
        lines.append(f"# HELP {name} {HELP.get(name, name)}")
        lines.append(f"# TYPE {name} histogram")
        for key, hist in sorted(merged["histograms"][name].items()):
            sep = "," if key else ""
            for bound, count in zip(hist["bounds"], hist["counts"]):
                lines.append(f'{name}_bucket{{{key}{sep}le="{_number(bound)}"}} {count}')
            lines.append(f'{name}_bucket{{{key}{sep}le="+Inf"}} {hist["count"]}')
            suffix = f"{{{key}}}" if key else ""
            lines.append(f"{name}_sum{suffix} {_number(hist['sum'])}")
            lines.append(f"{name}_count{suffix} {hist['count']}")
    return "\n".join(lines) + "\n"


def parse_labels(key: str) -> dict[str, str]:
    """Inverse of the series key, for /stats JSON."""
    labels = {}
    for part in filter(None, key.split('",')):
        name, _, value = part.partition('="')
        labels[name] = value.rstrip('"').replace('\\"', '"').replace("\\\\", "\\")
    return labels


def quantile_from_histogram(hist: dict[str, Any], q: float) -> float | None:
    """Quantile q estimated as Prometheus' histogram_quantile does (linear within the bucket,
    the top finite bound when it falls in +Inf), so /stats and dashboards show the same figure."""
    total = hist["count"]
    if not total:
        return None
    target = q * total
    lower, below = 0.0, 0
    for bound, count in zip(hist["bounds"], hist["counts"]):
        if count >= target:
            if count == below:
                return float(bound)
            return lower + (bound - lower) * (target - below) / (count - below)
        lower, below = float(bound), count
    return float(hist["bounds"][-1]) if hist["bounds"] else math.nan
