"""Which attention layers iSeg reads (docs/method.md §2), found by walking module attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from engine.errors import ModelLoadError

Group = Literal["coarse", "mid", "self"]

GROUPS: tuple[Group, ...] = ("coarse", "mid", "self")
"""The attention groups, in the order backends return their head means."""

GROUP_DOWNSCALE: dict[Group, int] = {"coarse": 4, "mid": 2, "self": 1}
"""How many times smaller than the latent grid each group's query grid is (16×16, 32×32, 64×64 at 512)."""


@dataclass(frozen=True)
class ReadLayer:
    """One attention module the method reads.

    group: "coarse" cross-attention at 1/4 of the latent side (16×16 for 512 input),
    "mid" cross-attention at 1/2 (32×32), "self" self-attention at the latent side.
    """

    block: str
    block_index: int
    attention_index: int
    attn: str
    group: Group

    @property
    def downscale(self) -> int:
        """Latent side / query-grid side of this layer's group."""
        return GROUP_DOWNSCALE[self.group]

    @property
    def name(self) -> str:
        """diffusers module path, e.g. up_blocks.3.attentions.1.transformer_blocks.0.attn1."""
        return f"{self.block}.{self.block_index}.attentions.{self.attention_index}.transformer_blocks.0.{self.attn}"


READ_LAYERS: tuple[ReadLayer, ...] = (
    ReadLayer("down_blocks", 1, 1, "attn2", "mid"),
    ReadLayer("down_blocks", 2, 0, "attn2", "coarse"),
    ReadLayer("down_blocks", 2, 1, "attn2", "coarse"),
    ReadLayer("up_blocks", 1, 0, "attn2", "coarse"),
    ReadLayer("up_blocks", 1, 1, "attn2", "coarse"),
    ReadLayer("up_blocks", 1, 2, "attn2", "coarse"),
    ReadLayer("up_blocks", 2, 0, "attn2", "mid"),
    ReadLayer("up_blocks", 2, 1, "attn2", "mid"),
    ReadLayer("up_blocks", 3, 1, "attn1", "self"),
)
"""In execution order: the self-attention layer is the last one the method needs."""


def resolve(unet: torch.nn.Module, layer: ReadLayer) -> torch.nn.Module:
    """The attention module for a read layer, or a ModelLoadError naming the missing piece."""
    try:
        blocks = getattr(unet, layer.block)
        block = blocks[layer.block_index]
        attentions = getattr(block, "attentions")
        transformer = attentions[layer.attention_index].transformer_blocks[0]
        module = getattr(transformer, layer.attn)
    except (AttributeError, IndexError, TypeError):
        raise ModelLoadError(
            f"unet: layer {layer.name} is missing; iSeg needs an SD 1.x/2.x UNet topology "
            "(CrossAttnDownBlock2D ×3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D ×3)"
        ) from None
    if not hasattr(module, "set_processor") or not hasattr(module, "heads"):
        raise ModelLoadError(f"unet: {layer.name} is not a diffusers Attention module")
    if layer.attn == "attn2" and not getattr(module, "is_cross_attention", True):
        raise ModelLoadError(f"unet: {layer.name} is not a cross-attention layer")
    return module


def check_unet(unet: torch.nn.Module) -> None:
    """Fail at load time, not on the first frame, when a read layer is absent."""
    for layer in READ_LAYERS:
        resolve(unet, layer)


def all_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of the UNet by name (for the naive capture-everything path)."""
    return {name: module for name, module in unet.named_modules() if hasattr(module, "set_processor") and hasattr(module, "heads")}
