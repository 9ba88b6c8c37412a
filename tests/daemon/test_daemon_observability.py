"""The shipped Prometheus alerting rules (promtool check + promtool unit tests) and the
Grafana dashboard's structure; tests/e2e/test_e2e_prometheus.py checks both against a live daemon."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from daemon.metrics import HELP
from tests.observability_files import RULE_TESTS, RULES, alert_rules, dashboard, dashboard_exprs, metric_names

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool: apt-get install -y prometheus")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_rules_pass_promtool_check():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


@needs_promtool
def test_rule_unit_tests_pass():
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_is_complete_and_has_a_firing_and_a_quiet_case():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    required = {"IsegCameraDisconnected", "IsegCameraStalled", "IsegFramesDropped", "IsegWorkerNotReady",
                "IsegRoleRestarting", "IsegLatencyHigh", "IsegRecorderDiskFull", "IsegSinkDown"}
    assert required <= set(names) and len(names) == len(set(names))
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: needs a for: duration"
        summary = rule.get("annotations", {}).get("summary", "")
        assert len(summary) > 40 and "." in summary.rstrip("."), f"{rule['alert']}: summary must say what is wrong and what to do"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), rule["alert"]
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for name in names:
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name}: no promtool case where it fires"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name}: no case where it stays quiet"


def test_rules_and_dashboard_read_only_exposed_metrics():
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= set(HELP), f"{rule['alert']} reads an unknown metric"
    for expr in dashboard_exprs():
        assert metric_names(expr) and metric_names(expr) <= set(HELP), f"panel query reads an unknown metric: {expr}"


def test_dashboard_is_importable_and_covers_the_line():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    assert [i["pluginId"] for i in board["__inputs"]] == ["prometheus"]
    variables = {v["name"] for v in board["templating"]["list"]}
    ids, used = set(), set()
    for panel in board["panels"]:
        assert panel["id"] not in ids, f"panel id {panel['id']} twice"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "bargauge") and panel["title"], panel
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            used |= set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
    assert used and used <= variables, f"queries use undefined variables {used - variables}"
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    wanted = {"iseg_capture_frames_total", "iseg_capture_dropped_frames_total", "iseg_capture_to_publish_seconds",
              "iseg_alerts_total", "iseg_worker_batch_seconds", "iseg_worker_ready", "iseg_role_up",
              "iseg_role_restarts_total"}
    assert wanted <= shown, f"dashboard lacks {wanted - shown}"
