"""Tile geometry and blend weights of SUPIR's tiled sampler (Fanghua-Yu/SUPIR @ bda91af,
`sgm/modules/diffusionmodules/sampling.py`, `TiledRestoreEDMSampler`):

* windows: starts ``0, stride, 2·stride, …`` while ``start + tile <= side``, plus one start at
  ``side − tile`` when ``(side − tile) % stride != 0`` (the last tile snapped to the edge); row-major
  order (`sliding_windows`);
* blend weights: the float64 Gaussian of `gaussian_weights` (midpoint (side−1)/2 along the width but
  side/2 along the height), accumulated into float32 buffers in the window order (`TileGrid`).

Unlike the official code (which produces NaN or a shape error there), a tile larger than the latent is
refused here; `plan_sampler_tiles` clamps it to the latent for callers that want that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


LATENT_FACTOR = 8  # image px per latent px
DEFAULT_TILE_LATENT = 128  # the official SUPIR_v0_tiled.yaml tile_size (1024 px)
DEFAULT_STRIDE_LATENT = 64  # the official tile_stride (512 px)
DEFAULT_TILE_PX = DEFAULT_TILE_LATENT * LATENT_FACTOR
DEFAULT_STRIDE_PX = DEFAULT_STRIDE_LATENT * LATENT_FACTOR
DEFAULT_TILE_SHAPE = (DEFAULT_TILE_LATENT, DEFAULT_TILE_LATENT)
"""(h, w) of one default sampler tile in latent px: the natural static shape for a ``unet_adaptor``
engine profile (``x_in`` = (2·tile_batch, 4, 128, 128))."""
GAUSSIAN_VARIANCE = 0.01  # the official blend's variance (in units of the tile side squared)

Window = tuple[int, int, int, int]
"""(top, bottom, left, right) of one tile in latent px, bottom/right exclusive."""

# --------------------------------------------------------------------------------------------------
# geometry and weights
# --------------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def window_starts(side: int, tile: int, stride: int) -> list[int]:
    """Starts along one axis: ``0, stride, …`` while the tile fits, then ``side − tile`` if not aligned."""
    if tile > side:
        raise ValueError(f"tile of {tile} latent px is larger than the latent side of {side}")
    if stride < 1:
        raise ValueError(f"tile stride must be >= 1 latent px, got {stride}")
    starts = list(range(0, side - tile + 1, stride))
    if (side - tile) % stride:
        starts.append(side - tile)
    return starts


def sliding_windows(h: int, w: int, tile: int | Sequence[int], stride: int) -> list[Window]:
    """The official `_sliding_windows` grid for an (h, w) latent, row-major: all column starts of the
    first row start, then the next row. ``tile`` is an int or (tile_h, tile_w)."""
    th, tw = _pair(tile)
    return [(top, top + th, left, left + tw)
            for top in window_starts(h, th, stride) for left in window_starts(w, tw, stride)]


def tiles_per_axis(side: int, tile: int, stride: int) -> int:
    """``ceil((side − tile)/stride) + 1``, the number of windows along one axis."""
    return math.ceil(max(side - tile, 0) / stride) + 1


def gaussian_weights(tile_h: int, tile_w: int) -> np.ndarray:
    """The official blend window, float64 (tile_h, tile_w): per axis
    ``exp(−(i − m)² / side² / (2·0.01)) / sqrt(2π·0.01)`` with m = (side − 1)/2 for the width and
    m = side/2 for the height (the official asymmetry), outer product height × width."""
    var = GAUSSIAN_VARIANCE

    def axis(side: int, mid: float) -> np.ndarray:
        i = np.arange(side, dtype=np.float64)
        return np.exp(-(i - mid) * (i - mid) / (side * side) / (2 * var)) / np.sqrt(2 * np.pi * var)

    return np.outer(axis(tile_h, tile_h / 2), axis(tile_w, (tile_w - 1) / 2))


@dataclass(frozen=True)
class TileGrid:
    """The windows of one latent and the blend buffers, computed once per run (not per step)."""

    windows: tuple[Window, ...]
    weights: torch.Tensor  # (th, tw) float64 on the latent's device
    count: torch.Tensor  # (1, 1, h, w) float32: Σ w over the windows, accumulated in window order

    @property
    def tile(self) -> tuple[int, int]:
        return tuple(self.weights.shape)  # type: ignore[return-value]

    @classmethod
    def build(cls, h: int, w: int, tile: int | Sequence[int], stride: int, device: torch.device | str) -> TileGrid:
        th, tw = _pair(tile)
        windows = tuple(sliding_windows(h, w, (th, tw), stride))
        weights = torch.from_numpy(gaussian_weights(th, tw)).to(device)
        count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=device)
        for top, bottom, left, right in windows:
            count[..., top:bottom, left:right] += weights  # float64 products into float32, as official
        return cls(windows, weights, count)


def plan_sampler_tiles(h: int, w: int, tile: int, stride: int) -> tuple[tuple[int, int], int, list[str]]:
    """Clamp a requested square tile to an (h, w) latent: ``((tile_h, tile_w), stride, notes)``; notes
    say what was clamped (the official code would produce NaN or a shape error instead)."""
    notes = []
    th, tw = min(tile, h), min(tile, w)
    if (th, tw) != (tile, tile):
        notes.append(f"sampler tile {tile * LATENT_FACTOR} px clamped to {th * LATENT_FACTOR}x{tw * LATENT_FACTOR} px "
                     f"(the latent is {h * LATENT_FACTOR}x{w * LATENT_FACTOR} px)")
    return (th, tw), stride, notes


def gather(t: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """Stack the windows of a (B, C, h, w) tensor along the batch: (n·B, C, th, tw), tile-major."""
    return torch.cat([t[..., a:b, c:d] for a, b, c, d in windows])


__all__ = [
    "DEFAULT_STRIDE_LATENT", "DEFAULT_STRIDE_PX", "DEFAULT_TILE_LATENT", "DEFAULT_TILE_PX", "DEFAULT_TILE_SHAPE",
    "LATENT_FACTOR", "TileGrid", "Window", "gather", "gaussian_weights", "plan_sampler_tiles", "sliding_windows",
    "tiles_per_axis", "window_starts",
]
