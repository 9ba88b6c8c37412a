"""GPU benchmark (issue 4): full-size SD 2.1-base topology, fp16, 512×512, on one GPU.

Sections run in order and the JSON is rewritten after each, so a run cut short still
reports what it measured:
  1. build the random full-width model (no download);
  2. torch fast path at batch 1/4/8/16: frames/s, per-stage ms, p50/p99, peak host and
     device memory, GFLOP/frame, achieved TFLOP/s and MFU; the naive path at batch 1;
  3. the same replayed from CUDA graphs (parity with eager first, then batch 1/4/8/16);
  4. ONNX Runtime on the same frames when its CUDA/TensorRT provider is present;
  5. the daemon end to end with 4 synthetic 720p cameras at 30 fps, CUDA graphs on
     (scripts/bench_daemon.py);
  6. last, because compiling takes longest: the convolution/feed-forward blocks
     torch.compiled, without and with CUDA graphs (batch 1 and 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from engine.backends.torch_backend import compile_static_blocks
from engine.segmenter import Segmenter
from engine.settings import IsegSettings
from engine.tools.bench import BENCH_CLASSES, bench_frames, flops_per_frame, measure, peak_tflops
from engine.tools.full_size import build_full_size_model

BATCHES = (1, 4, 8, 16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--frames", type=int, default=32, help="frames per measurement (32)")
    parser.add_argument("--daemon-seconds", type=int, default=40, help="daemon run length (40)")
    args = parser.parse_args()
    out = Path(args.out)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {}}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    def section(name: str, work) -> None:
        started = time.perf_counter()
        try:
            result = work()
        except Exception as error:  # a failed section is reported and the next one still runs
            result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["sections"][name] = result
        print(f"[gpu_bench] {name}: {result['seconds']} s", flush=True)
        save()

    if not torch.cuda.is_available():
        report["error"] = "no CUDA device"
        save()
        return 1
    device = torch.device("cuda")
    report["device_name"] = torch.cuda.get_device_name(device)
    report["peak_tflops_fp16_dense"] = peak_tflops(device)
    report["torch"] = torch.__version__
    cache = Path(os.environ.get("ISEG_CACHE_DIR", "/tmp/iseg-cache"))
    model_dir = cache / "full-size-sd21"
    section("build_full_size_model", lambda: {"path": str(build_full_size_model(model_dir, "sd21"))})

    frames = bench_frames(args.frames)
    settings = IsegSettings()
    state: dict = {}

    def torch_bench() -> dict:
        segmenter = Segmenter.load(model_dir, device="cuda", dtype="float16", settings=settings, cache_dir=cache)
        state["torch"] = segmenter
        flops = flops_per_frame(segmenter, frames)
        result: dict = {"gflop_per_frame": flops / 1e9, "batches": {}}
        peak = peak_tflops(device)
        for batch in BATCHES:
            torch.cuda.empty_cache()
            entry = measure(segmenter, frames, batch)
            entry["achieved_tflops"] = flops * entry["fps"] / 1e12
            entry["mfu"] = entry["achieved_tflops"] / peak if peak else None
            result["batches"][str(batch)] = entry
            print(f"[gpu_bench] torch batch {batch}: {entry['fps']:.1f} frames/s, "
                  f"{entry.get('peak_device_mb', 0):.0f} MB", flush=True)
            save()
        result["naive_batch1"] = measure(segmenter, frames[:8], 1, naive=True)
        result["speedup_vs_naive"] = result["batches"]["1"]["fps"] / result["naive_batch1"]["fps"]
        return result

    section("torch_fp16", torch_bench)

    def graphs_bench(name: str, batches: tuple[int, ...]) -> dict:
        eager = state["torch"]
        graphed = Segmenter(eager.model, settings, cache, cuda_graphs=True, max_batch=max(BATCHES))
        result: dict = {"batches": {}, "parity_vs_eager": {}}
        for batch in (1, 3):
            want = eager.segment(frames[:batch], BENCH_CLASSES)
            started = time.perf_counter()
            got = graphed.segment(frames[:batch], BENCH_CLASSES)
            result["parity_vs_eager"][str(batch)] = {
                "first_call_s_incl_capture": time.perf_counter() - started,
                "max_map_diff": max(float(np.abs(a.maps - b.maps).max()) for a, b in zip(want, got)),
                "label_agreement": min(float((a.labels == b.labels).mean()) for a, b in zip(want, got)),
                "max_presence_diff": max(float(np.abs(a.presence - b.presence).max()) for a, b in zip(want, got))}
        save()
        for batch in batches:
            entry = measure(graphed, frames, batch)
            eager_entry = report["sections"]["torch_fp16"].get("batches", {}).get(str(batch))
            if eager_entry:
                entry["speedup_vs_eager"] = entry["fps"] / eager_entry["fps"]
            result["batches"][str(batch)] = entry
            print(f"[gpu_bench] {name} batch {batch}: {entry['fps']:.1f} frames/s", flush=True)
            save()
        result["captured_sizes"] = graphed.torch_backend.captured_sizes
        return result

    section("torch_fp16_cuda_graphs", lambda: graphs_bench("cuda graphs", BATCHES))

    def onnx_bench() -> dict:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
        if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers):
            return {"skipped": f"onnxruntime {onnxruntime.__version__} here has only {providers}; "
                               "onnxruntime-gpu (255 MB wheel) exceeds the 64 MiB carry limit"}
        from engine.backends.onnx_backend import onnx_backend_factory
        from engine.backends.onnx_export import export_onnx
        onnx_dir = cache / "onnx-full-size-sd21"
        if not (onnx_dir / "manifest.json").is_file():
            export_onnx(model_dir, onnx_dir, size=settings.size)
        base = state["torch"]
        segmenter = Segmenter(base.model, settings, cache, backend=onnx_backend_factory(onnx_dir))
        result: dict = {"providers": providers, "batches": {}}
        for batch in BATCHES:
            result["batches"][str(batch)] = measure(segmenter, frames, batch)
            save()
        torch_batches = report["sections"]["torch_fp16"]["batches"]
        result["onnx_over_torch_time"] = {b: torch_batches[b]["fps"] / result["batches"][b]["fps"] for b in result["batches"]}
        return result

    section("onnx", onnx_bench)
    torch.cuda.empty_cache()

    def daemon_bench() -> dict:
        script = Path(__file__).with_name("bench_daemon.py")
        json_path = out.with_name("daemon_bench.json")
        command = [sys.executable, str(script), "--model", str(model_dir), "--device", "cuda", "--dtype", "float16",
                   "--cameras", "4", "--fps", "30", "--batch", "8", "--cuda-graphs", "--seconds", str(args.daemon_seconds),
                   "--engine-frames", "32", "--json", str(json_path)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=args.daemon_seconds + 240)
        if completed.returncode != 0:
            return {"error": completed.stderr[-3000:], "command": command}
        return json.loads(json_path.read_text())

    section("daemon_4_cameras_30fps", daemon_bench)

    def compiled_bench() -> dict:
        segmenter = state["torch"]
        blocks = compile_static_blocks(segmenter.model, max(BATCHES))
        result = {"compiled_blocks": blocks, "batches": {}}
        for batch in (1, 16):
            result["batches"][str(batch)] = measure(segmenter, frames, batch)
            save()
        return result

    section("torch_fp16_compiled", compiled_bench)
    torch.cuda.empty_cache()
    section("torch_fp16_compiled_cuda_graphs", lambda: graphs_bench("compiled + cuda graphs", (1, 16)))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
