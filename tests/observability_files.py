"""Readers for the shipped Prometheus rules and Grafana dashboard, shared by the unit tests
that check the files and the end-to-end test that checks them against a live /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "configs" / "prometheus" / "iseg-rules.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "iseg-rules-test.yml"
DASHBOARD = REPO / "configs" / "grafana" / "iseg-dashboard.json"


def readme_metric_table() -> dict[str, tuple[str, set[str]]]:
    """Metric name -> (type, label names) from the README's metric table."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `iseg_") and len(cells) == 4:
            rows[cells[0].strip("`")] = (cells[1], set(re.findall(r"`([a-z_]+)`", cells[2])))
    return rows


def metric_names(expr: str) -> set[str]:
    """iseg_* metric families an expression reads (a histogram's _bucket/_sum/_count -> its name)."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\biseg_[a-z0-9_]+", expr)}


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule in the rules file."""
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard document."""
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target."""
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]
