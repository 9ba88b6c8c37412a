"""A real Prometheus (Debian's `prometheus`) scrapes a running daemon: `promtool check metrics`
passes on its /metrics, every metric the README lists is there with the README's labels, the
dashboard's and rules' metrics exist, the shipped rules load and evaluate, and what
Prometheus' HTTP API answers for `up`, the frame rate and the latency quantiles matches
the daemon's own /stats. One daemon start for all of it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import free_port
from daemon.metrics import HELP
from tests.observability_files import RULES, alert_rules, dashboard_exprs, metric_names, readme_metric_table

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(PROMETHEUS).is_file() or shutil.which("promtool") is None,
                                 reason="needs prometheus and promtool: apt-get install -y prometheus")]


class Prometheus:
    """A Prometheus server on a free loopback port with its own temp storage."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "iseg", "static_configs": [{"targets": [target]}]}]}))
        self.log_path = tmp / "prometheus.log"
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address={self.url.removeprefix('http://')}"],
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value an instant query returns (None when it returns nothing)."""
        params = {"query": expr} if at is None else {"query": expr, "time": repr(at)}
        result = self.api("query", **params)["result"]
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, predicate, timeout: float, what: str) -> float:
        """Poll an instant query until predicate(value) holds."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                value = self.value(expr)
            except OSError:
                value = None
            if value is not None and predicate(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what} ({expr} = {value});\n{self.log_path.read_text()[-3000:]}")

    def close(self) -> None:
        """Stop it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def families(exposition: str) -> dict[str, set[str]]:
    """Metric family -> label names (without `le`) from Prometheus text."""
    histograms = set(re.findall(r"^# TYPE (\S+) histogram$", exposition, re.M))
    found: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split()[0]
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        family = base if base in histograms else name
        found.setdefault(family, set()).update(re.findall(r'(\w+)="', rest.rpartition("}")[0]) if rest else [])
        found[family].discard("le")
    return found


def test_prometheus_scrapes_the_daemon(make_config, start_daemon, tmp_path):
    config = make_config()
    daemon = start_daemon(config)
    prometheus = Prometheus(tmp_path, daemon.url.removeprefix("http://"))
    try:
        daemon.wait_ready(120)
        published = lambda s: s["cameras"]["belt1"].get("published", 0)  # noqa: E731
        daemon.wait_for(lambda s: published(s) >= 8, 120, "8 frames published")

        # /metrics itself: promtool-clean, every listed metric present with the README's labels.
        status, exposition = daemon.get("/metrics")
        assert status == 200
        done = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        exposed = families(exposition)
        # No sinks and no console configured (their metrics are checked by their own e2e tests); rejects
        # appear with the first reject (their reasons are open-ended).
        expected = {name for name in HELP if not name.startswith(("iseg_sink_", "iseg_console_"))
                    and name != "iseg_rejected_messages_total"}
        assert set(exposed) == expected, f"missing {expected - set(exposed)}, unlisted {set(exposed) - expected}"
        table = readme_metric_table()
        for name, labels in exposed.items():
            assert labels == table[name][1], f"{name}: /metrics labels {labels}, README says {table[name][1]}"
        for expr in dashboard_exprs():
            assert metric_names(expr) <= set(exposed), f"dashboard panel reads a metric /metrics lacks: {expr}"
        for rule in alert_rules():
            assert metric_names(rule["expr"]) <= set(exposed) | set(HELP), rule["alert"]

        # Prometheus: the target is up and the shipped rules load and evaluate on live data.
        prometheus.wait_for('up{job="iseg"}', lambda v: v == 1, 60, "the daemon's target to be up")
        deadline = time.monotonic() + 30
        while True:
            rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
            if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
                break
            assert time.monotonic() < deadline, f"rules never evaluated: {rules}"
            time.sleep(0.5)
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

        # The frame rate: Prometheus' rate() of the frame counter against /stats and the camera's fps.
        camera_fps = yaml.safe_load(config.read_text())["cameras"][0]["fps"]
        # (15 s of samples first: the counter steps once per heartbeat, so a short window aliases.)
        prometheus.wait_for('count_over_time(iseg_capture_frames_total{camera="belt1"}[15s])',
                            lambda v: v >= 14, 60, "15 s of frame counter samples")
        rate = prometheus.value('rate(iseg_capture_frames_total{camera="belt1"}[15s])')
        stats_fps = daemon.stats()["cameras"]["belt1"]["fps"]
        assert abs(rate - stats_fps) <= max(1.0, 0.3 * stats_fps), f"Prometheus rate {rate} vs /stats fps {stats_fps}"
        assert abs(rate - camera_fps) <= 0.3 * camera_fps, f"Prometheus rate {rate} vs camera fps {camera_fps}"

        # Same snapshot on both sides (no heartbeat in between): identical counts, fps and quantiles.
        deadline = time.monotonic() + 60
        while True:
            before = daemon.stats()["cameras"]["belt1"]
            at = prometheus.value('timestamp(iseg_publisher_frames_total{camera="belt1"})')
            seen = {key: prometheus.value(expr, at) for key, expr in (
                ("published", 'iseg_dispatch_published_frames_total{camera="belt1"}'),
                ("captured", 'iseg_dispatch_captured_frames_total{camera="belt1"}'),
                ("publisher_frames", 'iseg_publisher_frames_total{camera="belt1"}'),
                ("capture_read", 'iseg_capture_frames_total{camera="belt1"}'),
                ("fps", 'iseg_capture_frames_per_second{camera="belt1"}'),
                ("latency_ms_p50", 'histogram_quantile(0.5, iseg_capture_to_publish_seconds_bucket{camera="belt1"}) * 1000'),
                ("latency_ms_p99", 'histogram_quantile(0.99, iseg_capture_to_publish_seconds_bucket{camera="belt1"}) * 1000'))}
            after = daemon.stats()["cameras"]["belt1"]
            keys = ("published", "captured", "publisher_frames", "capture_read", "fps")
            if all(before[k] == after[k] == seen[k] for k in keys):
                break
            assert time.monotonic() < deadline, f"never caught the same snapshot: {before} {seen} {after}"
            time.sleep(0.2)
        for key in ("latency_ms_p50", "latency_ms_p99"):
            assert seen[key] == pytest.approx(after[key], rel=1e-6), f"{key}: Prometheus {seen[key]}, /stats {after[key]}"
        assert 0 < seen["latency_ms_p50"] <= seen["latency_ms_p99"] < 60_000
    finally:
        prometheus.close()
