"""GPU benchmark of the engine and the daemon (issue 14), in two commands that each fit a
device call, rehearsed on CPU by --dry-run.

    python scripts/gpu_bench.py --out-dir DIR [--stage first|second] [--dry-run]

(scripts/gpu_bench.sh wraps it: carried wheels, environment, a hard time limit, the log.)

first  (budget 300 s): preflight; tests/test_gpu.py (-x -rA, per-test timeout); the
       full-size SD 2.1-base topology (random weights, no download) in the run's dtype;
       eager at batch 1/4/8/16 (frames/s, p50/p99 batch latency, peak memory, GFLOP/frame,
       TFLOP/s, MFU) and the naive path at batch 1; the same from CUDA graphs (parity with
       eager first); the daemon with four synthetic 720p cameras, 15 s measured.
       → DIR/gpu_bench.json, DIR/gpu_tests.log, DIR/daemon.log
second (budget 300 s): preflight; ONNX Runtime (only with a GPU provider; exported on the
       GPU in the run's dtype); torch.compile'd blocks, then compiled + CUDA graphs.
       → DIR/gpu_bench_second.json

Each section's dict is in the JSON before its work starts and is filled batch by batch;
a failure or a section running past its budget is recorded there with its full traceback
(scripts/bench_report.py) and the next section runs. --dry-run runs every section on CPU
with the narrow full-size topology (widths / 8), small sizes and batches, float32, and
in place of the CUDA-only calls: an emulated graph capture with CUDA graphs' in-place
semantics, dynamo's eager backend for torch.compile, the CPU ONNX provider.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import os
import pkgutil
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_report import Report, alarm_deferred, now  # noqa: E402

STAGES = ("first", "second")
JSON_NAMES = {"first": "gpu_bench.json", "second": "gpu_bench_second.json"}
NEEDED = ("torch", "numpy", "diffusers", "transformers", "safetensors", "zmq", "yaml", "cv2", "pydantic")
"""Top-level modules the engine and the daemon's pipeline roles cannot run without."""
DISTRIBUTIONS = ("torch", "numpy", "diffusers", "transformers", "huggingface_hub", "safetensors", "tokenizers",
                 "pyzmq", "PyYAML", "opencv-python-headless", "onnx", "onnxruntime", "onnxruntime-gpu", "pytest",
                 "pytest-timeout", "triton")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Plan:
    """What one run does: the GPU run, or its CPU rehearsal (same sections, smaller numbers)."""

    dry_run: bool
    device: str
    dtype: str
    size: int
    narrow: bool
    batches: tuple[int, ...]
    min_frames: int
    batches_per_measure: int
    naive_frames: int
    parity_batches: tuple[int, ...]
    compile_batches: tuple[int, ...]
    min_free_gib: float
    test_timeout_s: int
    cameras: int
    camera_wh: tuple[int, int]
    camera_fps: float
    daemon_batch: int
    daemon_startup_s: float
    daemon_warmup_s: float
    daemon_window_s: float
    daemon_min_frames: int
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)

    def frames_for(self, batch: int) -> int:
        """Frames measured at a batch size: enough batches for a p99 that means something."""
        return max(self.min_frames, self.batches_per_measure * batch)

    @property
    def daemon_duration_s(self) -> float:
        """The daemon's own --duration: start-up allowance, warm-up and the measured window."""
        return self.daemon_startup_s + self.daemon_warmup_s + self.daemon_window_s

    def budget(self, stage: str) -> float:
        """Seconds the stage may take by the sum of its sections' budgets."""
        return sum(self.budgets[stage].values())


GPU_PLAN = Plan(
    dry_run=False, device="cuda", dtype="float16", size=512, narrow=False, batches=(1, 4, 8, 16),
    min_frames=32, batches_per_measure=8, naive_frames=8, parity_batches=(1, 3), compile_batches=(1, 16),
    min_free_gib=24.0, test_timeout_s=45, cameras=4, camera_wh=(1280, 720), camera_fps=30.0, daemon_batch=8,
    daemon_startup_s=25.0, daemon_warmup_s=2.0, daemon_window_s=15.0, daemon_min_frames=1,
    budgets={"first": {"preflight": 30, "gpu_tests": 80, "model": 40, "eager": 40, "cuda_graphs": 40, "daemon": 70},
             "second": {"preflight": 20, "model": 40, "onnx": 40, "compiled": 140, "compiled_cuda_graphs": 60}})
