"""Per-class thresholds from known-good frames, and the threshold the worker applies.

iSeg's maps are min-max normalised, so a mask appears even on a good part; only the
presence score says whether a class is really there. Calibration runs N known-good
frames, keeps each class's score distribution and sets threshold = quantile + margin.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import CameraConfig, ConfigError, DaemonConfig, LimitsConfig
from daemon.thresholds import calibration_file


def summarise(scores: np.ndarray, classes: tuple[str, ...], quantile: float, margin: float) -> dict[str, Any]:
    """Distribution and threshold per class from an [N, K] array of presence scores."""
    result: dict[str, Any] = {}
    for k, name in enumerate(classes):
        column = scores[:, k].astype(np.float64)
        q = float(np.quantile(column, quantile))
        counts, edges = np.histogram(column, bins=20, range=(0.0, 1.0))
        result[name] = {
            "threshold": min(1.0, q + margin),
            "quantile": quantile, "margin": margin, "n": int(column.size),
            "mean": float(column.mean()), "std": float(column.std()),
            "min": float(column.min()), "max": float(column.max()),
            "p50": float(np.quantile(column, 0.5)), "p90": float(np.quantile(column, 0.9)),
            "p99": float(np.quantile(column, 0.99)),
            "histogram": {"edges": [round(e, 3) for e in edges.tolist()], "counts": counts.tolist()},
        }
    return result


def save_calibration(config: DaemonConfig, camera: CameraConfig, scores: np.ndarray, model_fingerprint: str,
                     frames: list[np.ndarray] | None = None) -> Path:
    """Write the calibration atomically (tmp + rename) so a worker never reads half a file; with the
    frames, the health baselines (sharpness, brightness) are stored with it."""
    from daemon.linestats.health import baseline_from_frames

    path = calibration_file(config, camera.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"camera": camera.id, "classes": list(camera.classes), "bg_context": camera.bg_context,
                "model": model_fingerprint, "created": time.time(),
                "per_class": summarise(scores, camera.classes, config.calibration.quantile, config.calibration.margin)}
    if frames:
        document["health_baseline"] = baseline_from_frames(frames)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2))
    os.replace(tmp, path)
    return path


def collect_frames(camera: CameraConfig, count: int, timeout_s: float = 120.0,
                   max_pixels: int = LimitsConfig().max_image_pixels) -> list[np.ndarray]:
    """N frames straight from the camera (ROI applied), with the capture role's source readers."""
    from daemon.sources import SourceError, apply_roi, open_source

    source = open_source(camera, max_pixels)
    source.open()
    frames: list[np.ndarray] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(frames) < count:
            if time.monotonic() > deadline:
                raise SourceError(f"got only {len(frames)} of {count} frames within {timeout_s:g}s")
            frames.append(apply_roi(source.read(), camera.roi))
    finally:
        source.close()
    return frames


def run_calibration(config: DaemonConfig, camera_id: str, count: int, report: Any = print) -> Path:
    """Segment `count` known-good frames, store the score distribution and thresholds; returns the file."""
    from daemon.linestats.overrides import ThresholdBook
    from daemon.model_setup import load_segmenter

    camera = config.camera(camera_id)
    if not 2 <= count <= 100_000:
        raise ConfigError("--frames: calibrate on 2..100000 known-good frames (hundreds are better)")
    segmenter, class_sets = load_segmenter(config, logging.getLogger("iseg.calibrate"))
    frames = collect_frames(camera, count, max_pixels=config.limits.max_image_pixels)
    scores = []
    step = config.worker.batch_size
    for start in range(0, len(frames), step):
        batch = frames[start:start + step]
        results = segmenter.segment(batch, class_sets[camera.id], keep_maps=False)
        scores += [r.presence for r in results]
        report(f"  {start + len(batch)}/{count} frames")
    path = save_calibration(config, camera, np.stack(scores), segmenter.fingerprint, frames)
    document = json.loads(path.read_text())
    book = ThresholdBook(config)
    for name, stats in document["per_class"].items():
        report(f"  {name}: mean {stats['mean']:.3f}, p99 {stats['p99']:.3f}, max {stats['max']:.3f} -> threshold {stats['threshold']:.3f}")
        book.set(camera.id, name, stats["threshold"], user="calibrate",
                 reason=f"calibration on {count} known-good frames "
                        f"(q{config.calibration.quantile:g} + {config.calibration.margin:g})")
    report(f"calibration written to {path}; thresholds set as live overrides (running workers apply them; "
           "see `iseg thresholds show`)")
    return path


