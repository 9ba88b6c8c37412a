"""Reading image files for the CLI: refuse unreadable or truncated files with a clear message."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engine.errors import InputError


def _truncated(data: bytes) -> bool:
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-64:]
    if data.startswith(b"\xff\xd8"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    return False


def read_image(path: str | Path) -> np.ndarray:
    """The file's pixels as RGB (or gray / RGBA as stored, any bit depth); InputError if unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise InputError(f"{path}: file is empty")
    if _truncated(data):
        raise InputError(f"{path}: image file is truncated")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"{path}: not a readable image (PNG, JPEG, BMP, TIFF, …)")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB or single-channel image as PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write PNG")
