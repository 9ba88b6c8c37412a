"""The unit files pass `systemd-analyze verify` with no warnings, and say what the issue asks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def unit_settings(name: str) -> dict[str, str]:
    settings = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_service_is_notify_with_watchdog_state_and_hardening():
    s = unit_settings("iseg.service")
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    assert int(s["WatchdogSec"]) > 0 and s["StateDirectory"] == "iseg" and s["RuntimeDirectory"] == "iseg"
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["CapabilityBoundingSet"] == ""
    assert "iseg run --config" in s["ExecStart"]
    w = unit_settings("iseg-worker@.service")
    assert "worker --remote" in w["ExecStart"]
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in (UNITS / "iseg-worker@.service").read_text()


PLANT_UNITS = {"iseg-dispatch.service": "iseg dispatch --config", "iseg-capture@.service": "iseg capture --camera %i",
               "iseg-publisher.service": "iseg publish --config", "iseg-publisher-backup.service": "iseg publish --backup"}


def test_plant_units_run_their_role_hardened():
    for name, command in PLANT_UNITS.items():
        s = unit_settings(name)
        assert command in s["ExecStart"], name
        assert s["StateDirectory"] == "iseg" and s["NoNewPrivileges"] == "yes" and s["CapabilityBoundingSet"] == "", name
    assert "iseg-dispatch.service" in unit_settings("iseg-capture@.service")["After"]


def test_config_errors_are_not_restarted_by_systemd():
    from daemon.role import EX_CONFIG

    for name in ("iseg.service", "iseg-worker@.service", *PLANT_UNITS):
        assert unit_settings(name)["RestartPreventExitStatus"] == str(EX_CONFIG), name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze: apt-get install -y systemd")
def test_units_verify_cleanly(tmp_path):
    # verify checks that ExecStart binaries exist: point them at this interpreter.
    instances = [("iseg.service", "iseg.service"), ("iseg-worker@.service", "iseg-worker@0.service"),
                 ("iseg-capture@.service", "iseg-capture@press1.service")]
    instances += [(name, name) for name in PLANT_UNITS if "@" not in name]
    for name, instance in instances:
        text = (UNITS / name).read_text().replace("/opt/iseg/venv/bin/iseg", sys.executable)
        (tmp_path / instance).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / instance) for _, instance in instances)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr + done.stdout
