"""The GPU benchmark (scripts/gpu_bench.sh, gpu_bench.py, bench_report.py) without a GPU.

The device time that runs it is short and rare, so everything that can go wrong off the
GPU is caught here: the whole script rehearsed on CPU (`--dry-run`, every section filled),
a section's batches kept when it fails half-way, a strict and atomically written JSON, the
ONNX export made in the run's dtype, wrong command-line flags, a one-line preflight
failure, and no daemon left running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_report  # noqa: E402
import gpu_bench  # noqa: E402
from bench_report import Report  # noqa: E402

FIRST_SECTIONS = ["preflight", "gpu_tests", "model", "eager", "cuda_graphs", "daemon"]
SECOND_SECTIONS = ["preflight", "model", "onnx", "compiled", "compiled_cuda_graphs"]
RETURNED_NAME = r"^[A-Za-z0-9._-]+$"


def strict_json(path: Path) -> dict:
    """The report as a strict JSON reader sees it (NaN or Infinity are errors)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def dry_env(tmp_path: Path, clip_vocab: Path) -> dict[str, str]:
    env = dict(os.environ, OUT=str(tmp_path / "out"), ISEG_CACHE_DIR=str(tmp_path / "cache"),
               ISEG_CLIP_VOCAB=str(clip_vocab), PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)
    return env


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and "pytest" not in args:
            found.append(args)
    return found


# ------------------------------------------------------------------ the rehearsal


@pytest.mark.slow
def test_dry_run_fills_every_section_and_leaves_nothing_running(tmp_path, clip_vocab, tiny_sd21):
    env = dry_env(tmp_path, clip_vocab)
    started = time.monotonic()
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    seconds = time.monotonic() - started
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["daemon.log", "gpu_bench.json", "gpu_bench.log", "gpu_bench_second.json",
                     "gpu_bench_second.log", "gpu_tests.log"], files
    assert len(files) <= 8 and all(re.match(RETURNED_NAME, name) for name in files)

    first, second = strict_json(out / "gpu_bench.json"), strict_json(out / "gpu_bench_second.json")
    assert list(first["sections"]) == FIRST_SECTIONS and list(second["sections"]) == SECOND_SECTIONS
    for report in (first, second):
        assert report["dry_run"] is True and report["failed_sections"] == [] and "finished" in report
        for name, entry in report["sections"].items():
            assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
            assert entry["seconds"] >= 0
    plan = first["plan"]
    sections = first["sections"]
    assert sections["preflight"]["versions"]["torch"] and sections["preflight"]["clip_vocab"] == str(clip_vocab)
    tests = sections["gpu_tests"]
    assert tests["exit"] == 0 and "-x" in tests["command"] and "-rA" in tests["command"]
    assert tests["outcomes"] and all(line.startswith("SKIPPED") for line in tests["outcomes"])  # no CUDA here
    assert sections["model"]["dtype"] == plan["dtype"] and sections["model"]["narrow"] is True
    for name in ("eager", "cuda_graphs"):
        batches = sections[name]["batches"]
        assert sorted(map(int, batches)) == plan["batches"]
        for entry in batches.values():
            assert entry["fps"] > 0 and entry["batch_latency_ms"]["p99"] >= entry["batch_latency_ms"]["p50"] > 0
    assert sections["eager"]["gflop_per_frame"] > 0 and sections["eager"]["naive_batch1"]["fps"] > 0
    for parity in sections["cuda_graphs"]["parity_vs_eager"].values():
        assert parity["max_map_diff"] < 1e-4 and parity["label_agreement"] >= 0.99  # padded batch: other GEMM blocking
    assert sections["cuda_graphs"]["captured_sizes"] == [1, 2, 4]
    daemon = sections["daemon"]
    assert daemon["frames"] >= 1 and daemon["startup_s"] > 0 and daemon["stopped_by_duration"] is True
    assert set(daemon["frames_per_camera"]) <= {f"belt{i}" for i in range(1, 5)}
    assert "--duration" in daemon["command"] and daemon["stop"]["exit"] == 0
    daemon_log = (out / "daemon.log").read_text()
    assert "iseg.supervisor" in daemon_log and "started worker.0" in daemon_log  # the roles log there too

    onnx = second["sections"]["onnx"]
    assert onnx["export"] == {**onnx["export"], "device": plan["device"], "dtype": plan["dtype"]}
    assert onnx["batches"] and onnx["parity_vs_eager"]["label_agreement"] > 0.5
    compiled = second["sections"]["compiled"]
    assert compiled["compiled_blocks"] > 0 and compiled["batches"]["1"]["fps"] > 0
    assert compiled["parity_vs_eager"]["1"]["max_map_diff"] < 1e-4
    assert second["sections"]["compiled_cuda_graphs"]["batches"]["1"]["fps"] > 0

    assert not processes_mentioning("iseg-gpu-daemon-"), "a daemon outlived the benchmark"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("iseg-gpu-bench-*.pids"))
    print(f"dry run: {seconds:.0f} s")


