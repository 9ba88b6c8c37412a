"""The tiny model has SD's topology, loads offline, is reproducible, and its attention is worth testing on.

Attention numbers are re-measured from the saved folder, so they check what the
engine will load rather than what the builder held in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engine.tools.tiny_model import build_tiny_model, calibration_image, folder_size_mb, measure_model_dir

pytestmark = pytest.mark.slow

FAMILY_HEADS = {"sd21": 5, "sd15": 8}
SPEC_LAYERS = [  # docs/method.md §2, with the resolution each is read at
    ("down_blocks.2.attentions.0", 16), ("down_blocks.2.attentions.1", 16), ("up_blocks.1.attentions.0", 16),
    ("up_blocks.1.attentions.1", 16), ("up_blocks.1.attentions.2", 16), ("down_blocks.1.attentions.1", 32),
    ("up_blocks.2.attentions.0", 32), ("up_blocks.2.attentions.1", 32), ("up_blocks.3.attentions.1", 64),
]


@pytest.fixture(scope="module", params=["sd21", "sd15"])
def family_dir(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def measured(family_dir: tuple[str, Path]) -> dict:
    return measure_model_dir(family_dir[1])


def _weight_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_folder_loads_offline_as_a_stable_diffusion_pipeline(family_dir: tuple[str, Path]) -> None:
    family, folder = family_dir
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert sched.num_train_timesteps == 1000 and sched.prediction_type == "epsilon"
    assert pipe.tokenizer.pad_token == {"sd15": "<|endoftext|>", "sd21": "!"}[family]
    text = pipe.text_encoder.config
    assert (text.vocab_size, text.max_position_embeddings) == (49408, 77)
    assert pipe.unet.config.cross_attention_dim == text.hidden_size


def test_size_is_between_10_and_30_mb(family_dir: tuple[str, Path]) -> None:
    assert 10 <= folder_size_mb(family_dir[1]) <= 30


def test_every_spec_layer_exists_at_its_resolution_with_the_family_head_count(family_dir: tuple[str, Path]) -> None:
    family, folder = family_dir
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    assert unet.config.use_linear_projection is (family == "sd21")
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    level = {64: 0, 32: 1, 16: 2}
    for name, res in SPEC_LAYERS:
        block = unet.get_submodule(f"{name}.transformer_blocks.0")
        assert block.attn1.to_q.in_features == unet.config.block_out_channels[level[res]], name
        assert block.attn2.is_cross_attention, name
    self_attn = unet.get_submodule("up_blocks.3.attentions.1.transformer_blocks.0.attn1")
    assert self_attn.heads == FAMILY_HEADS[family]
    assert unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1").heads == FAMILY_HEADS[family]


def test_calibration_latents_have_unit_std(measured: dict) -> None:
    assert 0.5 < measured["latent_std"] < 2.0


def test_self_attention_is_peaked_hub_free_and_follows_regions(measured: dict) -> None:
    assert 0.1 < measured["self_entropy"] < 0.8
    assert measured["hub_ratio"] < 10
    _, labels = calibration_image()
    uniform = float(((np.bincount(labels.ravel()) / labels.size) ** 2).sum())  # region mass of flat attention
    assert uniform < 0.5
    assert measured["self_region_mass"] > 0.9


def test_cross_attention_sends_tokens_to_different_regions(measured: dict) -> None:
    assert measured["cross_entropy"] < 0.9
    assert measured["cross_regions"] >= 2


def test_same_seed_gives_identical_weights_and_report(tiny_sd21: Path, tmp_path: Path) -> None:
    report = build_tiny_model(tmp_path / "again", family="sd21", seed=0, progress=lambda _line: None)
    assert _weight_digests(tmp_path / "again") == _weight_digests(tiny_sd21)
    for key, value in measure_model_dir(tiny_sd21).items():
        assert report[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert report["family"] == "sd21" and report["seed"] == 0
    assert report["size_mb"] == pytest.approx(folder_size_mb(tiny_sd21), abs=0.01)


def test_different_seed_gives_different_weights(tiny_sd21: Path, tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "other", family="sd21", seed=1, progress=lambda _line: None)
    mine, theirs = _weight_digests(tmp_path / "other"), _weight_digests(tiny_sd21)
    assert mine.keys() == theirs.keys()
    assert all(mine[k] != theirs[k] for k in mine)


def test_progress_names_each_step(tmp_path: Path) -> None:
    lines: list[str] = []
    build_tiny_model(tmp_path / "m", family="sd15", seed=2, progress=lines.append)
    text = "\n".join(lines)
    assert "building tiny sd15" in text and "calibrating attention layer 32/32" in text and "saving" in text
    assert "self_entropy=" in lines[-1] and "hub_ratio=" in lines[-1]


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sd21"):
        build_tiny_model(tmp_path / "m", family="sdxl")
