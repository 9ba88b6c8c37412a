"""What operators see of a result: the overlay JPEG, the label PNG, and per-class regions
(area and bounding boxes, in full-frame coordinates when the camera has an ROI)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from engine import PALETTE

PALETTE_RGB = [tuple(int(v) for v in colour) for colour in PALETTE]
"""The engine's class colours (class k: PALETTE_RGB[(k − 1) % len]), so overlays match `iseg segment`."""


def regions(labels: np.ndarray, classes: list[str], roi_offset: list[int], min_area_px: int, max_boxes: int) -> dict[str, Any]:
    """Per class: labelled area (pixels, fraction) and the largest connected components' boxes [x, y, w, h]."""
    total = labels.size
    ox, oy = roi_offset
    out: dict[str, Any] = {}
    for k, name in enumerate(classes, start=1):
        mask = (labels == k).astype(np.uint8)
        area = int(mask.sum())
        boxes = []
        if area:
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            components = sorted((stats[i] for i in range(1, count) if stats[i][cv2.CC_STAT_AREA] >= min_area_px),
                                key=lambda s: -int(s[cv2.CC_STAT_AREA]))
            boxes = [[int(s[0]) + ox, int(s[1]) + oy, int(s[2]), int(s[3])] for s in components[:max_boxes]]
        out[name] = {"area_px": area, "area_frac": area / total, "boxes": boxes}
    return out


def overlay_rgb(frame: np.ndarray, labels: np.ndarray, classes: list[str], flagged: list[str],
                presence: dict[str, float], region_info: dict[str, Any], roi_offset: list[int]) -> np.ndarray:
    """Frame with every class's mask tinted (flagged classes stronger, with boxes) and a score legend."""
    image = frame.astype(np.float32)
    for k, name in enumerate(classes, start=1):
        colour = np.array(PALETTE_RGB[(k - 1) % len(PALETTE_RGB)], np.float32)
        alpha = 0.5 if name in flagged else 0.2
        mask = labels == k
        image[mask] = image[mask] * (1 - alpha) + colour * alpha
    out = np.clip(image, 0, 255).astype(np.uint8)
    ox, oy = roi_offset
    scale = max(0.35, min(out.shape[:2]) / 600)
    for k, name in enumerate(classes, start=1):
        colour = PALETTE_RGB[(k - 1) % len(PALETTE_RGB)]
        if name in flagged:
            for x, y, w, h in region_info[name]["boxes"]:
                cv2.rectangle(out, (x - ox, y - oy), (x - ox + w - 1, y - oy + h - 1), colour, 2)
        text = f"{name} {presence.get(name, 0.0):.2f}{' !' if name in flagged else ''}"
        cv2.putText(out, text, (4, int(16 * scale * 2) * k), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return out


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """RGB → JPEG bytes."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def encode_png(image: np.ndarray, rgb: bool = False) -> bytes:
    """Lossless PNG; `rgb` images are converted to OpenCV's BGR first."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb else image,
                            [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()
