"""A full-width SD 2.1-base (or SD 1.5) topology with random weights, for benchmarks.

It has the same layers, widths and therefore the same FLOPs as the real model, so
frames/s, memory and MFU measured on it hold for the real weights, yet nothing is
downloaded. Only the text encoder is kept small: its output is cached per class set
and never runs per frame.

`narrow=True` divides every width by 8 (same blocks, layers, head counts and read
layers): the CPU rehearsal of the GPU benchmark (`scripts/gpu_bench.sh --dry-run`) runs
the very code paths of the full-size run on it in seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from engine.model.clip_vocab import VOCAB_SIZE, locate_vocab, write_clip_tokenizer

UNET_CONFIGS = {
    "sd21": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True),
    "sd15": dict(attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False),
}


NARROW_DIVISOR = 8
"""Width divisor of the narrow topology: 320 → 40 channels with the same 5 heads (8 per head)."""


def _widths(values: tuple[int, ...], divisor: int) -> tuple[int, ...]:
    return tuple(value // divisor for value in values)


def _unet(family: str, divisor: int = 1) -> UNet2DConditionModel:
    config = dict(UNET_CONFIGS[family])
    config["cross_attention_dim"] //= divisor
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=_widths((320, 640, 1280, 1280), divisor), norm_num_groups=32 if divisor == 1 else 8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **config)


def _vae(divisor: int = 1) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=_widths((128, 256, 512, 512), divisor), norm_num_groups=32 if divisor == 1 else 8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215)


def build_full_size_model(out_dir: Path, family: str = "sd21", seed: int = 0,
                          progress: Callable[[str], None] = print, narrow: bool = False) -> Path:
    """Write the random full-width model as a diffusers folder (float16 weights, ~1.7 GB);
    `narrow`: every width divided by 8 (a few MB), for CPU rehearsals."""
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    started = time.perf_counter()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    divisor = NARROW_DIVISOR if narrow else 1
    progress(f"full-size {family}{' (narrow)' if narrow else ''}: initialising random weights on {device}")
    with torch.device(device):
        unet, vae = _unet(family, divisor), _vae(divisor)
        width = UNET_CONFIGS[family]["cross_attention_dim"] // divisor
        text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=width,
                                            num_hidden_layers=1, num_attention_heads=8, max_position_embeddings=77))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        progress(f"full-size {family}: saving {name}")
        module.to(torch.float16).save_pretrained(out_dir / name, safe_serialization=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(out_dir / "scheduler")
    write_clip_tokenizer(out_dir / "tokenizer", family, locate_vocab(progress))
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    progress(f"full-size {family}: written to {out_dir} in {time.perf_counter() - started:.0f} s")
    return out_dir
