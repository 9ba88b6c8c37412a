"""Point, scribble and box prompts (docs/method.md §9): X0 from a location instead of text.

Coordinates are (x, y) pixels of the original frame; they are mapped onto the latent
grid the same way the frame is resized (aspect not kept).
"""

from __future__ import annotations

from typing import Sequence

import torch

from engine.errors import InputError


def _latent_cell(point: tuple[float, float], frame_hw: tuple[int, int], latent_hw: tuple[int, int]) -> int:
    x, y = point
    height, width = frame_hw
    if not (0 <= x < width and 0 <= y < height):
        raise InputError(f"point ({x}, {y}) lies outside the {width}×{height} frame")
    row = min(int(y * latent_hw[0] / height), latent_hw[0] - 1)
    col = min(int(x * latent_hw[1] / width), latent_hw[1] - 1)
    return row * latent_hw[1] + col


def point_columns(points: Sequence[tuple[float, float]], frame_hw: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """X0 [N, P]: one one-hot column per point (a single point is a 1-point scribble)."""
    if not points:
        raise InputError("points: give at least one (x, y) point")
    n = latent_hw[0] * latent_hw[1]
    x0 = torch.zeros(n, len(points))
    for column, point in enumerate(points):
        x0[_latent_cell(point, frame_hw, latent_hw), column] = 1.0
    return x0


def box_column(box: tuple[float, float, float, float], frame_hw: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """X0 [N, 1]: ones on the latent cells inside the box (x0, y0, x1, y1), zeros elsewhere."""
    x_min, y_min, x_max, y_max = box
    height, width = frame_hw
    if not (0 <= x_min < x_max <= width and 0 <= y_min < y_max <= height):
        raise InputError(f"box {box} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    rows = torch.arange(latent_hw[0], dtype=torch.float32)
    cols = torch.arange(latent_hw[1], dtype=torch.float32)
    row_centres = (rows + 0.5) * height / latent_hw[0]
    col_centres = (cols + 0.5) * width / latent_hw[1]
    inside_rows = (row_centres >= y_min) & (row_centres < y_max)
    inside_cols = (col_centres >= x_min) & (col_centres < x_max)
    column = (inside_rows[:, None] & inside_cols[None, :]).float().reshape(-1, 1)
    if column.sum() == 0:
        column[_latent_cell(((x_min + x_max) / 2, (y_min + y_max) / 2), frame_hw, latent_hw), 0] = 1.0
    return column


def prompt_mask(refined_map: torch.Tensor) -> torch.Tensor:
    """Binary mask from one refined map [H, W]: max-normalised, thresholded at 0.5."""
    peak = refined_map.amax()
    normalised = refined_map / peak if float(peak) > 0 else refined_map
    return (normalised > 0.5).to(torch.uint8)
