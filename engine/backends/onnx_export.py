"""Export the VAE encoder and the attention-reading UNet to ONNX (`iseg export-onnx`).

Two graphs go into the export folder:

- `vae_encoder.onnx`: pixels [B, 3, S, S] in [-1, 1] → z0 = posterior mean × scaling factor.
- `unet_attention.onnx`: (latents [B, C, h, w], timestep [1], encoder_hidden_states
  [B, 77, D]) → `coarse` [B, (h/4)(w/4), 77], `mid` [B, (h/2)(w/2), 77], `self` [B, hw, hw]:
  the head means the torch backend's `AttentionRecorder` holds after one forward.

The attention graph is traced through the very processors the torch path installs
(`install_fast`), so both backends compute the same thing; the last read layer raises
`StopUNet`, which ends the trace there, so nothing after it (not even that layer's own
output) is in the graph. `manifest.json` records what the graphs were made for; the
ONNX backend refuses an export that does not match the model, size or head selection.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from engine.errors import ModelLoadError, SettingsError
from engine.model.attention_capture import AttentionRecorder, StopUNet, install_fast, resolve_self_heads
from engine.model.layers import GROUPS
from engine.model.loader import load_model
from engine.settings import IsegSettings
from engine.backends.onnx_format import (EXPORT_DTYPES, FORMAT_VERSION, MANIFEST, UNET_FILE, VAE_FILE,
                                          export_identity, heads_label)

TRACE_BATCH = 2
"""Traced with two frames so that no size-1 batch gets folded into the graph as a constant."""


class EncoderGraph(torch.nn.Module):
    """The VAE encoder up to the scaled posterior mean (the only latent iSeg uses)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor


class AttentionGraph(torch.nn.Module):
    """The UNet with capture processors; returns the groups' head means instead of a noise estimate."""

    def __init__(self, unet: torch.nn.Module, self_heads: list[int] | None, latent_hw: tuple[int, int]) -> None:
        super().__init__()
        self.unet = unet
        self.recorder = AttentionRecorder()
        install_fast(unet, self.recorder, self_heads, [latent_hw])

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.recorder.reset()
        try:
            self.unet(latents, timestep, encoder_hidden_states=encoder_hidden_states)
        except StopUNet:
            pass
        missing = set(GROUPS) - set(self.recorder.sums)
        if missing:
            raise RuntimeError(f"the UNet forward did not reach the read layers {sorted(missing)}")
        return tuple(self.recorder.mean(group) for group in GROUPS)


def _trace_to_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                   output_names: list[str], dynamic: dict[str, dict[int, str]], opset: int) -> None:
    """Trace into a staging folder, then place the graph (and its weights, if external) at `path`.

    Past 2 GB (a float32 SD UNet) the exporter writes every weight as its own file next
    to the graph; those are gathered into one `<name>.data` file so the folder stays tidy.
    """
    staging = path.parent / f".{path.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(staging / path.name), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        if len(list(staging.iterdir())) == 1:
            (staging / path.name).replace(path)
        else:
            import onnx
            onnx.save_model(onnx.load(str(staging / path.name)), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _graph_mb(path: Path) -> float:
    """Size of a graph file plus its external weights file, if any."""
    return sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file()) / 1e6


def export_onnx(model_dir: str | Path, out_dir: str | Path, size: int = 512, opset: int = 17,
                self_heads: str | tuple[int, ...] = "auto", device: str = "cpu", dtype: str = "float32",
                progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write both graphs and manifest.json to `out_dir`; returns the manifest.

    `size` is the square input side the engine will run at (IsegSettings.size); the
    graphs have a dynamic batch axis but fixed spatial sizes. `device`/`dtype` are the
    ones the engine will load the model with (the fingerprint includes the dtype).
    """
    settings = IsegSettings(size=size, self_heads=self_heads)
    if dtype not in EXPORT_DTYPES:
        raise SettingsError(f"dtype: {dtype!r} cannot be exported; use one of {', '.join(EXPORT_DTYPES)} "
                            "(ONNX Runtime has few bfloat16 kernels)")
    if importlib.util.find_spec("onnx") is None:
        raise ModelLoadError("export-onnx: the onnx package is not installed; pip install '.[onnx]'")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"--out: {out} is a file; give a folder for the ONNX export")
    start = time.perf_counter()
    progress(f"[1/4] loading {model_dir} ({device}, {dtype})")
    model = load_model(model_dir, device=device, dtype=dtype)
    heads = resolve_self_heads(model.unet, settings.self_heads, model.family)
    side = size // model.vae_scale
    latent_hw = (side, side)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)

    progress(f"[2/4] exporting the VAE encoder ({size}×{size} → {side}×{side} latents) to {out / VAE_FILE}")
    step = time.perf_counter()
    pixels = torch.zeros(TRACE_BATCH, 3, size, size, device=model.device, dtype=model.dtype)
    _trace_to_onnx(EncoderGraph(model.vae), (pixels,), out / VAE_FILE, ["pixels"], ["latents"],
                   {"pixels": {0: "batch"}, "latents": {0: "batch"}}, opset)
    progress(f"      {_graph_mb(out / VAE_FILE):.1f} MB in {time.perf_counter() - step:.1f} s")

    progress(f"[3/4] exporting the UNet attention graph (self heads {heads_label(heads)}) to {out / UNET_FILE}")
    step = time.perf_counter()
    tokens = model.tokenizer.model_max_length
    latents = torch.randn(TRACE_BATCH, model.unet.config.in_channels, *latent_hw,
                          generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    embeddings = torch.randn(TRACE_BATCH, tokens, model.unet.config.cross_attention_dim,
                             generator=torch.Generator().manual_seed(1)).to(model.device, model.dtype)
    timestep = torch.tensor([settings.timestep], dtype=torch.int64, device=model.device)
    batch_axes = {name: {0: "batch"} for name in ("latents", "encoder_hidden_states", *GROUPS)}
    _trace_to_onnx(AttentionGraph(model.unet, heads, latent_hw), (latents, timestep, embeddings), out / UNET_FILE,
                   ["latents", "timestep", "encoder_hidden_states"], list(GROUPS), batch_axes, opset)
    progress(f"      {_graph_mb(out / UNET_FILE):.1f} MB in {time.perf_counter() - step:.1f} s")

    progress(f"[4/4] writing {out / MANIFEST}")
    manifest = {
        "format": FORMAT_VERSION,
        **export_identity(model, size, heads),
        "model": str(model.path),
        "opset": opset,
        "latent_hw": list(latent_hw),
        "latent_channels": int(model.unet.config.in_channels),
        "tokens": int(tokens),
        "text_width": int(model.unet.config.cross_attention_dim),
        "files": {"vae": VAE_FILE, "unet": UNET_FILE},
        "outputs": list(GROUPS),
        "torch": torch.__version__,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"exported to {out} in {time.perf_counter() - start:.1f} s")
    return manifest