# ------------------------------------------------------------------ saving as it goes


def test_a_section_is_in_the_report_before_its_work_starts(tmp_path):
    report = Report(tmp_path / "r.json", stage="first")
    with report.section("eager", 30) as entry:
        on_disk = strict_json(tmp_path / "r.json")
        assert on_disk["sections"]["eager"]["status"] == "running"
        entry["batches"] = {"1": {"fps": 3.0}}
        report.save()
        assert strict_json(tmp_path / "r.json")["sections"]["eager"]["batches"]["1"]["fps"] == 3.0
    assert strict_json(tmp_path / "r.json")["sections"]["eager"]["status"] == "ok"


def test_a_failure_mid_section_keeps_the_batches_measured_before_it(tmp_path, monkeypatch, capsys):
    """The eager section itself, with measure() failing at the third batch size (as an OOM
    would): the first two are in the JSON on disk, with the error and the whole chained
    traceback, and the failure does not stop the run."""
    import engine.tools.bench

    calls = []

    def measure(segmenter, frames, batch, naive=False):
        calls.append(batch)
        if batch == 4:
            try:
                raise MemoryError("cudaMalloc failed: out of memory (the cause, at the start of the chain)")
            except MemoryError as cause:
                raise RuntimeError("capture failed at batch 4 (the end of the chain)") from cause
        return {"batch": batch, "fps": 10.0 * batch, "batch_latency_ms": {"p50": 1.0, "p99": np.float32(2.0)}}

    monkeypatch.setattr(engine.tools.bench, "measure", measure)
    monkeypatch.setattr(engine.tools.bench, "flops_per_frame", lambda segmenter, frames: 2e9)
    plan = gpu_bench.DRY_PLAN
    report = Report(tmp_path / "gpu_bench.json", stage="first")
    state = {"eager": object(), "frames": [np.zeros((8, 8, 3), np.uint8)] * 8}
    with report.section("eager", 30) as entry:
        gpu_bench.section_eager(entry, plan, state, report.save)
    with report.section("after", 30) as entry:
        entry["ran"] = True

    saved = strict_json(tmp_path / "gpu_bench.json")["sections"]
    eager = saved["eager"]
    assert calls == [1, 2, 4]
    assert eager["status"] == "error" and "capture failed at batch 4" in eager["error"]
    assert sorted(eager["batches"]) == ["1", "2"] and eager["batches"]["2"]["fps"] == 20.0
    assert eager["batches"]["1"]["achieved_tflops"] == pytest.approx(2e9 * 10 / 1e12)
    assert "out of memory (the cause" in eager["traceback"] and "(the end of the chain)" in eager["traceback"]
    assert "The above exception was the direct cause" in eager["traceback"]
    assert saved["after"]["status"] == "ok"
    printed = capsys.readouterr().out
    assert "out of memory (the cause" in printed and "Traceback (most recent call last)" in printed