DRY_PLAN = Plan(
    dry_run=True, device="cpu", dtype="float32", size=64, narrow=True, batches=(1, 2, 4),
    min_frames=2, batches_per_measure=1, naive_frames=1, parity_batches=(1, 3), compile_batches=(1,),
    min_free_gib=0.0, test_timeout_s=60, cameras=4, camera_wh=(160, 96), camera_fps=2.0, daemon_batch=2,
    daemon_startup_s=45.0, daemon_warmup_s=1.0, daemon_window_s=3.0, daemon_min_frames=2,
    budgets={"first": {"preflight": 60, "gpu_tests": 120, "model": 60, "eager": 60, "cuda_graphs": 60, "daemon": 120},
             "second": {"preflight": 60, "model": 60, "onnx": 120, "compiled": 180, "compiled_cuda_graphs": 120}})


class PreflightError(Exception):
    """Something the run needs is missing; the message is the one line the operator reads."""


def log(message: str) -> None:
    print(f"[gpu_bench] {message}", flush=True)


def cache_root() -> Path:
    """Where models and exports go: $ISEG_CACHE_DIR (the shell script sets /tmp/iseg-cache)."""
    return Path(os.environ.get("ISEG_CACHE_DIR") or tempfile.gettempdir()) / "gpu-bench"


# ---------------------------------------------------------------- preflight


def versions() -> dict[str, str | None]:
    """Installed versions of what the run uses (None: not installed)."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def import_all(package: str) -> tuple[list[str], dict[str, str]]:
    """Import every module of a package; (modules imported, {module: why not} for the rest).
    `__main__` modules are skipped (importing one runs it)."""
    imported: list[str] = []
    failures: dict[str, str] = {}
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except Exception as error:  # any import-time failure is what the preflight is for
            missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
            failures[info.name] = f"missing module {missing}" if missing else f"{type(error).__name__}: {error}"
    return imported, failures


def check_imports(entry: dict[str, Any]) -> None:
    """The engine must import whole; a daemon module may lack an optional package (a role
    this run does not start), but not one of NEEDED."""
    for package in ("engine", "daemon"):
        try:
            imported, failures = import_all(package)
        except ImportError as error:
            raise PreflightError(f"cannot import the {package} package ({error}); carry .whl made by "
                                 "scripts/prepare_gpu_wheels.sh") from None
        entry[f"{package}_modules"] = len(imported)
        for module, why in failures.items():
            needed = why.startswith("missing module ") and why.split()[-1].split(".")[0] in NEEDED
            if package == "engine" or needed or not why.startswith("missing module "):
                raise PreflightError(f"cannot import {module} ({why}); carry .whl made by "
                                     "scripts/prepare_gpu_wheels.sh")
            entry.setdefault("warnings", []).append(f"{module}: {why} (roles that use it will not start)")


def check_vocabulary(entry: dict[str, Any]) -> None:
    """The CLIP vocabulary the tiny test model's tokenizer is built from, found without the network."""
    from engine.model.clip_vocab import VOCAB_NAME, cache_dir, read_merges

    explicit = os.environ.get("ISEG_CLIP_VOCAB")
    path = Path(explicit) if explicit else cache_dir() / "clip" / VOCAB_NAME
    if not path.is_file():
        where = f"ISEG_CLIP_VOCAB={explicit} is not a file" if explicit else f"ISEG_CLIP_VOCAB unset and {path} absent"
        raise PreflightError(f"no CLIP vocabulary ({where}); run scripts/prepare_gpu_wheels.sh and carry .whl")
    read_merges(path)
    entry["clip_vocab"] = str(path)


