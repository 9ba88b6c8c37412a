"""Presence score per class, computed before any min–max normalisation (docs/method.md §8).

iSeg's maps are min–max normalised, so a mask appears on every frame, defect or not.
The presence score is what can tell the two apart: for class k it is the **peak, over
latent pixels, of the share of cross-attention that the pixel gives to class k's
tokens** (mean over the class's sub-word tokens, the 16×16 and 32×32 levels combined
with the same 0.7/0.3 weights as the maps, each level the mean over its heads).
It is a probability share, so its range is [0, 1]: 0 means no pixel attends to the
class words at all; values near 1 mean some region attends almost only to them.
It is comparable across frames of one camera and class set, not across models or
prompts: calibrate a threshold per class on known-good frames.
"""

from __future__ import annotations

import torch


def presence_scores(raw: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """[K] scores from raw token maps [N, T] (attention shares on the latent grid)."""
    per_class = torch.stack([raw[:, span].mean(dim=1) for span in spans], dim=1)
    return per_class.amax(dim=0).clamp(0.0, 1.0)
