"""`iseg bench`: per-stage timings, frames/s and peak memory of the engine (JSON).

The fast path (capture on the read layers only, SDPA elsewhere, UNet stopped after the
last read layer) is compared with the naive path (every layer's per-head probabilities
kept, the whole UNet run) on the same frames at batch 1.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import torch

from engine.method.preprocess import frames_to_batch
from engine.results import ClassSet

BENCH_CLASSES = ClassSet(("scratch", "dent"), "metal surface, table, background")


def bench_frames(count: int, height: int = 480, width: int = 640, seed: int = 0) -> list[np.ndarray]:
    """Deterministic synthetic inspection frames: a textured plate with a dark scratch and a dent."""
    rng = np.random.default_rng(seed)
    frames = []
    rows, cols = np.mgrid[0:height, 0:width]
    for index in range(count):
        plate = 140 + 25 * np.sin(cols / 17.0 + index) + rng.normal(0, 6, (height, width))
        slope = (index % 5 + 1) / 6.0
        scratch = np.abs(rows - (height * 0.3 + slope * (cols - width / 2) * 0.3)) < 3
        dent = (rows - height * 0.7) ** 2 + (cols - width * (0.3 + (0.08 * index) % 0.4)) ** 2 < (height * 0.06) ** 2
        gray = np.where(scratch, 40, np.where(dent, 90, plate))
        frame = np.stack([gray, gray * 0.97, gray * 0.9], axis=-1)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def _reset_host_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _host_peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure(segmenter: Any, frames: list[np.ndarray], batch: int, naive: bool = False) -> dict[str, Any]:
    """Run `frames` through the segmenter in batches (after one warm-up batch) and time it,
    as the daemon's worker runs it: labels and presence come back, the float maps do not."""
    device = segmenter.model.device
    segmenter.segment(frames[:batch], BENCH_CLASSES, naive=naive, keep_maps=False)
    _reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stages: dict[str, list[float]] = {}
    latencies = []
    started = time.perf_counter()
    for first in range(0, len(frames), batch):
        chunk = frames[first:first + batch]
        batch_started = time.perf_counter()
        results = segmenter.segment(chunk, BENCH_CLASSES, naive=naive, keep_maps=False)
        latencies.append((time.perf_counter() - batch_started) * 1000.0)
        for key, value in results[0].timings_ms.items():
            stages.setdefault(key, []).append(value)
    elapsed = time.perf_counter() - started
    report: dict[str, Any] = {
        "batch": batch,
        "frames": len(frames),
        "fps": len(frames) / elapsed,
        "stage_ms_per_frame": {key: float(np.mean(values)) for key, values in stages.items()},
        "batch_latency_ms": {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99))},
        "peak_host_mb": _host_peak_mb(),
    }
    if device.type == "cuda":
        report["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
"""Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU."""


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense half-precision peak, if known (None on CPU or unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def flops_per_frame(segmenter: Any, frames: list[np.ndarray]) -> float:
    """FLOPs of one frame through VAE encode + the truncated UNet (torch path), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    entry = segmenter.prepare(BENCH_CLASSES)
    with FlopCounterMode(display=False) as counter:
        pixels = frames_to_batch(frames[:1], segmenter.settings.size, segmenter.model.device)
        backend = segmenter.torch_backend
        latents = backend.encode_eager(pixels)[0]
        backend.attention_sums(latents, segmenter.timestep.reshape(1), entry.embedding[None].to(segmenter.model.dtype))
    return float(counter.get_total_flops())


def run_bench(segmenters: dict[str, Any], frames: int = 8, batches: tuple[int, ...] = (1, 4),
              naive: bool = True) -> dict[str, Any]:
    """The JSON report: each backend at each batch size, the naive path at the first, and ratios.

    `segmenters` maps a backend name ("torch", "onnx") to a Segmenter on the same model.
    """
    images = bench_frames(frames)
    first_name, first = next(iter(segmenters.items()))
    model = first.model
    report: dict[str, Any] = {
        "model": str(model.path), "family": model.family, "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""), "size": first.settings.size,
        "frame_hw": list(images[0].shape[:2]), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "backends": {},
        "cuda_graphs": first.torch_backend.cuda_graphs,
    }
    if model.device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(model.device)
    flops = flops_per_frame(first, images) if "torch" in segmenters else None
    peak = peak_tflops(model.device)
    report["gflop_per_frame"] = flops / 1e9 if flops else None
    for name, segmenter in segmenters.items():
        runs = {}
        for batch in batches:
            entry = measure(segmenter, images, batch)
            if flops:
                entry["achieved_tflops"] = flops * entry["fps"] / 1e12
                entry["mfu"] = entry["achieved_tflops"] / peak if peak else None
            runs[str(batch)] = entry
        report["backends"][name] = runs
    key = str(batches[0])
    report["fast_fps"] = report["backends"][first_name][key]["fps"]
    report["fast_fps_best"] = max(entry["fps"] for entry in report["backends"][first_name].values())
    if "torch" in segmenters and "onnx" in segmenters:
        by_batch = {batch: report["backends"]["torch"][batch]["fps"] / report["backends"]["onnx"][batch]["fps"]
                    for batch in report["backends"]["torch"]}
        report["onnx_over_torch_time_by_batch"] = by_batch
        report["onnx_over_torch_time"] = float(np.mean(list(by_batch.values())))
    if naive and "torch" in segmenters:
        torch_segmenter = segmenters["torch"]
        report["naive"] = measure(torch_segmenter, images, batches[0], naive=True)
        report["naive_fps"] = report["naive"]["fps"]
        report["speedup_vs_naive"] = report["backends"]["torch"][key]["fps"] / report["naive_fps"]
        fast = torch_segmenter.segment(images[:1], BENCH_CLASSES)[0]
        slow = torch_segmenter.segment(images[:1], BENCH_CLASSES, naive=True)[0]
        report["naive_label_agreement"] = float((fast.labels == slow.labels).mean())
        report["naive_max_map_diff"] = float(np.abs(fast.maps - slow.maps).max())
    return report