def check_device(entry: dict[str, Any], plan: Plan) -> None:
    import torch

    entry["cuda_available"] = torch.cuda.is_available()
    entry["torch_cuda"] = torch.version.cuda
    if plan.device != "cuda":
        return
    if not torch.cuda.is_available():
        raise PreflightError(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device")
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    entry.update(device_name=torch.cuda.get_device_name(device),
                 capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                 cudnn=torch.backends.cudnn.version(), free_gib=round(free / 2**30, 1),
                 total_gib=round(total / 2**30, 1))
    if free / 2**30 < plan.min_free_gib:
        raise PreflightError(f"only {free / 2**30:.1f} GiB free on {entry['device_name']}; the run needs "
                             f"{plan.min_free_gib:g} GiB")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        entry["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as error:
        entry["nvidia_smi"] = f"not run: {error}"


def preflight(entry: dict[str, Any], plan: Plan, stage: str) -> None:
    """Versions, device, free memory and disk, wheels, vocabulary and imports; PreflightError on
    the first thing missing."""
    entry["versions"] = found = versions()
    wheels = sorted(p.name for p in (REPO / ".whl").glob("*.whl"))
    entry["wheels"] = wheels
    entry["sys_path_head"] = sys.path[:4]
    if not plan.dry_run and not wheels and not found["diffusers"]:
        raise PreflightError("diffusers is not installed and no .whl/ was carried; run scripts/prepare_gpu_wheels.sh "
                             "here and name .whl in the run's carry")
    required = ["torch", "numpy", "diffusers", "transformers", "safetensors", "pyzmq", "PyYAML",
                "opencv-python-headless"]
    required += ["pytest", "pytest-timeout"] if stage == "first" else ["onnx"]
    missing = [name for name in required if not found[name]]
    if missing:
        raise PreflightError(f"not installed: {', '.join(missing)}; carry .whl made by scripts/prepare_gpu_wheels.sh")
    check_device(entry, plan)
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    entry["cache"] = str(cache)
    entry["disk_free_gib"] = round(shutil.disk_usage(cache).free / 2**30, 1)
    if not plan.dry_run and entry["disk_free_gib"] < 6:
        raise PreflightError(f"only {entry['disk_free_gib']} GiB free under {cache}; the full-size model and its "
                             "ONNX export need 6 GiB")
    check_vocabulary(entry)
    check_imports(entry)
    try:
        import onnxruntime

        entry["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        entry["onnxruntime_providers"] = []


def preflight_line(entry: dict[str, Any]) -> str:
    """The one line of versions the log starts with."""
    found = entry.get("versions", {})
    parts = [f"{name} {found.get(name)}" for name in ("python", "torch", "diffusers", "transformers", "onnxruntime")]
    parts.append(f"CUDA {entry.get('torch_cuda')}")
    if "device_name" in entry:
        parts.append(f"{entry['device_name']} (sm {entry['capability']}, "
                     f"{entry['free_gib']}/{entry['total_gib']} GiB free)")
    parts.append(f"providers {entry.get('onnxruntime_providers')}")
    return "preflight: " + ", ".join(parts)


def run_preflight(report: Report, plan: Plan, stage: str) -> bool:
    """The preflight section; on a failure, one line on the console and in the JSON."""
    entry: dict[str, Any] = {"status": "running", "started": now()}
    report.data["sections"]["preflight"] = entry
    report.save()
    started = time.perf_counter()
    try:
        preflight(entry, plan, stage)
        entry["status"] = "ok"
    except PreflightError as error:
        entry.update(status="error", error=str(error))
    entry["seconds"] = round(time.perf_counter() - started, 2)
    report.save()
    print(preflight_line(entry), flush=True)
    for warning in entry.get("warnings", []):
        log(f"preflight warning: {warning}")
    if entry["status"] != "ok":
        print(f"preflight: FAILED: {entry['error']}", flush=True)
        return False
    return True


# ---------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below `pid` (from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


class ProcessTree:
    """A child started in its own session, whose descendants (which may start sessions of
    their own, as the daemon's roles do) are tracked so that all of them can be killed by
    process group, and listed in a pid file the shell script kills at exit."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        self.groups = {self.proc.pid}
        self.pidfile = Path(os.environ["GPU_BENCH_PIDFILE"]) if os.environ.get("GPU_BENCH_PIDFILE") else None
        self.track()

    def track(self) -> None:
        """Note the process groups of every current descendant."""
        for pid in descendants(self.proc.pid):
            try:
                self.groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        if self.pidfile:
            self.pidfile.write_text("".join(f"{group}\n" for group in sorted(self.groups)))

    def wait(self, seconds: float) -> int | None:
        """The exit status, or None if still running after `seconds` (tracking meanwhile)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.track()
            time.sleep(0.2)
        return self.proc.poll()

    def stop(self, grace_s: float) -> dict[str, Any]:
        """SIGTERM the child, wait `grace_s`, then SIGKILL every tracked process group."""
        with alarm_deferred():
            self.track()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            graceful = self.wait(grace_s) is not None
            killed = []
            for group in sorted(self.groups):
                try:
                    os.killpg(group, signal.SIGKILL)
                    killed.append(group)
                except (ProcessLookupError, PermissionError):
                    pass
            self.proc.wait()
            if self.pidfile:
                self.pidfile.unlink(missing_ok=True)
        return {"exit": self.proc.returncode, "stopped_in_grace": graceful, "groups_killed": killed}


# ---------------------------------------------------------------- sections


def gpu_test_command(plan: Plan) -> list[str]:
    """pytest on tests/test_gpu.py: stop at the first failure, report every outcome, a short
    per-test timeout (the compile test is left to the second command's compile sections)."""
    return [sys.executable, "-m", "pytest", "-x", "-rA", "-p", "no:cacheprovider", f"--timeout={plan.test_timeout_s}",
            "-k", "not compiled", "tests/test_gpu.py"]


def section_gpu_tests(entry: dict[str, Any], plan: Plan, out_dir: Path, budget_s: float) -> None:
    """tests/test_gpu.py on the device (on CPU every test there skips, which still checks the
    command line); the tiny model is built first so the per-test timeout covers tests only."""
    started = time.perf_counter()
    from tests.conftest import tiny_model_path

    entry["tiny_model"] = str(tiny_model_path("sd21"))
    entry["tiny_model_s"] = round(time.perf_counter() - started, 1)
    command = gpu_test_command(plan)
    entry["command"] = command
    log_path = out_dir / "gpu_tests.log"
    log_path.write_text(f"$ {' '.join(command)}\n")
    tree = ProcessTree(command, log_path)
    code = tree.wait(max(10.0, budget_s - (time.perf_counter() - started) - 5))
    stop = tree.stop(2)
    if code is None:
        entry["stop"] = stop
    text = log_path.read_text(errors="replace")
    entry["outcomes"] = re.findall(r"^(?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) .*$", text, flags=re.M)
    summary = [line for line in text.splitlines() if line.startswith("=") and (" in " in line or "passed" in line)]
    entry["summary"] = summary[-1].strip("= ") if summary else None
    entry["exit"] = code
    print(text[-6000:], flush=True)
    if code is None:
        raise TimeoutError(f"the GPU tests did not finish in the section's budget; see {log_path}")
    if code != 0:
        raise RuntimeError(f"the GPU tests failed (pytest exit {code}): {entry['summary']}; see {log_path}")


def section_model(entry: dict[str, Any], plan: Plan, state: dict[str, Any]) -> None:
    """The full-size topology (narrow in a dry run) written once, then loaded in the run's dtype."""
    from engine.tools.full_size import build_full_size_model
    from engine.segmenter import Segmenter
    from engine.settings import IsegSettings

    model_dir = cache_root() / ("full-size-sd21-narrow" if plan.narrow else "full-size-sd21")
    started = time.perf_counter()
    build_full_size_model(model_dir, "sd21", progress=log, narrow=plan.narrow)
    entry.update(path=str(model_dir), build_s=round(time.perf_counter() - started, 1), narrow=plan.narrow)
    started = time.perf_counter()
    segmenter = Segmenter.load(model_dir, device=plan.device, dtype=plan.dtype, settings=IsegSettings(size=plan.size),
                               cache_dir=cache_root() / "text", max_batch=max(plan.batches))
    entry["load_s"] = round(time.perf_counter() - started, 1)
    entry["unet_params_m"] = sum(p.numel() for p in segmenter.model.unet.parameters()) / 1e6
    entry["vae_params_m"] = sum(p.numel() for p in segmenter.model.vae.parameters()) / 1e6
    entry.update(device=str(segmenter.model.device), dtype=str(segmenter.model.dtype).removeprefix("torch."),
                 size=plan.size)
    state.update(model_dir=model_dir, eager=segmenter)


def bench_images(plan: Plan) -> list:
    from engine.tools.bench import bench_frames

    return bench_frames(plan.frames_for(max(plan.batches + plan.compile_batches)))


def measure_into(entry: dict[str, Any], key: str, segmenter: Any, frames: list, batch: int, plan: Plan,
                 save: Callable[[], None], flops: float | None = None, peak: float | None = None) -> dict[str, Any]:
    """One batch size measured and saved into entry["batches"][key] at once."""
    import torch

    from engine.tools.bench import measure

    if plan.device == "cuda":
        torch.cuda.empty_cache()
    result = measure(segmenter, frames[:plan.frames_for(batch)], batch)
    if flops:
        result["achieved_tflops"] = flops * result["fps"] / 1e12
        result["mfu"] = result["achieved_tflops"] / peak if peak else None
    entry.setdefault("batches", {})[key] = result
    save()
    memory = f", peak {result['peak_device_mb']:.0f} MB" if "peak_device_mb" in result else ""
    log(f"  batch {batch}: {result['fps']:.1f} frames/s, p50 {result['batch_latency_ms']['p50']:.1f} ms, "
        f"p99 {result['batch_latency_ms']['p99']:.1f} ms{memory}")
    return result


def section_eager(entry: dict[str, Any], plan: Plan, state: dict[str, Any], save: Callable[[], None]) -> None:
    import torch

    from engine.tools.bench import flops_per_frame, measure, peak_tflops

    segmenter = state["eager"]
    frames = state.setdefault("frames", bench_images(plan))
    flops = flops_per_frame(segmenter, frames)
    peak = peak_tflops(torch.device(plan.device))
    entry.update(gflop_per_frame=flops / 1e9, peak_tflops_dense=peak, frame_hw=list(frames[0].shape[:2]), batches={})
    save()
    for batch in plan.batches:
        measure_into(entry, str(batch), segmenter, frames, batch, plan, save, flops, peak)
    entry["naive_batch1"] = measure(segmenter, frames[:plan.naive_frames], 1, naive=True)
    entry["speedup_vs_naive"] = entry["batches"]["1"]["fps"] / entry["naive_batch1"]["fps"]


class EmulatedCapture:
    """The dry run's stand-in for CUDA-graph capture, with the same memory semantics: the
    output tensors are fixed, hold nothing until the first replay, and every replay rewrites
    them in place from whatever the input tensors hold then."""

    def __call__(self, fn: Callable, inputs: Any) -> tuple[Any, tuple]:
        import torch

        outputs = tuple(torch.full_like(t, float("nan")) for t in fn(*inputs))

        class Graph:
            def replay(self) -> None:
                for static, fresh in zip(outputs, fn(*inputs)):
                    static.copy_(fresh)

        return Graph(), outputs


def graphed_segmenter(base: Any, plan: Plan, max_batch: int) -> Any:
    """A Segmenter replaying CUDA graphs on `base`'s model (emulated capture in a dry run)."""
    from engine.segmenter import Segmenter
    from engine.backends.torch_backend import TorchBackend

    if not plan.dry_run:
        return Segmenter(base.model, base.settings, base.text_cache_dir, cuda_graphs=True, max_batch=max_batch)
    graphed = Segmenter(base.model, base.settings, base.text_cache_dir, max_batch=max_batch)
    graphed.torch_backend = graphed.backend = TorchBackend(base.model, base.settings, graphed.latent_hw,
                                                           cuda_graphs=True, max_batch=max_batch,
                                                           capture=EmulatedCapture())
    return graphed


def compare(want: list, got: list) -> dict[str, float]:
    import numpy as np

    return {"max_map_diff": max(float(np.abs(a.maps - b.maps).max()) for a, b in zip(want, got)),
            "label_agreement": min(float((a.labels == b.labels).mean()) for a, b in zip(want, got)),
            "max_presence_diff": max(float(np.abs(a.presence - b.presence).max()) for a, b in zip(want, got))}


def section_graphs(entry: dict[str, Any], plan: Plan, state: dict[str, Any], save: Callable[[], None],
                   batches: tuple[int, ...], parity_batches: tuple[int, ...], reference: dict[int, list] | None,
                   baseline: dict[str, Any] | None) -> None:
    """Parity with eager first (first call includes the capture), then each batch size."""
    from engine.tools.bench import BENCH_CLASSES

    eager = state["eager"]
    frames = state.setdefault("frames", bench_images(plan))
    graphed = graphed_segmenter(eager, plan, max(batches))
    entry.update(parity_vs_eager={}, batches={})
    save()
    for batch in parity_batches:
        want = reference[batch] if reference else eager.segment(frames[:batch], BENCH_CLASSES)
        started = time.perf_counter()
        got = graphed.segment(frames[:batch], BENCH_CLASSES)
        entry["parity_vs_eager"][str(batch)] = {"first_call_s_incl_capture": time.perf_counter() - started,
                                                **compare(want, got)}
        save()
    for batch in batches:
        result = measure_into(entry, str(batch), graphed, frames, batch, plan, save)
        eager_result = (baseline or {}).get(str(batch))
        if eager_result:
            result["speedup_vs_eager"] = result["fps"] / eager_result["fps"]
            save()
    entry["captured_sizes"] = graphed.torch_backend.captured_sizes
    state["graphed"] = graphed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def daemon_config(workdir: Path, plan: Plan, model_dir: Path) -> Path:
    """configs/demo.yaml turned into a line: `plan.cameras` synthetic cameras on the model."""
    import yaml

    doc = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    doc["state_dir"] = str(workdir / "state")
    doc["engine"].update(model_dir=str(model_dir), device=plan.device, dtype=plan.dtype,
                         cuda_graphs=not plan.dry_run, build_tiny_if_missing=False)
    doc["engine"]["settings"]["size"] = plan.size
    doc["worker"].update(batch_size=plan.daemon_batch, max_wait_ms=20)
    doc["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    doc["console"] = {"enabled": False}  # the line's throughput, not the web app's (starlette is not on the GPU image)
    template = doc["cameras"][0]
    width, height = plan.camera_wh
    doc["cameras"] = [dict(template, id=f"belt{index + 1}", fps=plan.camera_fps,
                           synthetic=dict(template["synthetic"], seed=index + 1, width=width, height=height))
                      for index in range(plan.cameras)]
    path = workdir / "line.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def percentiles(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def daemon_command(config_path: Path, plan: Plan) -> list[str]:
    """`iseg run` for the line config; --duration stops it even if this process is killed."""
    return [sys.executable, "-m", "daemon", "run", "--config", str(config_path),
            "--duration", f"{plan.daemon_duration_s:g}"]


def section_daemon(entry: dict[str, Any], plan: Plan, state: dict[str, Any], out_dir: Path,
                   save: Callable[[], None], budget_s: float) -> None:
    """`iseg run --duration` on the line config; a subscriber counts what is published in the
    window after start-up and warm-up, second by second. The daemon stops by its --duration;
    if it has not by the end of the budget, its process groups are killed."""
    import json

    import zmq

    from daemon.config import load_config
    from daemon.wire import recv

    for name in ("eager", "graphed"):
        state.pop(name, None)
    if plan.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    section_started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="iseg-gpu-daemon-"))
    config_path = daemon_config(workdir, plan, state["model_dir"])
    config = load_config(config_path)
    command = daemon_command(config_path, plan)
    width, height = plan.camera_wh
    entry.update(command=command, cameras=plan.cameras, camera=f"{width}x{height} at {plan.camera_fps:g} fps",
                 worker_batch=plan.daemon_batch, cuda_graphs=not plan.dry_run, duration_s=plan.daemon_duration_s,
                 log=str(out_dir / "daemon.log"))
    save()
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    for topic in (b"overlay.", b"alert."):
        subscriber.setsockopt(zmq.SUBSCRIBE, topic)
    subscriber.connect(config.endpoint("publish"))
    (out_dir / "daemon.log").write_text(f"$ {' '.join(command)}\n")
    tree = ProcessTree(command, out_dir / "daemon.log")
    launched = time.monotonic()
    frames: list[float] = []
    alerts: list[float] = []
    per_camera: dict[str, int] = {}
    try:
        first = None
        while first is None:
            if subscriber.poll(500):
                recv(subscriber)
                first = time.monotonic()
            elif tree.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({tree.proc.returncode}) before publishing; see daemon.log")
            tree.track()
        entry["startup_s"] = round(first - launched, 1)
        save()
        window_start = first + plan.daemon_warmup_s
        last_call = launched + plan.daemon_duration_s - 0.5
        window_end = min(window_start + plan.daemon_window_s, last_call)
        next_save = window_start + 1
        while time.monotonic() < window_end or (len(frames) < plan.daemon_min_frames
                                                and time.monotonic() < last_call):
            if subscriber.poll(100):
                message = recv(subscriber)
                if time.monotonic() < window_start:
                    continue
                if message.topic.startswith("alert."):
                    alerts.append(message.header["latency_ms"])
                else:
                    frames.append(message.header["latency_ms"])
                    camera = message.topic.split(".", 1)[1]
                    per_camera[camera] = per_camera.get(camera, 0) + 1
            if time.monotonic() >= next_save:
                elapsed = time.monotonic() - window_start
                entry.update(window_s=round(elapsed, 1), frames=len(frames), frames_per_s=len(frames) / elapsed,
                             frames_per_camera=dict(per_camera))
                save()
                tree.track()
                next_save += 1
        elapsed = max(1e-9, time.monotonic() - window_start)
        entry.update(window_s=round(elapsed, 1), frames=len(frames), frames_per_s=len(frames) / elapsed,
                     frames_per_camera=per_camera, capture_to_publish_ms=percentiles(frames),
                     alerts=len(alerts), capture_to_alert_ms=percentiles(alerts),
                     offered_frames_per_s=plan.cameras * plan.camera_fps)
        save()
        remaining = budget_s - (time.monotonic() - section_started) - 3
        code = tree.wait(max(1.0, remaining))
        entry["stopped_by_duration"] = code is not None
        if code is None:
            raise TimeoutError(f"the daemon did not stop by --duration {plan.daemon_duration_s:g} s within the "
                               "section's budget; its process groups were killed")
        if code != 0:
            raise RuntimeError(f"the daemon exited {code}; see daemon.log")
    finally:
        entry["stop"] = tree.stop(5 if tree.proc.poll() is None else 0)
        subscriber.close(0)
        context.term()
        stats = config.state_path / "last_stats.json"
        if stats.is_file():
            cameras = json.loads(stats.read_text()).get("cameras", {})
            entry["daemon_counts"] = {key: sum(c.get(key) or 0 for c in cameras.values())
                                      for key in ("captured", "dropped", "published")}
        save()


@contextmanager
def dry_compile_backend(plan: Plan) -> Iterator[str]:
    """In a dry run torch.compile uses dynamo's eager backend (tracing, guards and recompile
    limits as on the GPU, without inductor's code generation, which takes minutes on 2 cores)."""
    import torch

    if not plan.dry_run:
        yield "inductor"
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend="eager")
    try:
        yield "eager (dry run)"
    finally:
        torch.compile = real


def section_compiled(entry: dict[str, Any], plan: Plan, state: dict[str, Any], save: Callable[[], None]) -> None:
    """Eager reference results first, then the blocks compiled, the first call per batch size
    timed (compilation), parity, and each batch size measured."""
    from engine.tools.bench import BENCH_CLASSES
    from engine.backends.torch_backend import compile_static_blocks

    segmenter = state["eager"]
    frames = state.setdefault("frames", bench_images(plan))
    reference = {batch: segmenter.segment(frames[:batch], BENCH_CLASSES) for batch in plan.compile_batches}
    state["reference"] = reference
    with dry_compile_backend(plan) as backend:
        entry["backend"] = backend
        entry["compiled_blocks"] = compile_static_blocks(segmenter.model, max(plan.compile_batches))
        entry.update(first_call_s={}, parity_vs_eager={}, batches={})
        save()
        for batch in plan.compile_batches:
            started = time.perf_counter()
            got = segmenter.segment(frames[:batch], BENCH_CLASSES)
            entry["first_call_s"][str(batch)] = time.perf_counter() - started
            entry["parity_vs_eager"][str(batch)] = compare(reference[batch], got)
            save()
        for batch in plan.compile_batches:
            measure_into(entry, str(batch), segmenter, frames, batch, plan, save)


def section_onnx(entry: dict[str, Any], plan: Plan, state: dict[str, Any], save: Callable[[], None]) -> None:
    """Exported on the run's device in the run's dtype (what the Segmenter checks the export
    against); measured only where ONNX Runtime can run it there."""
    import onnxruntime

    from engine.tools.bench import BENCH_CLASSES
    from engine.backends.onnx_backend import onnx_backend_factory
    from engine.backends.onnx_export import export_onnx
    from engine.segmenter import Segmenter

    providers = onnxruntime.get_available_providers()
    entry.update(onnxruntime=onnxruntime.__version__, providers=providers)
    if plan.device == "cuda":
        if "CUDAExecutionProvider" not in providers:
            entry["skipped"] = (f"onnxruntime {onnxruntime.__version__} here has no CUDA provider ({providers}); "
                                "onnxruntime-gpu (over 200 MB) exceeds the 64 MiB carry limit")
            return
        use = ["CUDAExecutionProvider"]  # TensorRT would build engines for minutes first
    else:
        use = ["CPUExecutionProvider"]
    eager = state["eager"]
    export_dir = cache_root() / f"onnx-{state['model_dir'].name}-{plan.dtype}-{plan.size}"
    started = time.perf_counter()
    manifest = export_onnx(state["model_dir"], export_dir, size=plan.size, device=plan.device, dtype=plan.dtype,
                           progress=log)
    entry["export"] = {"device": plan.device, "dtype": manifest["dtype"], "seconds": time.perf_counter() - started,
                       "dir": str(export_dir)}
    save()
    segmenter = Segmenter(eager.model, eager.settings, eager.text_cache_dir,
                          backend=onnx_backend_factory(export_dir, providers=use))
    entry["session_providers"] = segmenter.backend.providers
    frames = state.setdefault("frames", bench_images(plan))
    entry["parity_vs_eager"] = compare(eager.segment(frames[:1], BENCH_CLASSES),
                                       segmenter.segment(frames[:1], BENCH_CLASSES))
    entry["batches"] = {}
    save()
    for batch in plan.batches:
        measure_into(entry, str(batch), segmenter, frames, batch, plan, save)


# ---------------------------------------------------------------- main


def run_stage(stage: str, plan: Plan, out_dir: Path) -> int:
    """Every section of a stage in order; 0 when all are ok (or skipped), 1 when some failed,
    3 when the preflight failed (nothing else ran)."""
    budgets = plan.budgets[stage]
    report = Report(out_dir / JSON_NAMES[stage], stage=stage, dry_run=plan.dry_run, budget_s=plan.budget(stage),
                    plan=asdict(plan) | {"frames_per_batch": {b: plan.frames_for(b) for b in plan.batches}})
    log(f"stage {stage}{' (dry run)' if plan.dry_run else ''}: budget {plan.budget(stage):g} s; "
        f"report {report.path}")
    if not run_preflight(report, plan, stage):
        return 3
    state: dict[str, Any] = {}
    save = report.save
    if stage == "first":
        with report.section("gpu_tests", budgets["gpu_tests"]) as entry:
            section_gpu_tests(entry, plan, out_dir, budgets["gpu_tests"])
    with report.section("model", budgets["model"]) as entry:
        section_model(entry, plan, state)
    if "eager" not in state:
        log("no model: the remaining sections cannot run")
    elif stage == "first":
        with report.section("eager", budgets["eager"]) as entry:
            section_eager(entry, plan, state, save)
        with report.section("cuda_graphs", budgets["cuda_graphs"]) as entry:
            baseline = report.data["sections"]["eager"].get("batches")
            section_graphs(entry, plan, state, save, plan.batches, plan.parity_batches, None, baseline)
        with report.section("daemon", budgets["daemon"]) as entry:
            section_daemon(entry, plan, state, out_dir, save, budgets["daemon"])
    else:
        with report.section("onnx", budgets["onnx"]) as entry:
            section_onnx(entry, plan, state, save)
        with report.section("compiled", budgets["compiled"]) as entry:
            section_compiled(entry, plan, state, save)
        with report.section("compiled_cuda_graphs", budgets["compiled_cuda_graphs"]) as entry:
            baseline = report.data["sections"]["compiled"].get("batches")
            section_graphs(entry, plan, state, save, plan.compile_batches, plan.compile_batches[:1],
                           state.get("reference"), baseline)
    report.data["finished"] = now()
    report.data["failed_sections"] = report.failed()
    report.save()
    log(f"stage {stage} done; failed sections: {report.failed() or 'none'}; report {report.path}")
    return 1 if report.failed() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="folder for the JSON reports and the logs")
    parser.add_argument("--stage", choices=STAGES, default="first", help="first (default) or second")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on CPU with the narrow model")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return run_stage(args.stage, DRY_PLAN if args.dry_run else GPU_PLAN, out_dir)


if __name__ == "__main__":
    sys.exit(main())
