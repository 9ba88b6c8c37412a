"""Metrics: Prometheus text format, and totals that merge across roles."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.metrics import HELP, Registry, parse_labels, quantile_from_histogram, render_prometheus
from daemon.publisher import Publisher
from daemon.role import StopFlag
from daemon.supervisor import Supervisor
from daemon.messages import Result
from tests.observability_files import readme_metric_table


def test_render_counters_gauges_histograms_merged():
    capture, worker_a, worker_b = Registry(), Registry(), Registry()
    capture.inc("iseg_capture_frames_total", 5, camera="a")
    capture.set("iseg_capture_frames_per_second", 2.5, camera="a")
    worker_a.inc("iseg_worker_frames_total", 3, camera="a")
    worker_b.inc("iseg_worker_frames_total", 4, camera="a")
    for value in (0.007, 0.04, 0.4):
        worker_a.observe("iseg_worker_inference_seconds", value, camera="a")
    text = render_prometheus([capture.snapshot(), worker_a.snapshot(), worker_b.snapshot()])
    assert "# TYPE iseg_capture_frames_total counter" in text
    assert 'iseg_capture_frames_total{camera="a"} 5' in text
    assert 'iseg_worker_frames_total{camera="a"} 7' in text
    assert 'iseg_capture_frames_per_second{camera="a"} 2.5' in text
    assert "# TYPE iseg_worker_inference_seconds histogram" in text
    assert 'iseg_worker_inference_seconds_bucket{camera="a",le="0.01"} 1' in text
    assert 'iseg_worker_inference_seconds_bucket{camera="a",le="0.05"} 2' in text
    assert 'iseg_worker_inference_seconds_bucket{camera="a",le="+Inf"} 3' in text
    assert 'iseg_worker_inference_seconds_count{camera="a"} 3' in text
    assert 'iseg_worker_inference_seconds_sum{camera="a"} 0.447' in text
    assert text.endswith("\n")


def test_labels_and_quantiles():
    registry = Registry()
    registry.inc("x_total", camera='we"ird', **{"class": "dent"})
    key = next(iter(registry.snapshot()["counters"]["x_total"]))
    assert parse_labels(key) == {"camera": 'we"ird', "class": "dent"}
    for value in range(1, 101):
        registry.observe("lat", value * 0.01, buckets=(0.1, 0.5, 1.0))
    hist = registry.snapshot()["histograms"]["lat"][""]
    # Prometheus' estimate: 50 of 100 observations -> in (0.1, 0.5] holding the 11th..50th -> its top;
    # 99 -> the 99th of (0.5, 1.0] holding the 51st..100th: 0.5 + 0.5 * 49/50.
    assert quantile_from_histogram(hist, 0.5) == 0.5
    assert abs(quantile_from_histogram(hist, 0.99) - 0.99) < 1e-9
    assert abs(quantile_from_histogram(hist, 0.05) - 0.05) < 1e-9, "linear within the first bucket, from 0"
    registry.observe("lat", 5.0, buckets=(0.1, 0.5, 1.0))
    registry.observe("lat", 5.0, buckets=(0.1, 0.5, 1.0))
    hist = registry.snapshot()["histograms"]["lat"][""]
    assert quantile_from_histogram(hist, 0.999) == 1.0, "in the +Inf bucket: the top finite bound, as Prometheus"
    assert quantile_from_histogram({"bounds": [1.0], "counts": [0], "sum": 0, "count": 0}, 0.5) is None


REPO = Path(__file__).resolve().parents[2]
CALL = re.compile(r'\.(inc|set|observe)\(\s*"(iseg_[a-z0-9_]+)"')
LITERAL = re.compile(r'"(iseg_[a-z0-9_]+)"')
KIND = {"inc": "counter", "set": "gauge", "observe": "histogram"}
# Unit abbreviations Prometheus' naming rules forbid (promtool knows some; fps, pct and the like too).
ABBREVIATIONS = {"ms", "us", "ns", "s", "sec", "secs", "min", "h", "kb", "mb", "gb", "b", "fps", "pct", "perc"}


def metric_kinds() -> dict[str, str]:
    """Every metric name the daemon's code uses, with the kind its calls give it."""
    kinds: dict[str, str] = {}
    texts = [source.read_text() for source in sorted((REPO / "daemon").rglob("*.py"))]
    for text in texts:  # calls first: a bare name elsewhere (HELP) must not fix the kind before its call is seen
        for call, name in CALL.findall(text):
            assert kinds.get(name, KIND[call]) == KIND[call], f"{name} is used as two kinds of metric"
            kinds[name] = KIND[call]
    for text in texts:
        for name in LITERAL.findall(text):
            kinds.setdefault(name, "counter" if name.endswith("_total") else "gauge")
    return kinds


