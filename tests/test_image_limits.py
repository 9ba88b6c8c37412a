"""Pixel limit: an image's size comes from its header and an oversized one is refused before decoding."""

from __future__ import annotations

import io
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from engine.tools.image_io import check_image_size, image_dimensions, read_image
from tests.crafted_images import png_declaring, tiff_declaring


@pytest.mark.parametrize("extension", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
def test_header_size_of_common_formats(extension):
    ok, encoded = cv2.imencode(extension, np.zeros((37, 53, 3), np.uint8))
    assert ok and image_dimensions(encoded.tobytes()) == (53, 37)


def test_progressive_jpeg_with_exif_before_the_frame_header():
    buffer = io.BytesIO()
    Image.new("RGB", (61, 29)).save(buffer, "JPEG", progressive=True, exif=b"Exif\x00\x00" + b"x" * 500)
    assert image_dimensions(buffer.getvalue()) == (61, 29)


def test_png_bomb_is_refused_without_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    assert bomb.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(InputError) as err:
        read_image(bomb)
    assert time.perf_counter() - started < 5.0, "refused from the header, not after decoding 1.2 GB (generous: CI shares two cores)"
    assert str(err.value) == (f"{bomb}: image is 20000×20000 (400.0 MP), over the limit of 100 MP "
                              "(limits.max_image_pixels); refused without decoding")


def test_limit_is_configurable(tmp_path):
    image = tmp_path / "small.png"
    cv2.imwrite(str(image), np.zeros((40, 50, 3), np.uint8))
    assert read_image(image, max_pixels=2000).shape == (40, 50, 3)
    with pytest.raises(InputError, match=r"small.png: image is 50×40 \(0.0 MP\), over the limit of 0.001999 MP"):
        read_image(image, max_pixels=1999)


def test_pillow_formats_over_its_own_bomb_limit_are_refused():
    assert image_dimensions(tiff_declaring(300, 200)) == (300, 200)
    with pytest.raises(InputError, match="x.tif: image has more than 178.957 MP, over the limit of 100 MP"):
        check_image_size(tiff_declaring(20000, 20000), "x.tif")

