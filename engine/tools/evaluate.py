"""mIoU evaluation on a labelled folder, with the paper's pseudo-mask protocol.

Layout: images/<stem>.<ext>, masks/<stem>.png (indexed PNG: 0 background, i = i-th line
of classes.txt, 255 ignore), classes.txt. Each image is segmented with exactly the
classes present in its own mask; IoU comes from one confusion matrix over all pixels.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import InputError
from engine.results import ClassSet
from engine.tools.image_io import DEFAULT_MAX_IMAGE_PIXELS, check_image_size, read_image

IGNORE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_dataset(folder: Path) -> tuple[list[str], list[tuple[Path, Path]]]:
    """Class names and (image, mask) pairs; InputError names what is missing."""
    classes_file = folder / "classes.txt"
    if not classes_file.is_file():
        raise InputError(f"--data: {folder} has no classes.txt (one class name per line, line i = label i)")
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    if not classes:
        raise InputError(f"{classes_file}: no class names")
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"--data: {folder} needs images/ and masks/ folders")
    pairs = []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = masks_dir / (image.stem + ".png")
        if not mask.is_file():
            raise InputError(f"{image}: no mask {mask}")
        pairs.append((image, mask))
    if not pairs:
        raise InputError(f"--data: {images_dir} holds no images")
    return classes, pairs


def read_mask(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Label indices of an indexed (palette) or grayscale PNG (its size checked before decoding)."""
    check_image_size(path.read_bytes(), str(path), max_pixels)
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise InputError(f"{path}: mask must be an indexed or grayscale PNG, not {image.mode}")
        return np.array(image).astype(np.int64)


def confusion(truth: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """[n, n] counts (rows truth, columns prediction), ignoring IGNORE pixels."""
    keep = truth != IGNORE
    return np.bincount(truth[keep] * n + predicted[keep], minlength=n * n).reshape(n, n)


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for a class that never appears in truth or prediction."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / total)
    rate = done / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.2f} img/s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def evaluate(segmenter: Any, folder: Path, batch_size: int = 4, progress: bool = True,
             max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Segment every image with its own classes and accumulate the confusion matrix."""
    classes, pairs = read_dataset(folder)
    n = len(classes) + 1
    matrix = np.zeros((n, n), dtype=np.int64)
    started = time.perf_counter()
    skipped = []
    batch: list[tuple[np.ndarray, np.ndarray, list[int]]] = []

    def flush() -> None:
        if not batch:
            return
        frames = [image for image, _, _ in batch]
        sets = [ClassSet(tuple(classes[i - 1] for i in present), segmenter.settings.bg_context) for _, _, present in batch]
        for (image, truth, present), result in zip(batch, segmenter.segment(frames, sets, keep_maps=False)):
            lookup = np.array([0] + present, dtype=np.int64)
            matrix[...] += confusion(truth, lookup[result.labels.astype(np.int64)], n)
        batch.clear()

    for index, (image_path, mask_path) in enumerate(pairs, 1):
        truth = read_mask(mask_path, max_pixels)
        image = read_image(image_path, max_pixels)
        if truth.shape != image.shape[:2]:
            raise InputError(f"{mask_path}: mask is {truth.shape[1]}×{truth.shape[0]} but the image is "
                             f"{image.shape[1]}×{image.shape[0]}")
        present = sorted(int(v) for v in np.unique(truth) if v not in (0, IGNORE))
        if any(v > len(classes) for v in present):
            raise InputError(f"{mask_path}: label {max(present)} has no line in classes.txt ({len(classes)} classes)")
        if not present:
            skipped.append(image_path.name)
        else:
            batch.append((image, truth, present))
            if len(batch) >= batch_size:
                flush()
        if progress:
            _progress(index, len(pairs), started)
    flush()
    iou = iou_from_confusion(matrix)
    names = ["background"] + classes
    return {
        "images": len(pairs) - len(skipped),
        "skipped_without_classes": skipped,
        "miou": float(np.nanmean(iou)),
        "iou": {name: (None if np.isnan(value) else float(value)) for name, value in zip(names, iou)},
        "pixel_accuracy": float(np.diag(matrix).sum() / max(matrix.sum(), 1)),
        "seconds": round(time.perf_counter() - started, 3),
    }


def format_table(report: dict[str, Any]) -> str:
    """Per-class IoU table and the mIoU, for the terminal."""
    width = max(len(name) for name in report["iou"]) + 2
    lines = [f"{'class':<{width}}IoU"]
    for name, value in report["iou"].items():
        lines.append(f"{name:<{width}}{'  n/a' if value is None else f'{100 * value:5.1f}'}")
    lines.append(f"{'mIoU':<{width}}{100 * report['miou']:5.1f}  ({report['images']} images)")
    return "\n".join(lines)