def test_a_section_past_its_budget_is_recorded_and_the_next_one_runs(tmp_path):
    report = Report(tmp_path / "r.json")
    with report.section("slow", 0.3) as entry:
        entry["batches"] = {}
        for batch in range(1, 1000):
            entry["batches"][str(batch)] = {"fps": 1.0}
            report.save()
            time.sleep(0.05)
    with report.section("next", 5) as entry:
        entry["ran"] = True
    saved = strict_json(tmp_path / "r.json")["sections"]
    assert saved["slow"]["status"] == "timeout" and "budget of 0.3 s" in saved["slow"]["error"]
    assert 1 <= len(saved["slow"]["batches"]) < 999 and saved["slow"]["seconds"] < 2
    assert saved["next"] == {**saved["next"], "status": "ok", "ran": True}
    assert report.failed() == ["slow"]


def test_the_report_is_strict_json_whatever_the_values(tmp_path):
    report = Report(tmp_path / "r.json", folder=tmp_path)
    with report.section("values", 5) as entry:
        entry.update(nan=float("nan"), inf=float("inf"), f32=np.float32(1.5), i64=np.int64(7),
                     array=np.arange(3), keys={1: "int key"}, nested=[(1, 2), {"x": float("-inf")}])
    saved = strict_json(tmp_path / "r.json")
    values = saved["sections"]["values"]
    assert values["nan"] is None and values["inf"] is None and values["f32"] == 1.5 and values["i64"] == 7
    assert values["array"] == [0, 1, 2] and values["keys"] == {"1": "int key"} and values["nested"][1]["x"] is None
    assert saved["folder"] == str(tmp_path)


def test_a_write_that_fails_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    report = Report(tmp_path / "r.json", stage="first")
    report.data["measured"] = 1
    report.save()
    real_write = Path.write_text

    def half_write(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_write)
    report.data["measured"] = 2
    with pytest.raises(OSError):
        report.save()
    monkeypatch.undo()
    assert strict_json(tmp_path / "r.json")["measured"] == 1


def test_long_tracebacks_keep_their_start_and_their_end():
    text = "START " + "x" * 100_000 + " END"
    kept = bench_report.keep_ends(text, limit=1000)
    assert kept.startswith("START ") and kept.endswith(" END") and len(kept) < 1100
    assert bench_report.keep_ends("short") == "short"


# ------------------------------------------------------------------ flags, preflight, processes


def test_an_unknown_option_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", "--dryrun"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(tmp_path)), timeout=30)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "'--dryrun'" in done.stderr and "--dry-run" in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_wrong_pytest_flag_fails_the_gpu_tests_section(tmp_path, monkeypatch, tiny_sd21):
    """The rehearsal runs the real pytest command line, so a flag pytest does not know (or a
    plugin that is not installed) fails there, not on the device."""
    real = gpu_bench.gpu_test_command
    monkeypatch.setattr(gpu_bench, "gpu_test_command", lambda plan: real(plan) + ["--timout=5"])
    report = Report(tmp_path / "r.json")
    with report.section("gpu_tests", 120) as entry:
        gpu_bench.section_gpu_tests(entry, gpu_bench.DRY_PLAN, tmp_path, 120)
    entry = strict_json(tmp_path / "r.json")["sections"]["gpu_tests"]
    assert entry["status"] == "error" and entry["exit"] == 4 and "pytest exit 4" in entry["error"]
    assert "--timout" in (tmp_path / "gpu_tests.log").read_text()


def test_a_wrong_daemon_flag_fails_the_daemon_section_and_leaves_nothing_running(tmp_path, monkeypatch, tiny_sd21):
    real = gpu_bench.daemon_command
    monkeypatch.setattr(gpu_bench, "daemon_command", lambda path, plan: real(path, plan) + ["--camera-count", "4"])
    report = Report(tmp_path / "r.json")
    with report.section("daemon", 60) as entry:
        gpu_bench.section_daemon(entry, gpu_bench.DRY_PLAN, {"model_dir": tiny_sd21}, tmp_path, report.save, 60)
    entry = strict_json(tmp_path / "r.json")["sections"]["daemon"]
    assert entry["status"] == "error" and "exited (2) before publishing" in entry["error"]
    assert "--camera-count" in (tmp_path / "daemon.log").read_text()
    assert not processes_mentioning("iseg-gpu-daemon-")


