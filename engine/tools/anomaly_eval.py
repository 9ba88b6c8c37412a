"""`iseg eval --format mvtec|visa`: the anomaly-detection protocol on MVTec AD / VisA layouts.

Each image is segmented with its category's classes (the defect types, or `--classes`).
Its image score is the presence score, max over the classes; its pixel map is the refined
maps' max over the classes, resized to the mask's resolution; its labels (any class) give
the defect/background mIoU. Every image's result is cached under
`OUT/cache/<category>/<run id>/<key>.npz` as soon as its batch is done, the run id being a
hash of the model, settings and classes, so an interrupted run continues where it
stopped and a changed run never reuses stale results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.errors import InputError
from engine.results import ClassSet
from engine.tools.anomaly_data import Sample, default_classes, read_anomaly_dataset, read_binary_mask
from engine.tools.anomaly_metrics import (OPERATING_FPRS, auroc, average_precision, binary_miou, operating_point,
                                          pro)
from engine.tools.evaluate import print_progress
from engine.tools.image_io import DEFAULT_MAX_IMAGE_PIXELS, read_image, write_png

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro", "miou")


def run_id(segmenter: Any, classes: tuple[str, ...]) -> str:
    """Short hash of what decides an image's result: model, method settings, class set."""
    settings = segmenter.settings
    text = json.dumps({"model": getattr(segmenter, "fingerprint", ""), "classes": list(classes),
                       "settings": repr(dataclasses.asdict(settings)) if dataclasses.is_dataclass(settings)
                       else repr(settings)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_cached(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _segment_batch(segmenter: Any, batch: list[tuple[Sample, Path]], class_set: ClassSet,
                   max_pixels: int, maps_dir: Path | None) -> None:
    frames, masks = [], []
    for sample, _ in batch:
        image = read_image(sample.image, max_pixels)
        frames.append(image)
        mask = read_binary_mask(sample.mask, image.shape[:2], max_pixels)
        masks.append(mask)
    for (sample, path), frame, mask, result in zip(batch, frames, masks,
                                                   segmenter.segment(frames, class_set, keep_maps=True)):
        pixel = result.maps.max(axis=0).astype(np.float32)
        labels = (result.labels > 0).astype(np.uint8)
        if pixel.shape != mask.shape:
            pixel = cv2.resize(pixel, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
            labels = cv2.resize(labels, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_NEAREST)
        _save_cached(path, score=np.float32(result.presence.max()), presence=result.presence.astype(np.float32),
                     map=pixel.astype(np.float16), labels=labels, mask=mask)
        if maps_dir is not None:
            write_png(maps_dir / f"{sample.key}.png", np.clip(pixel * 255.0, 0, 255).astype(np.uint8))


def category_metrics(entries: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Every metric of one category from its cached per-image results."""
    truth = np.array([bool(e["mask"].any()) for e in entries])
    scores = np.array([float(e["score"]) for e in entries])
    masks = [e["mask"] for e in entries]
    maps = [e["map"].astype(np.float32) for e in entries]
    pixels_truth = np.concatenate([m.ravel() for m in masks])
    pixels_score = np.concatenate([m.ravel() for m in maps])
    matrix = np.zeros((2, 2), dtype=np.int64)
    for e in entries:
        if e["mask"].any():
            matrix += np.bincount(e["mask"].ravel().astype(np.int64) * 2 + e["labels"].ravel(),
                                  minlength=4).reshape(2, 2)
    return {
        "image_auroc": auroc(truth, scores), "image_ap": average_precision(truth, scores),
        "pixel_auroc": auroc(pixels_truth, pixels_score), "pixel_ap": average_precision(pixels_truth, pixels_score),
        "pro": pro(masks, maps), "miou": binary_miou(matrix),
        "operating_points": {f"{fpr:g}": operating_point(truth, scores, fpr) for fpr in OPERATING_FPRS},
        "images": len(entries), "defective": int(truth.sum()),
    }


def mean_metrics(categories: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over categories (the field's convention), skipping a metric a category lacks;
    operating points average the recall and the false-alarm rate measured at each target."""
    mean: dict[str, Any] = {}
    for key in METRICS:
        values = [c[key] for c in categories.values() if c[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    points: dict[str, Any] = {}
    for fpr in OPERATING_FPRS:
        found = [c["operating_points"][f"{fpr:g}"] for c in categories.values() if c["operating_points"][f"{fpr:g}"]]
        points[f"{fpr:g}"] = ({"recall": float(np.mean([p["recall"] for p in found])),
                               "fpr": float(np.mean([p["fpr"] for p in found]))} if found else None)
    mean["operating_points"] = points
    mean["images"] = int(sum(c["images"] for c in categories.values()))
    return mean


def evaluate_anomaly(segmenter: Any, data: Path, fmt: str, out_dir: Path, category: str | None = None,
                     classes: tuple[str, ...] | None = None, batch_size: int = 4, progress: bool = True,
                     save_maps: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Segment every test image not yet cached in `out_dir`, then score each category and the mean."""
    dataset = read_anomaly_dataset(data, fmt, category)
    total = sum(len(samples) for samples in dataset.values())
    done = 0
    started = time.perf_counter()
    report: dict[str, dict[str, Any]] = {}
    for name, samples in dataset.items():
        prompt = tuple(classes) if classes else default_classes(samples, fmt)
        class_set = ClassSet(prompt, segmenter.settings.bg_context)
        cache = out_dir / "cache" / name / run_id(segmenter, class_set.classes)
        cache.mkdir(parents=True, exist_ok=True)
        maps_dir = out_dir / "maps" / name if save_maps else None
        if maps_dir is not None:
            maps_dir.mkdir(parents=True, exist_ok=True)
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise InputError(f"category {name}: two test images share a defect type and file stem; rename one")
        todo = [(s, cache / f"{s.key}.npz") for s in samples if not (cache / f"{s.key}.npz").is_file()]
        done += len(samples) - len(todo)
        if progress and len(todo) < len(samples):
            print_progress(done, total, started)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            _segment_batch(segmenter, batch, class_set, max_pixels, maps_dir)
            done += len(batch)
            if progress:
                print_progress(done, total, started)
        entries = []
        for sample in samples:
            with np.load(cache / f"{sample.key}.npz") as cached:
                entries.append({key: cached[key] for key in ("score", "map", "labels", "mask")})
        report[name] = dict(category_metrics(entries), classes=list(class_set.classes))
    return {"categories": report, "mean": mean_metrics(report)}


def format_anomaly_table(report: dict[str, Any]) -> str:
    """Per-category metrics in percent, then the mean, for the terminal."""
    def cell(value: float | None) -> str:
        return f"{'n/a':>8}" if value is None else f"{100 * value:8.1f}"

    rows = list(report["categories"].items()) + [("mean", report["mean"])]
    width = max(12, *(len(name) + 2 for name, _ in rows))
    heads = ("img AUROC", "img AP", "px AUROC", "px AP", "PRO", "mIoU", "R@1%FPR", "R@5%FPR")
    lines = [f"{'category':<{width}}" + "".join(f"{h:>10}" for h in heads)]
    for name, row in rows:
        points = [row["operating_points"].get(f"{fpr:g}") for fpr in OPERATING_FPRS]
        values = [row[key] for key in METRICS] + [p["recall"] if p else None for p in points]
        lines.append(f"{name:<{width}}" + "".join(f"  {cell(v)}" for v in values))
    return "\n".join(lines)
