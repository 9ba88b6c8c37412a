"""The PyTorch backend: VAE encode and the truncated, attention-capturing UNet forward."""

from __future__ import annotations

from collections import Counter

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

from engine.model.attention_capture import (AttentionRecorder, StopUNet, install_fast, install_naive,
                                      naive_to_recorder, resolve_self_heads)
from engine.backends.cuda_graphs import CudaGraphCapture, GraphCapture, PaddedBatches, StaticGraphs, batch_buckets
from engine.model.layers import GROUPS, READ_LAYERS, resolve
from engine.model.loader import LoadedModel
from engine.settings import IsegSettings


class TorchBackend:
    """Runs the diffusers modules with capture processors on the read layers only.

    With `cuda_graphs` the VAE encode and the truncated UNet forward are replayed from CUDA
    graphs captured per batch bucket up to `max_batch` (engine/backends/cuda_graphs.py); `capture`
    replaces the CUDA capture (tests emulate it on CPU). With `compile_blocks` alone, batches
    are padded to the same buckets so the compiled blocks see few shapes.
    """

    name = "torch"

    def __init__(self, model: LoadedModel, settings: IsegSettings, latent_hw: tuple[int, int],
                 compile_blocks: bool = False, cuda_graphs: bool = False, max_batch: int = 16,
                 capture: GraphCapture | None = None) -> None:
        self.model = model
        self.latent_hw = latent_hw
        self._latent_ref = [latent_hw]
        self.self_heads = resolve_self_heads(model.unet, settings.self_heads, model.family)
        self.recorder = AttentionRecorder()
        install_fast(model.unet, self.recorder, self.self_heads, self._latent_ref)
        if compile_blocks:
            compile_static_blocks(model, max_batch)
        self._layout: tuple[dict, dict] | None = None
        self._encode_runner: StaticGraphs | PaddedBatches | None = None
        self._attention_runner: StaticGraphs | PaddedBatches | None = None
        if cuda_graphs:
            capture = capture or CudaGraphCapture(model.device)
            self._encode_runner = StaticGraphs(self.encode_eager, capture, max_batch)
            self._attention_runner = StaticGraphs(self.attention_sums, capture, max_batch)
        elif compile_blocks:
            self._encode_runner = PaddedBatches(self.encode_eager, max_batch)
            self._attention_runner = PaddedBatches(self.attention_sums, max_batch)

    @property
    def cuda_graphs(self) -> bool:
        """Whether encode and attention replay captured graphs."""
        return isinstance(self._attention_runner, StaticGraphs)

    @property
    def captured_sizes(self) -> list[int]:
        """Batch sizes the attention graph has been captured for (empty without CUDA graphs)."""
        return self._attention_runner.captured_sizes if isinstance(self._attention_runner, StaticGraphs) else []

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """z0 = VAE posterior mean × scaling factor, for pixels [B, 3, H, W] in [-1, 1]."""
        runner = self._encode_runner or self.encode_eager
        return runner(pixels.to(self.model.device))[0]

    @torch.no_grad()
    def encode_eager(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        """The VAE encode itself, eager (what a graph replays; FLOP counting runs it directly)."""
        pixels = pixels.to(self.model.dtype)
        return (self.model.vae.encode(pixels).latent_dist.mean * self.model.vae.config.scaling_factor,)

    def _ensure_installed(self) -> None:
        """Put this backend's processors back if another Segmenter on the same model replaced them."""
        if getattr(resolve(self.model.unet, READ_LAYERS[-1]).processor, "recorder", None) is not self.recorder:
            install_fast(self.model.unet, self.recorder, self.self_heads, self._latent_ref)

    @torch.no_grad()
    def attention(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> AttentionRecorder:
        """One UNet forward that stops after the last read layer; the recorder holds the head means."""
        runner = self._attention_runner or self.attention_sums
        sums = runner(latents, timestep.reshape(-1).expand(latents.shape[0]).contiguous(), embeddings)
        assert self._layout is not None  # set by attention_sums (for graphs: by its capture run)
        heads, hw = self._layout
        recorder = AttentionRecorder()
        for group, total in zip(GROUPS, sums):
            recorder.add(group, total, heads[group], hw[group])
        return recorder

    @torch.no_grad()
    def attention_sums(self, latents: torch.Tensor, timesteps: torch.Tensor,
                       embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The recorder's head sums per group after the truncated forward, timesteps [B] (what a
        graph replays; FLOP counting runs it directly)."""
        self._ensure_installed()
        self.recorder.reset()
        try:
            self.model.unet(latents, timesteps, encoder_hidden_states=embeddings)
        except StopUNet:
            pass
        missing = set(GROUPS) - set(self.recorder.sums)
        if missing:
            raise RuntimeError(f"the UNet forward did not reach the read layers {sorted(missing)}")
        self._layout = (dict(self.recorder.heads), dict(self.recorder.hw))
        return tuple(self.recorder.sums[group] for group in GROUPS)

    @torch.no_grad()
    def naive_attention(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> AttentionRecorder:
        """The reference path: every layer's per-head probabilities kept, the whole UNet run."""
        store: dict[str, torch.Tensor] = {}
        install_naive(self.model.unet, store)
        try:
            self.model.unet(latents, timestep, encoder_hidden_states=embeddings)
        finally:
            install_fast(self.model.unet, self.recorder, self.self_heads, self._latent_ref)
        return naive_to_recorder(store, self.self_heads, self.latent_hw)


COMPILED_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D, FeedForward)
"""Convolution and feed-forward blocks: all the FLOPs outside attention, and no Python state."""


def compile_static_blocks(model: LoadedModel, max_batch: int = 16) -> int:
    """torch.compile (static shapes) every ResNet, resampling and feed-forward block of the UNet
    and the VAE encoder; the attention processors stay eager because they record into Python
    objects and stop the forward. Returns how many blocks were wrapped.

    All instances of a block class share one code object, and dynamo keeps one cache entry
    per (channel/size configuration, batch size) under it; its default limit of 8 entries
    would leave most blocks of an SD UNet silently eager, so the limit is raised to what
    these blocks need for the batch sizes 1, 2, 4, … up to `max_batch`.
    """
    wrapped: Counter = Counter()
    for root in (model.unet, model.vae.encoder):
        for module in root.modules():
            if isinstance(module, COMPILED_BLOCKS):
                module.forward = torch.compile(module.forward, dynamic=False)
                wrapped[type(module)] += 1
    if wrapped:
        needed = max(wrapped.values()) * (len(batch_buckets(max_batch)) + 1)
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, needed)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
    return sum(wrapped.values())
