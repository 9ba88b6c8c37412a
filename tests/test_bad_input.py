"""Bad models, bad images and bad class lists: clear one-line errors, and the rest goes on."""

import argparse
import shutil
import time

import cv2
import numpy as np
import pytest

from engine.errors import InputError, ModelLoadError, SettingsError
from engine.model.loader import load_model
from engine.results import ClassSet
from engine.segmenter import Segmenter
from engine.settings import IsegSettings
from engine.tools.cli import resolve_options
from engine.tools.samples import sample_paths
from tests.crafted_images import png_declaring
from tests.engine_cli import run_iseg

SMALL = IsegSettings(size=256)


def _one_line_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
    assert lines, result.stderr
    return lines[0]


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(tmp_path)


@pytest.mark.slow
def test_incomplete_model_folder(tiny_sd21, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_sd21, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        load_model(copy)
    result = run_iseg("segment", str(sample_paths()[0]), "--model", str(copy), "--classes", "scratch",
                      "--out", str(tmp_path / "o"), cache_dir=tmp_path / "c")
    assert "vae" in _one_line_error(result)


@pytest.mark.slow
def test_unet_without_the_read_layers(tiny_sd21, tmp_path):
    # A UNet that loads fine (config and weights agree) but whose second down block has no
    # attention: the layer check, not the weight loader, must refuse it, and say which layer.
    from diffusers import UNet2DConditionModel

    copy = tmp_path / "model"
    shutil.copytree(tiny_sd21, copy)
    config = dict(UNet2DConditionModel.load_config(copy / "unet"))
    config["down_block_types"] = ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    config["up_block_types"] = ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
    shutil.rmtree(copy / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(copy / "unet", safe_serialization=True)
    with pytest.raises(ModelLoadError) as error:
        load_model(copy)
    assert str(error.value).startswith("unet: layer down_blocks.1.attentions.1.transformer_blocks.0.attn2 is missing")
    assert "SD 1.x/2.x UNet topology" in str(error.value)
    result = run_iseg("segment", str(sample_paths()[0]), "--model", str(copy), "--classes", "scratch",
                      "--out", str(tmp_path / "o"), cache_dir=tmp_path / "c")
    assert "layer down_blocks.1.attentions.1.transformer_blocks.0.attn2 is missing" in _one_line_error(result)


def test_cuda_asked_without_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from engine.model.loader import resolve_device
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.slow
def test_bad_files_do_not_stop_the_others(tiny_sd21, tmp_path):
    good = sample_paths()[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    gray16 = tmp_path / "gray16.png"
    cv2.imwrite(str(gray16), (np.arange(200 * 150, dtype=np.uint32).reshape(150, 200) * 2).astype(np.uint16))
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([cv2.imread(str(good)), np.full(cv2.imread(str(good)).shape[:2], 128, np.uint8)]))
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), cv2.imread(str(good), cv2.IMREAD_GRAYSCALE))
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(good)), (24, 18)))
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((4, 4, 3), np.uint8))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    out = tmp_path / "out"
    files = [truncated, not_image, tmp_path / "missing.png", gray16, rgba, gray, small, tiny, bomb, good]
    result = run_iseg("segment", *map(str, files), "--model", str(tiny_sd21), "--classes", "scratch",
                      "--out", str(out), "--size", "256", cache_dir=tmp_path / "c")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "truncated.png: image file is truncated" in result.stderr
    assert "notes.png: not a readable image" in result.stderr
    assert "missing.png: cannot read" in result.stderr
    assert "tiny.png: 4×4 is too small" in result.stderr
    assert "bomb.png: image is 20000×20000 (400.0 MP), over the limit of 100 MP" in result.stderr
    for handled in (gray16, rgba, gray, small, good):
        mask = cv2.imread(str(out / f"{handled.stem}.mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.shape == cv2.imread(str(handled), cv2.IMREAD_UNCHANGED).shape[:2]
    assert "segmented 5 of 10 images" in result.stdout


@pytest.mark.slow
def test_bad_classes_on_the_command_line(tiny_sd21, tmp_path):
    image = str(sample_paths()[0])
    duplicate = run_iseg("segment", image, "--model", str(tiny_sd21), "--classes", "scratch,scratch",
                         "--out", str(tmp_path), cache_dir=tmp_path / "c")
    assert "listed twice" in _one_line_error(duplicate)
    empty = run_iseg("segment", image, "--model", str(tiny_sd21), "--classes", ",",
                     "--out", str(tmp_path), cache_dir=tmp_path / "c")
    assert "at least one" in _one_line_error(empty)
    many = ",".join(f"defect{i} kind" for i in range(30))
    long = run_iseg("segment", image, "--model", str(tiny_sd21), "--classes", many,
                    "--out", str(tmp_path), cache_dir=tmp_path / "c")
    assert "drop" in _one_line_error(long)
    bad_setting = run_iseg("segment", image, "--model", str(tiny_sd21), "--classes", "scratch", "--size", "300",
                           "--out", str(tmp_path), cache_dir=tmp_path / "c")
    assert "multiple of 64" in _one_line_error(bad_setting)


@pytest.mark.slow
def test_nan_and_odd_frames_through_the_api(tiny_sd21, tmp_path):
    segmenter = Segmenter.load(tiny_sd21, settings=SMALL, cache_dir=tmp_path)
    classes = ClassSet(("scratch",))
    nan_frame = np.full((64, 64, 3), np.nan, np.float32)
    with pytest.raises(InputError, match="frame 1: contains NaN"):
        segmenter.segment([np.zeros((64, 64, 3), np.uint8), nan_frame], classes)
    with pytest.raises(InputError, match="not an image"):
        segmenter.segment([np.zeros((64, 64, 2), np.uint8)], classes)
    with pytest.raises(InputError, match="class sets for"):
        segmenter.segment([np.zeros((64, 64, 3), np.uint8)] * 2, [classes] * 3)
    flat = segmenter.segment([np.full((50, 70, 3), 128, np.uint8)], classes)[0]
    assert flat.labels.shape == (50, 70) and np.isfinite(flat.maps).all()


def test_engine_cli_config_refuses_nested_values_before_walking_them(tmp_path):
    levels = ["&l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    config = tmp_path / "engine.yaml"
    config.write_text(f"model: m\nclasses: [{', '.join(levels)}]\n")
    started = time.perf_counter()
    with pytest.raises(SettingsError, match="classes: must be a value or a list of values, not a nested structure"):
        resolve_options(argparse.Namespace(config=str(config)))
    assert time.perf_counter() - started < 5.0  # generous: CI shares two cores
