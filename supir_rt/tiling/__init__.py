"""Tiling for images too large for one network pass:

* `windows`: the sampler's tile geometry and Gaussian blend weights (`TileGrid`);
* `denoiser`: `TiledDenoiser`, the denoiser the samplers run over when the sampler is tiled;
* `policy`: what to tile for a memory budget (`plan_tiling` -> `TilingPlan`, from `TilingSettings`);
* `vae` (with `vae_walks`): the tiled VAE passes; `supir_rt.backends.tiled_vae` puts them behind the
  Engine protocol.
"""

from supir_rt.tiling.denoiser import ProgressFn, TileConditioning, TiledDenoiser
from supir_rt.tiling.policy import TilingError, TilingPlan, TilingSettings, plan_tiling
from supir_rt.tiling.windows import (
    DEFAULT_STRIDE_LATENT, DEFAULT_STRIDE_PX, DEFAULT_TILE_LATENT, DEFAULT_TILE_PX, DEFAULT_TILE_SHAPE,
    LATENT_FACTOR, TileGrid, Window, gather, gaussian_weights, plan_sampler_tiles, sliding_windows,
    tiles_per_axis, window_starts,
)

__all__ = [
    "DEFAULT_STRIDE_LATENT", "DEFAULT_STRIDE_PX", "DEFAULT_TILE_LATENT", "DEFAULT_TILE_PX", "DEFAULT_TILE_SHAPE",
    "LATENT_FACTOR", "ProgressFn", "TileConditioning", "TileGrid", "TiledDenoiser", "TilingError", "TilingPlan",
    "TilingSettings", "Window", "gather", "gaussian_weights", "plan_sampler_tiles", "plan_tiling",
    "sliding_windows", "tiles_per_axis", "window_starts",
]