def test_metric_names_follow_prometheus_conventions():
    kinds = metric_kinds()
    assert set(kinds) - set(HELP) == set(), "every metric needs help text in daemon/metrics.py HELP"
    # Sink metrics are defined ahead of the sinks role (the rules file alerts on them).
    unused = {name for name in set(HELP) - set(kinds) if not name.startswith("iseg_sink_")}
    assert unused == set(), "HELP lists metrics nothing sets"
    for name in HELP:
        kind = kinds.get(name, "counter" if name.endswith("_total") else "gauge")
        assert re.fullmatch(r"iseg_[a-z][a-z0-9]*(_[a-z0-9]+)+", name), name
        assert not set(name.split("_")) & ABBREVIATIONS, f"{name}: spell units out in base units (seconds, bytes)"
        assert not re.search(r"milli|micro|nano|kilo|mega|minutes|hours|percent", name), f"{name}: use base units"
        assert name.endswith("_total") == (kind == "counter"), f"{name} ({kind}): counters and only counters end in _total"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: latency histograms are in seconds"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool: apt-get install -y prometheus")
def test_promtool_accepts_every_metric():
    registry = Registry()
    for name, kind in metric_kinds().items():
        if kind == "counter":
            registry.inc(name, 3, camera="a")
        elif kind == "gauge":
            registry.set(name, 1, camera="a")
        else:
            registry.observe(name, 0.3, camera="a")
    text = render_prometheus([registry.snapshot()])
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# TYPE iseg_capture_to_publish_seconds histogram" in text


def test_readme_metric_table_lists_every_metric():
    table = readme_metric_table()
    assert set(table) == set(HELP), f"README metric table vs daemon/metrics.py HELP: {set(table) ^ set(HELP)}"
    kinds = metric_kinds()
    for name, (kind, _labels) in table.items():
        assert kind == kinds.get(name, "counter" if name.endswith("_total") else "gauge"), f"README type of {name}"


def test_publisher_gap_counters_never_decrease(tmp_path):
    config = parse_config({"state_dir": str(tmp_path), "engine": {"model_dir": "m"},
                           "cameras": [{"id": "cam", "source": "synthetic"}]})
    metrics = Registry()
    publisher = Publisher(config, metrics, logging.getLogger("test"))
    seen = []
    for seq in (0, 3, 1, 2, 4):  # 1 and 2 arrive late, after 3
        publisher.handle(Result(camera="cam", seq=seq, ts=time.time(), session="s", roi=[0, 0], worker="w", ok=False), None)
        seen.append((metrics.counter("iseg_publisher_gap_frames_total", camera="cam"),
                     metrics.counter("iseg_publisher_late_frames_total", camera="cam")))
    publisher.store.close()
    assert seen == [(0, 0), (2, 0), (2, 1), (2, 2), (2, 2)]
    assert metrics.counter("iseg_publisher_failed_frames_total", camera="cam") == 5


class RunningProcess:
    """Stands in for a live Popen: the supervisor only asks it for pid and poll()."""

    pid = 4242

    def poll(self) -> None:
        return None


def test_supervisor_series_exist_before_any_event(tmp_path):
    config = parse_config({"state_dir": str(tmp_path), "engine": {"model_dir": "m"}, "worker": {"count": 1},
                           "cameras": [{"id": "cam", "source": "synthetic"}]})
    supervisor = Supervisor(config, StopFlag())
    worker = next(role for role in supervisor.roles if role.role == "worker")
    gauge = lambda: supervisor.metrics.snapshot()["gauges"]["iseg_worker_ready"]['worker="worker.0"']  # noqa: E731
    supervisor._update_readiness()
    assert gauge() == 0, "a worker that has not reported yet is not ready (and the series exists)"
    worker.proc, worker.heartbeat, worker.heard_at = RunningProcess(), {"state": {"ready": True}}, time.time()
    supervisor._update_readiness()
    assert gauge() == 1
    worker.heard_at = time.time() - config.supervisor.heartbeat_timeout_s - 1
    supervisor._update_readiness()
    assert gauge() == 0, "a silent worker is not ready"
    restarts = supervisor.metrics.snapshot()["counters"]["iseg_role_restarts_total"]
    assert restarts == {f'role="{role.name}"': 0 for role in supervisor.roles}
