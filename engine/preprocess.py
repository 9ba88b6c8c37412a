"""Frames to the tensor the VAE takes (ISEG_SPEC §1.1), and what a frame must be to get there."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from engine.errors import InputError

MIN_SIDE = 8
"""Smaller frames are refused: there is nothing to segment. Frames smaller than the latent
grid but at least this big are upsampled like any other."""


def check_frame(frame: np.ndarray, name: str = "frame") -> None:
    """Raise InputError naming what is wrong with a frame the engine cannot take."""
    if not isinstance(frame, np.ndarray):
        raise InputError(f"{name}: expected a numpy image array, got {type(frame).__name__}")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
        raise InputError(f"{name}: shape {frame.shape} is not an image (H×W, H×W×1, H×W×3 or H×W×4)")
    if frame.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise InputError(f"{name}: pixel type {frame.dtype} is not supported (uint8, uint16 or float in 0..255)")
    if min(frame.shape[:2]) < MIN_SIDE:
        raise InputError(f"{name}: {frame.shape[1]}×{frame.shape[0]} is too small; frames need at least {MIN_SIDE} pixels a side")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise InputError(f"{name}: contains NaN or infinite pixel values")


def to_rgb_float(frame: np.ndarray) -> np.ndarray:
    """RGB float32 in [0, 255]: gray is repeated, alpha dropped, 16-bit scaled down."""
    image = frame
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 257.0
    return image.astype(np.float32)


def frames_to_batch(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """[B, 3, size, size] in [-1, 1]: resize with INTER_LINEAR (aspect not kept), /255, 2x − 1."""
    batch = []
    for frame in frames:
        resized = cv2.resize(to_rgb_float(frame), (size, size), interpolation=cv2.INTER_LINEAR)
        batch.append(2.0 * (resized / 255.0) - 1.0)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