def test_stopping_kills_descendants_in_their_own_sessions(tmp_path):
    """A parent that ignores SIGTERM and a child in its own session (as the daemon's roles
    are): both are gone after stop(), by process group."""
    marker = f"iseg-stop-test-{os.getpid()}"
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', '{marker}'], "
              "start_new_session=True); time.sleep(120)")
    tree = gpu_bench.ProcessTree([sys.executable, "-c", script, marker], tmp_path / "log")
    deadline = time.monotonic() + 30
    while len(processes_mentioning(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tree.wait(0.5) is None
    stopped = tree.stop(grace_s=0.5)
    assert stopped["stopped_in_grace"] is False and len(stopped["groups_killed"]) == 2
    deadline = time.monotonic() + 10
    while processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(marker)


def test_preflight_fails_fast_with_one_line(tmp_path, clip_vocab):
    env = dry_env(tmp_path, clip_vocab)
    env["PYTHONPATH"] = str(REPO)
    no_vocab = subprocess.run([sys.executable, "scripts/gpu_bench.py", "--out-dir", str(tmp_path / "a"), "--dry-run"],
                              cwd=REPO, capture_output=True, text=True, timeout=120,
                              env=dict(env, ISEG_CLIP_VOCAB=str(tmp_path / "absent.txt.gz")))
    no_cuda = subprocess.run([sys.executable, "scripts/gpu_bench.py", "--out-dir", str(tmp_path / "b")],
                             cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    for done, why in ((no_vocab, "no CLIP vocabulary"), (no_cuda, "sees no CUDA device")):
        assert done.returncode == 3, done.stdout + done.stderr
        failures = [line for line in done.stdout.splitlines() if "FAILED" in line]
        assert len(failures) == 1 and failures[0].startswith("preflight: FAILED: ") and why in failures[0]
        assert any(line.startswith("preflight: python ") and "torch " in line for line in done.stdout.splitlines())
    saved = strict_json(tmp_path / "a" / "gpu_bench.json")["sections"]
    assert list(saved) == ["preflight"] and saved["preflight"]["status"] == "error"


# ------------------------------------------------------------------ the ONNX export


@pytest.mark.slow
def test_the_onnx_section_exports_in_the_runs_dtype(tmp_path, monkeypatch, clip_vocab):
    """A float16 run (the GPU's dtype) on CPU: the export is made in float16 and the ONNX
    Segmenter accepts it. An export left at its float32 default (the bug this guards
    against) is refused by the Segmenter, so the section fails instead of measuring."""
    import engine.backends.onnx_export
    from engine.tools.full_size import build_full_size_model
    from engine.segmenter import Segmenter
    from engine.settings import IsegSettings

    monkeypatch.setenv("ISEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ISEG_CLIP_VOCAB", str(clip_vocab))
    plan = replace(gpu_bench.DRY_PLAN, dtype="float16", batches=(1,), min_frames=1)
    model_dir = build_full_size_model(tmp_path / "narrow", narrow=True, progress=lambda line: None)
    eager = Segmenter.load(model_dir, dtype="float16", settings=IsegSettings(size=plan.size), cache_dir=tmp_path)
    state = {"eager": eager, "model_dir": model_dir}

    real_export = engine.backends.onnx_export.export_onnx
    monkeypatch.setattr(engine.backends.onnx_export, "export_onnx",
                        lambda model, out, size, device, dtype, progress: real_export(model, out, size=size))
    report = Report(tmp_path / "r.json")
    with report.section("onnx", 600) as entry:
        gpu_bench.section_onnx(entry, plan, state, report.save)
    assert report.data["sections"]["onnx"]["status"] == "error"
    assert "exported for dtype 'float32' but this run has 'float16'" in report.data["sections"]["onnx"]["error"]

    monkeypatch.setattr(engine.backends.onnx_export, "export_onnx", real_export)
    with report.section("onnx", 600) as entry:
        gpu_bench.section_onnx(entry, plan, state, report.save)
    onnx = strict_json(tmp_path / "r.json")["sections"]["onnx"]
    assert onnx["status"] == "ok", onnx.get("traceback")
    assert onnx["export"]["dtype"] == "float16" and onnx["export"]["device"] == "cpu"
    assert onnx["batches"]["1"]["fps"] > 0
