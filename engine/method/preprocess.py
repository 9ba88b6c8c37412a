"""Frames to the tensor the VAE takes (docs/method.md §1.1), and what a frame must be to get there."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """Three channels in the frame's own pixel type: gray is repeated, alpha dropped."""
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    if frame.shape[2] == 4:
        return frame[:, :, :3]
    return frame


def frames_to_batch(frames: list[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """[B, 3, size, size] float32 in [-1, 1] on `device`.

    The frame travels in its own pixel type (pinned on CUDA) and is resized there:
    bilinear with half-pixel centres and no antialiasing, which is exactly OpenCV's
    INTER_LINEAR (aspect not kept), then /255 and 2x − 1. 16-bit frames are scaled by 1/257.
    """
    batch = []
    for frame in frames:
        pixels = torch.from_numpy(np.ascontiguousarray(to_rgb(frame)).astype(np.int32 if frame.dtype == np.uint16 else frame.dtype, copy=False))
        if device.type == "cuda":
            pixels = pixels.pin_memory().to(device, non_blocking=True)
        image = pixels.permute(2, 0, 1)[None].float()
        if frame.dtype == np.uint16:
            image = image / 257.0
        batch.append(F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(batch).div_(255.0).mul_(2.0).sub_(1.0)
