"""Tiling for images too large for one network pass: the tile geometry (`windows`) and the tiled
denoiser the samplers run over (`denoiser`)."""

from supir_rt.tiling.denoiser import ProgressFn, TileConditioning, TiledDenoiser
from supir_rt.tiling.windows import (
    DEFAULT_STRIDE_LATENT, DEFAULT_STRIDE_PX, DEFAULT_TILE_LATENT, DEFAULT_TILE_PX, DEFAULT_TILE_SHAPE,
    LATENT_FACTOR, TileGrid, Window, gather, gaussian_weights, plan_sampler_tiles, sliding_windows,
    tiles_per_axis, window_starts,
)

__all__ = [
    "DEFAULT_STRIDE_LATENT", "DEFAULT_STRIDE_PX", "DEFAULT_TILE_LATENT", "DEFAULT_TILE_PX", "DEFAULT_TILE_SHAPE",
    "LATENT_FACTOR", "ProgressFn", "TileConditioning", "TileGrid", "TiledDenoiser", "Window", "gather",
    "gaussian_weights", "plan_sampler_tiles", "sliding_windows", "tiles_per_axis", "window_starts",
]
