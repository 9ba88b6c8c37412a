"""Reading image files for the CLI: refuse unreadable, truncated or oversized files with a clear message.

An image's size is read from its header before anything is decoded: a small PNG can
declare 20000×20000 pixels and take tens of GB to decode, so a file over the pixel
limit is refused from its first bytes.
"""

from __future__ import annotations

import io
import struct
import warnings
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


DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
"""100 MP: more than any industrial camera of today, far less than what exhausts a host's memory."""

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first start-of-frame segment (the markers before it are skipped by length)."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def image_dimensions(data: bytes) -> tuple[int | None, int] | None:
    """(width, height) as the image's header declares them, without decoding; None when unknown.

    PNG, JPEG and BMP are read here; other formats through Pillow's lazy open (header only),
    which refuses to say the size of one over its own bomb limit: that is (None, its limit).
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError:
        return None, 2 * (Image.MAX_IMAGE_PIXELS or 0)
    except (OSError, ValueError, SyntaxError, struct.error):
        return None


def check_image_size(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """The header's (width, height); InputError when it cannot be read or declares more than `max_pixels`."""
    size = image_dimensions(data)
    if size is None:
        raise InputError(f"{name}: not a readable image (PNG, JPEG, BMP, TIFF, …)")
    width, height = size
    if width is None:
        if height > max_pixels:
            raise InputError(f"{name}: image has more than {height / 1e6:g} MP, over the limit of "
                             f"{max_pixels / 1e6:g} MP (limits.max_image_pixels); refused without decoding")
        raise InputError(f"{name}: image has more than {height / 1e6:g} MP; save it as PNG or JPEG to use a "
                         f"limit above that")
    if width * height > max_pixels:
        raise InputError(f"{name}: image is {width}×{height} ({width * height / 1e6:.1f} MP), over the limit of "
                         f"{max_pixels / 1e6:g} MP (limits.max_image_pixels); refused without decoding")
    return width, height


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """The file's pixels as RGB (or gray / RGBA as stored, any bit depth); InputError if unreadable
    or larger than `max_pixels` (checked from the header, before decoding)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise InputError(f"{path}: file is empty")
    if _truncated(data):
        raise InputError(f"{path}: image file is truncated")
    check_image_size(data, str(path), max_pixels)
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
