"""Colour overlays of label masks, for operators and for `iseg segment`."""

from __future__ import annotations

import numpy as np

PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
], dtype=np.float32)
"""RGB colour of class k is PALETTE[(k − 1) % len]; background is left as is."""


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the frame with each labelled pixel blended towards its class colour."""
    base = rgb.astype(np.float32)
    if base.ndim == 2:
        base = np.repeat(base[:, :, None], 3, axis=2)
    base = base[:, :, :3]
    if rgb.dtype == np.uint16:
        base = base / 257.0
    out = base.copy()
    mask = labels > 0
    colours = PALETTE[(labels[mask].astype(np.int64) - 1) % len(PALETTE)]
    out[mask] = (1 - alpha) * base[mask] + alpha * colours
    return np.clip(out, 0, 255).astype(np.uint8)
