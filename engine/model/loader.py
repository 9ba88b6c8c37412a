"""Load a local diffusers-format Stable Diffusion 1.x/2.x folder, offline, and check it fits iSeg."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError
from engine.model.layers import check_unet
from engine.settings import DTYPE_NAMES

log = logging.getLogger("engine.model")

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class LoadedModel:
    """The five components on one device, plus what was learnt about the folder."""

    path: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    family: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def resolve_device(device: str) -> torch.device:
    """A torch device, or a one-line error when the asked one is absent."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device: {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device: {device!r} asked for but no CUDA GPU is available; use --device cpu")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    """torch dtype from its name."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype: {dtype!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_folder(path: Path) -> None:
    """One-line errors for a folder that is missing or incomplete, before anything loads."""
    if not path.exists():
        raise ModelLoadError(f"model: {path} does not exist; point --model at a local diffusers Stable Diffusion folder")
    if not path.is_dir():
        raise ModelLoadError(f"model: {path} is a file; point --model at a diffusers folder (with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model: {path} has no model_index.json; it is not a diffusers-format pipeline folder")
    for component in COMPONENTS:
        folder = path / component
        if not folder.is_dir():
            raise ModelLoadError(f"model: {path} lacks the {component}/ folder")
        config = "tokenizer_config.json" if component == "tokenizer" else (
            "scheduler_config.json" if component == "scheduler" else "config.json")
        if not (folder / config).is_file():
            raise ModelLoadError(f"model: {folder} lacks {config}")
        if component in ("unet", "vae", "text_encoder") and not any(
                p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
            raise ModelLoadError(f"model: {folder} has no weights (*.safetensors or *.bin)")


def text_fingerprint(path: Path) -> str:
    """sha256 over the text encoder and tokenizer files: what the text embedding depends on."""
    digest = hashlib.sha256()
    for component in ("text_encoder", "tokenizer"):
        for file in sorted((path / component).iterdir()):
            if file.is_file():
                digest.update(f"{component}/{file.name}".encode())
                with open(file, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(chunk)
    return digest.hexdigest()[:24]


def _family(unet_config: Any) -> str:
    """sd2 for SD 2.x topologies (linear projections, 1024-wide text), sd1 otherwise."""
    if getattr(unet_config, "use_linear_projection", False) or getattr(unet_config, "cross_attention_dim", 0) == 1024:
        return "sd2"
    return "sd1"


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load every component with local_files_only; errors are one line naming what is wrong."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    path = Path(model_dir).expanduser().resolve()
    check_folder(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=torch_dtype)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True, torch_dtype=torch_dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        with open(path / "scheduler" / "scheduler_config.json") as handle:
            scheduler = DDIMScheduler.from_config(json.load(handle))
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"model: {path} could not be loaded: {first_line}") from None
    check_unet(unet)
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelLoadError(f"model: unet takes {unet.config.in_channels} channels but the vae gives {vae.config.latent_channels}")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelLoadError(f"model: unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder width "
                             f"{text_encoder.config.hidden_size}")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(torch_device)
    if torch_device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    family = _family(unet.config)
    log.info("loaded %s (%s) on %s as %s", path, family, torch_device, dtype)
    return LoadedModel(path=path, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       scheduler=scheduler, family=family, device=torch_device, dtype=torch_dtype,
                       fingerprint=text_fingerprint(path) + f"-{dtype}")
