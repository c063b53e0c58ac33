"""Tiling as a denoiser: SUPIR's tiled samplers (`TiledRestoreEDMSampler`, `TiledRestoreDPMPP2MSampler`)
are the untiled samplers over `TiledDenoiser`.

For latents too large for one UNet pass, every step denoises overlapping latent tiles and blends them
with fixed Gaussian weights (MultiDiffusion-style, `supir_rt.tiling.windows`). The official tiled
samplers run a whole sampler step per tile and blend the tiles' x_next. Both update rules are linear in
the denoised D with coefficients that are equal on every tile (σ's, k_t, the DPM++ coefficients), and the
weights are normalised by their sum, so blending the tiles' D and then stepping once equals blending the
tiles' x_next, up to float rounding order (``Σw·(a·x + b·D)/Σw`` vs ``a·x + b·Σw·D/Σw``; measured below
1e-6 relative on the tiny model, `tests/tiling/test_recordings.py`). So `sample_restore_edm` and
`sample_dpmpp_2m_sde` run unchanged over a `TiledDenoiser`, and a step callback sees the blended D.

The one remaining difference is the random stream: the official tiled EDM sampler draws one whole-latent
churn noise every step, also when γ = 0 (``sample_restore_edm(..., noise_every_step=True)``). Each tile
then uses its slice of that draw, which is what adding the whole-latent noise before tiling does.

Every tile of a step starts from the same x (Jacobi-style). Tiles are run ``tile_batch`` at a time through
one network call (the ``2B`` batch axis of the ``unet_adaptor`` engine holds n tiles × the CFG pair); the
blend still adds them in the window order, so the result does not depend on ``tile_batch`` beyond the
network's own batch-size invariance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from supir_rt.denoiser import ConditionedDenoiser, ControlScale, LinearCFG, append_dims, per_sample
from supir_rt.tiling.windows import TileGrid, Window, gather

ProgressFn = Callable[[int], None]
"""``progress(n)``: n more tile-steps are done (called once per batch of tiles)."""

TileConditioning = Callable[[int, Window], tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]]
"""``conditioning(k, window) -> (cond, uncond)``: the text conditioning (``crossattn``, ``vector``) of tile
k, for per-tile prompts. Called once per tile when the `TiledDenoiser` is built, not per step."""


class TiledDenoiser:
    """A `Denoiser` ``(x, σ̂, σ) -> D`` that denoises the windows of ``grid`` and returns their blend.

    Per batch of ``tile_batch`` windows: one ``model`` call on ``[x_tiles, x_tiles]`` with the text
    conditioning ``[uncond × n, cond × n]`` and ``control = [lq_tiles, lq_tiles]`` (the tile's slice of
    the LQ control latent ``cond["control"]``), linear CFG ``D_u + s(σ̂)·(D_c − D_u)`` and the
    control-scale schedule at the un-churned σ, exactly as `GuidedDenoiser` does untiled. The tiles' D
    are added with the float64 Gaussian weights into a float32 buffer in window order and divided by the
    summed weights. ``conditioning`` optionally gives each tile its own text conditioning
    (`TileConditioning`); by default every tile uses ``cond`` / ``uncond``. ``progress(n)`` is told
    after every batch of n tiles. ``runner`` (a `supir_rt.tile_workers.TilePool`) runs the batches of
    each step elsewhere and in parallel (`runner.bind(self)` once; its ``iter_tiles(x_tiles, σ̂, σ)``
    yields each batch's D in window order, computed by `denoise_batch` on the workers); the blend stays
    here.
    """

    def __init__(
        self, model: ConditionedDenoiser, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor],
        cfg: LinearCFG, control: ControlScale, grid: TileGrid, *, tile_batch: int = 1,
        conditioning: TileConditioning | None = None, progress: ProgressFn | None = None, runner: Any = None,
    ) -> None:
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
        keys = sorted(k for k in cond if k != "control")
        if keys != sorted(k for k in uncond if k != "control"):
            raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ")
        self.model, self.cfg, self.control, self.grid, self.progress = model, cfg, control, grid, progress
        self.lq = cond["control"]  # (B, 4, h, w)
        windows = grid.windows
        self.batches = [windows[i:i + tile_batch] for i in range(0, len(windows), tile_batch)]
        # text conditioning per batch of windows, (2·n·B, ...) as [uncond × n, cond × n]: built once here
        if conditioning is None:
            repeated: dict[int, dict[str, torch.Tensor]] = {}
            for n in {len(b) for b in self.batches}:
                repeated[n] = {k: torch.cat([_repeat(uncond[k], n), _repeat(cond[k], n)]) for k in keys}
            self.text = [repeated[len(b)] for b in self.batches]
        else:
            per_tile = [conditioning(k, window) for k, window in enumerate(windows)]
            self.text, start = [], 0
            for batch in self.batches:
                tiles = per_tile[start:start + len(batch)]
                start += len(batch)
                self.text.append({k: torch.cat([t[1][k] for t in tiles] + [t[0][k] for t in tiles]) for k in keys})
        self.lq_tiles = [torch.cat([gather(self.lq, b)] * 2) for b in self.batches]  # [lq, lq] per batch
        # a `TileRunner` (e.g. `supir_rt.tile_workers.TilePool`) runs the batches elsewhere, in parallel
        self.runner = runner.bind(self) if runner is not None else None

    def scales(self, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cfg(sigma_hat), self.control(sigma)

    def denoise_batch(self, j: int, xt: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor,
                      scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Guided D of batch ``j`` of windows: ``xt`` (n·B, C, th, tw) its tiles of x, σ̂ and σ per image (B,);
        ``scales``: `scales(σ̂, σ)` when the caller has it already (once per step, not per batch)."""
        n = len(self.batches[j])
        cfg_scale, control_scale = scales if scales is not None else self.scales(sigma_hat, sigma)
        s_hat = sigma_hat.repeat(n)
        out = self.model(torch.cat([xt, xt]), torch.cat([s_hat, s_hat]), {**self.text[j], "control": self.lq_tiles[j]},
                         control_scale)
        d_uncond, d_cond = out.chunk(2)
        return d_uncond + append_dims(cfg_scale.repeat(n), xt.ndim) * (d_cond - d_uncond)

    def __call__(self, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        images = x.shape[0]
        sigma_hat, sigma = per_sample(sigma_hat, images, x), per_sample(sigma, images, x)
        blended = torch.zeros_like(x)
        weights = self.grid.weights
        if self.runner is not None:  # every batch of the step handed over at once, results in window order
            results = self.runner.iter_tiles([gather(x, batch) for batch in self.batches], sigma_hat, sigma)
        else:
            scales = self.scales(sigma_hat, sigma)
            results = (self.denoise_batch(j, gather(x, batch), sigma_hat, sigma, scales)
                       for j, batch in enumerate(self.batches))
        for batch, denoised in zip(self.batches, results):
            n = len(batch)
            for i, (a, b, c, e) in enumerate(batch):
                blended[..., a:b, c:e] += denoised[i * images:(i + 1) * images] * weights
            if self.progress is not None:
                self.progress(n)
        return blended / self.grid.count


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.repeat(n, *(1,) * (t.ndim - 1))


__all__ = ["ProgressFn", "TileConditioning", "TiledDenoiser"]
