"""Hand-made image files for the pixel-limit tests: a valid PNG that declares any size."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """An RGB PNG whose header says width×height but whose pixel data is a few hundred bytes
    (decoding it would allocate width×height×3 bytes: the decompression bomb of the issue)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian bilevel TIFF whose one IFD says width×height (strip data left out)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 1), (259, 3, 1), (262, 3, 1),
            (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 0)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
