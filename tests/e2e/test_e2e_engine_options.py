"""The daemon's engine options as real processes.

ONNX backend: `iseg export-onnx` writes the graphs, `engine.backend: onnx` makes the
worker run them, frames flow and alert; an export that does not match the config stops
the daemon at once with EX_CONFIG (78) and the fix in the log, instead of restarting a
worker that can never start. `engine.compile`: the worker compiles and warms every batch
size before it reports ready, then serves frames."""

from __future__ import annotations

import pytest

from conftest import iseg

from daemon.role import EX_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_daemon_runs_on_an_exported_onnx_graph(make_config, start_daemon, tiny_model, tmp_path):
    exported = tmp_path / "onnx"
    done = iseg("export-onnx", "--model", str(tiny_model), "--out", str(exported), "--size", "128", timeout=240)
    assert done.returncode == 0, done.stderr
    assert (exported / "manifest.json").is_file()

    config = make_config({"engine": {"backend": "onnx", "onnx_dir": str(exported)}})
    daemon = start_daemon(config)
    stats = daemon.wait_ready(150)
    worker = stats["roles"]["worker.0"]["state"]
    assert worker["backend"] == "onnx" and worker["cuda_graphs"] is False, worker
    daemon.wait_for(lambda s: s["cameras"]["belt1"].get("published", 0) >= 6 and s["cameras"]["belt1"].get("alerts", 0) >= 1,
                    90, "frames published and an alert from the ONNX worker")
    assert "backend onnx" in daemon.tail(200)
    assert daemon.terminate() == 0


def test_mismatched_export_stops_the_daemon_without_restart_loops(make_config, start_daemon, tiny_model, tmp_path):
    exported = tmp_path / "onnx-256"
    done = iseg("export-onnx", "--model", str(tiny_model), "--out", str(exported), "--size", "256", timeout=240)
    assert done.returncode == 0, done.stderr
    config = make_config({"engine": {"backend": "onnx", "onnx_dir": str(exported)}})
    done = iseg("validate-config", str(config))
    assert done.returncode == 0, done.stderr
    daemon = start_daemon(config)
    assert daemon.proc.wait(120) == EX_CONFIG, daemon.tail(200)
    log = daemon.tail(200)
    assert "was exported for size 256 but this run has 128" in log and "--size 128" in log, log
    assert "worker.0 cannot start with this configuration" in log
    assert "restarting in" not in log, log


def test_compiled_worker_warms_up_before_ready(make_config, start_daemon):
    config = make_config({"engine": {"compile": True}, "worker": {"batch_size": 1}})  # one size: compiling is slow
    daemon = start_daemon(config)
    daemon.wait_ready(240)
    log = daemon.tail(200)
    assert "(backend torch, compiled)" in log and "warmed up batch sizes 1 in" in log, log
    assert log.index("warmed up batch sizes") < log.index("ready: batch")
    daemon.wait_for(lambda s: s["cameras"]["belt1"].get("published", 0) >= 4, 90, "frames through the compiled worker")
    assert daemon.terminate() == 0
