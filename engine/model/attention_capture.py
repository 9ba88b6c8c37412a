"""Attention capture through diffusers attention processors.

Only the layers iSeg reads get a capturing processor; every other layer keeps fused
attention (SDPA). A capturing processor still computes its layer's output with SDPA
and, next to it, the float32 softmax probabilities of the heads it reads, summed into
an `AttentionRecorder` so that only the head mean is kept, never per-head maps. After
the last read layer it raises `StopUNet`: the rest of the UNet cannot change the result.

The naive path (`NaiveProcessor`) is the reference the benchmark compares against: it
materialises every head's probabilities on every attention layer and runs the UNet to
the end, as the authors' code does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from engine.errors import SettingsError
from engine.model.layers import READ_LAYERS, Group, all_attention_modules, resolve


class StopUNet(Exception):
    """Raised after the last read layer has been recorded."""


class AttentionRecorder:
    """Sums of head probabilities per group for one forward pass, and how many heads went in."""

    def __init__(self) -> None:
        self.sums: dict[Group, torch.Tensor] = {}
        self.heads: dict[Group, int] = {}
        self.hw: dict[Group, tuple[int, int]] = {}

    def reset(self) -> None:
        """Forget the previous forward pass."""
        self.sums.clear()
        self.heads.clear()
        self.hw.clear()

    def add(self, group: Group, probs_sum: torch.Tensor, n_heads: int, hw: tuple[int, int]) -> None:
        """Add the sum over `n_heads` heads of one layer's probabilities [B, Nq, Nk]."""
        if group in self.sums:
            self.sums[group] = self.sums[group] + probs_sum
            self.heads[group] += n_heads
        else:
            self.sums[group] = probs_sum
            self.heads[group] = n_heads
            self.hw[group] = hw

    def mean(self, group: Group) -> torch.Tensor:
        """Mean over every recorded head of every layer of the group: [B, Nq, Nk]."""
        return self.sums[group] / self.heads[group]


def _query_grid(n_queries: int, latent_hw: tuple[int, int], downscale: int) -> tuple[int, int]:
    height, width = latent_hw[0] // downscale, latent_hw[1] // downscale
    if height * width != n_queries:
        raise RuntimeError(f"attention has {n_queries} queries, expected {height}×{width} for latent {latent_hw}")
    return height, width


def _project(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             temb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """q, k, v as [B, heads, N, d], plus the residual and the input layout, as AttnProcessor2_0 does."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    layout: tuple = ()
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        layout = (channels, height, width)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, residual, layout


def _finish(attn: Any, attended: torch.Tensor, residual: torch.Tensor, layout: tuple, dtype: torch.dtype) -> torch.Tensor:
    batch, heads, n, head_dim = attended.shape
    hidden_states = attended.transpose(1, 2).reshape(batch, n, heads * head_dim).to(dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if layout:
        channels, height, width = layout
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def head_probabilities(attn: Any, query: torch.Tensor, key: torch.Tensor, head: int) -> torch.Tensor:
    """float32 softmax(q·kᵀ·scale) of one head: [B, Nq, Nk]."""
    scores = torch.matmul(query[:, head].float(), key[:, head].float().transpose(-1, -2)) * attn.scale
    return scores.softmax(dim=-1)


class CaptureProcessor:
    """Fused attention for the layer's output plus the summed probabilities of the heads read."""

    def __init__(self, recorder: AttentionRecorder, group: Group, downscale: int,
                 heads: Sequence[int] | None, latent_hw_ref: list[tuple[int, int]], last: bool) -> None:
        self.recorder = recorder
        self.group = group
        self.downscale = downscale
        self.heads = list(heads) if heads is not None else None
        self.latent_hw_ref = latent_hw_ref
        self.last = last

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        query, key, value, residual, layout = _project(attn, hidden_states, encoder_hidden_states, temb)
        heads = self.heads if self.heads is not None else range(attn.heads)
        total = None
        for head in heads:
            probs = head_probabilities(attn, query, key, head)
            total = probs if total is None else total + probs
        hw = _query_grid(query.shape[2], self.latent_hw_ref[0], self.downscale)
        self.recorder.add(self.group, total, len(heads), hw)
        if self.last:
            raise StopUNet
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        return _finish(attn, attended, residual, layout, query.dtype)


class NaiveProcessor:
    """Reference path: explicit attention on every head, every layer's probabilities kept."""

    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        self.store = store
        self.name = name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        query, key, value, residual, layout = _project(attn, hidden_states, encoder_hidden_states, temb)
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        probs = scores.softmax(dim=-1)
        self.store[self.name] = probs
        attended = torch.matmul(probs, value.float())
        return _finish(attn, attended, residual, layout, query.dtype)


def resolve_self_heads(unet: torch.nn.Module, self_heads: str | tuple[int, ...], family: str) -> list[int] | None:
    """Head indices of the self layer to average (None = all), checked against its head count."""
    self_layer = resolve(unet, READ_LAYERS[-1])
    if self_heads == "all" or (self_heads == "auto" and family == "sd1"):
        return None
    heads = [1, 2] if self_heads == "auto" else list(self_heads)
    if max(heads) >= self_layer.heads:
        raise SettingsError(f"self_heads: {heads} asks for a head that {READ_LAYERS[-1].name} does not have "
                            f"(it has {self_layer.heads}: 0..{self_layer.heads - 1}); use 'all' or smaller indices")
    return heads


def install_fast(unet: torch.nn.Module, recorder: AttentionRecorder, self_heads: list[int] | None,
                 latent_hw_ref: list[tuple[int, int]]) -> None:
    """SDPA everywhere, capturing processors on the read layers only."""
    unet.set_attn_processor(AttnProcessor2_0())
    for index, layer in enumerate(READ_LAYERS):
        heads = self_heads if layer.group == "self" else None
        last = index == len(READ_LAYERS) - 1
        resolve(unet, layer).set_processor(
            CaptureProcessor(recorder, layer.group, layer.downscale, heads, latent_hw_ref, last))


def install_naive(unet: torch.nn.Module, store: dict[str, torch.Tensor]) -> None:
    """Explicit attention with probabilities kept on every attention layer."""
    for name, module in all_attention_modules(unet).items():
        module.set_processor(NaiveProcessor(store, name))


def naive_to_recorder(store: dict[str, torch.Tensor], self_heads: list[int] | None,
                      latent_hw: tuple[int, int]) -> AttentionRecorder:
    """The read layers' head means from a naive store, in the recorder's form."""
    recorder = AttentionRecorder()
    for layer in READ_LAYERS:
        probs = store[layer.name]
        heads = self_heads if layer.group == "self" else list(range(probs.shape[1]))
        hw = _query_grid(probs.shape[2], latent_hw, layer.downscale)
        recorder.add(layer.group, probs[:, heads].sum(dim=1), len(heads), hw)
    return recorder