def health_baselines(config: DaemonConfig) -> dict[str, dict[str, Any]]:
    """Per camera, the health baselines stored with its calibration: image measures and the
    presence histogram of every class (for the drift check)."""
    out: dict[str, dict[str, Any]] = {}
    for camera in config.cameras:
        try:
            document = json.loads(calibration_file(config, camera.id).read_text())
        except (OSError, ValueError):
            continue
        if document.get("classes") != list(camera.classes):
            continue
        out[camera.id] = {"image": document.get("health_baseline"),
                          "presence": {name: v["histogram"]["counts"] for name, v in document["per_class"].items()}}
    return out


def eval_operating_point(document: Any, fpr: float, category: str | None, source: str) -> tuple[str, dict[str, Any]]:
    """The category and its operating point at `fpr` from an `iseg eval --json` document; the error
    names what is missing and what the file has."""
    categories = document.get("categories") if isinstance(document, dict) else None
    if not isinstance(categories, dict) or not categories:
        raise ConfigError(f"--from-eval: {source} is not an `iseg eval --format mvtec|visa --json` result "
                          "(no \"categories\")")
    if category is None:
        if len(categories) > 1:
            raise ConfigError(f"--from-eval: {source} holds {len(categories)} categories; pick one with --category "
                              f"({', '.join(categories)})")
        category = next(iter(categories))
    if category not in categories:
        raise ConfigError(f"--category: {category!r} is not in {source} (it has: {', '.join(categories)})")
    points = categories[category].get("operating_points") or {}
    point = points.get(f"{fpr:g}")
    if not isinstance(point, dict) or "threshold" not in point:
        have = [k for k, v in points.items() if isinstance(v, dict) and "threshold" in v]
        raise ConfigError(f"--fpr {fpr:g}: {source} has no operating point there for {category} "
                          f"(it has: {', '.join(have) or 'none: the category needs good and defective images'})")
    return category, point


def calibrate_from_eval(config: DaemonConfig, camera_id: str, eval_path: Path, fpr: float,
                        category: str | None = None, report: Any = print) -> Path:
    """Set every class of the camera to the eval's image-level threshold at false-alarm rate `fpr`.

    The eval scored an image by its presence, max over the classes, so one threshold for all
    classes flags exactly the images the eval counted at that rate. The thresholds go through
    the audited live overrides, as a frame calibration's do; the known-good calibration file
    (and its health baselines) is left as it is. Returns the overrides folder.
    """
    from daemon.linestats.overrides import ThresholdBook, overrides_dir

    camera = config.camera(camera_id)
    try:
        document = json.loads(Path(eval_path).read_text())
    except OSError as error:
        raise ConfigError(f"--from-eval: cannot read {eval_path} ({error.strerror})") from None
    except ValueError:
        raise ConfigError(f"--from-eval: {eval_path} is not JSON (write it with `iseg eval ... --json FILE`)") from None
    category, point = eval_operating_point(document, fpr, category, str(eval_path))
    threshold = float(point["threshold"])
    recall = point.get("recall")
    evaluated = document["categories"][category].get("classes")
    if evaluated and list(evaluated) != list(camera.classes):
        report(f"  note: the eval prompted {', '.join(evaluated)}; camera {camera.id} prompts "
               f"{', '.join(camera.classes)}: presence scores are comparable only for the same prompt and model")
    recall_text = f", recall {100 * recall:.1f}%" if isinstance(recall, (int, float)) else ""
    book = ThresholdBook(config)
    for name in camera.classes:
        book.set(camera.id, name, threshold, user="calibrate",
                 reason=f"eval {eval_path}, {category} at {100 * fpr:g}% image false alarms{recall_text}")
    report(f"  {category} at {100 * fpr:g}% false alarms: threshold {threshold:.4f}{recall_text}"
           f" -> every class of {camera.id}")
    report("thresholds set as live overrides (running workers apply them; see `iseg thresholds show`)")
    return overrides_dir(config.state_path)
