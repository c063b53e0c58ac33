"""Tiled restoration sampling: SUPIR's `TiledRestoreEDMSampler` (and its DPM++ twin) as pure functions.

For latents too large for one UNet pass, every sampler step is computed on overlapping latent tiles and
the per-tile results are blended with fixed Gaussian weights (MultiDiffusion-style). The official
facts reproduced here (Fanghua-Yu/SUPIR @ bda91af, `sgm/modules/diffusionmodules/sampling.py`):

* windows: starts ``0, stride, 2·stride, …`` while ``start + tile <= side``, plus one start at
  ``side − tile`` when ``(side − tile) % stride != 0`` (the last tile snapped to the edge); row-major
  order (`sliding_windows`);
* one noise tensor for the *whole* latent is drawn every step, before the tiles, even when γ = 0
  (the untiled sampler draws only when γ > 0); each tile uses its slice;
* each tile runs one full untiled sampler step (churn with its noise slice, the CFG pair, restoration
  guidance with its x_center slice, Euler) on its slice of the LQ control latent, and every tile of a
  step starts from the same x (Jacobi-style, not sequential);
* fuse: ``x_next[tile] += x_tile · w``, ``count[tile] += w``, ``x = x_next / count``, with ``w`` the
  float64 Gaussian of `gaussian_weights` (midpoint (side−1)/2 along the width but side/2 along the
  height) accumulated into float32 buffers in the window order.

Tiles of one step are independent, so they are run ``tile_batch`` at a time through the same network
call (the ``2B`` batch axis of the ``unet_adaptor`` engine holds B tiles × the CFG pair); the blend
still adds them in the window order, so the result does not depend on ``tile_batch`` beyond the
network's own batch-size invariance.

Unlike the official code (which produces NaN or a shape error there), a tile larger than the latent is
refused here; `plan_sampler_tiles` clamps it to the latent for callers that want that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from supir_rt.denoiser import ConditionedDenoiser, ControlScale, LinearCFG, append_dims, per_sample
from supir_rt.sampler import NoiseFn, StepInfo
from supir_rt.schedule import OFFICIAL_SIGMA_MAX
from supir_rt.tile_workers import iter_tiles

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

ProgressFn = Callable[[int], None]
"""``progress(n)``: n more tile-steps are done (called once per batch of tiles)."""


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
class TilePlan:
    """The windows of one latent and the blend buffers, computed once per run (not per step)."""

    windows: tuple[Window, ...]
    weights: torch.Tensor  # (th, tw) float64 on the latent's device
    count: torch.Tensor  # (1, 1, h, w) float32: Σ w over the windows, accumulated in window order

    @property
    def tile(self) -> tuple[int, int]:
        return tuple(self.weights.shape)  # type: ignore[return-value]

    @classmethod
    def build(cls, h: int, w: int, tile: int | Sequence[int], stride: int, device: torch.device | str) -> TilePlan:
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


def _batches(windows: Sequence[Window], size: int) -> list[Sequence[Window]]:
    return [windows[i:i + size] for i in range(0, len(windows), size)]


def _gather(t: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """Stack the windows of a (B, C, h, w) tensor along the batch: (n·B, C, th, tw), tile-major."""
    return torch.cat([t[..., a:b, c:d] for a, b, c, d in windows])


# --------------------------------------------------------------------------------------------------
# the denoiser over tiles
# --------------------------------------------------------------------------------------------------


class TileGuidedDenoiser:
    """`GuidedDenoiser` for tiles: ``(x_tiles, σ̂, σ, lq_tiles) -> D`` with the control latent per call.

    One network call on ``[x_tiles, x_tiles]`` with the conditioning ``[uncond × n, cond × n]`` (n tiles
    of B images each; the text conditioning for n tiles is built once per n and cached) and
    ``control = [lq_tiles, lq_tiles]``, then linear CFG ``D_u + s(σ̂)·(D_c − D_u)`` and the control-scale
    schedule at the un-churned σ, exactly as `GuidedDenoiser` does for one untiled latent.
    """

    def __init__(self, model: ConditionedDenoiser, cond: Mapping[str, torch.Tensor],
                 uncond: Mapping[str, torch.Tensor], cfg: LinearCFG, control: ControlScale = ControlScale()) -> None:
        keys = sorted(k for k in cond if k != "control")
        if keys != sorted(k for k in uncond if k != "control"):
            raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ")
        self.model, self.cfg, self.control = model, cfg, control
        self._cond = {k: cond[k] for k in keys}
        self._uncond = {k: uncond[k] for k in keys}
        self._text: dict[int, dict[str, torch.Tensor]] = {}

    def text(self, n: int) -> dict[str, torch.Tensor]:
        """Text conditioning for n tiles: (2·n·B, ...) as [uncond × n, cond × n]."""
        if n not in self._text:
            self._text[n] = {k: torch.cat([self._uncond[k].repeat(n, *(1,) * (self._uncond[k].ndim - 1)),
                                           self._cond[k].repeat(n, *(1,) * (self._cond[k].ndim - 1))])
                             for k in self._cond}
        return self._text[n]

    def scales(self, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cfg(sigma_hat), self.control(sigma)

    def __call__(self, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor,
                 lq: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        images = next(iter(self._cond.values())).shape[0]
        sigma_hat, sigma = per_sample(sigma_hat, batch, x), per_sample(sigma, batch, x)
        cond = {**self.text(batch // images), "control": torch.cat([lq, lq])}
        cfg_scale, control_scale = self.scales(sigma_hat, sigma)
        out = self.model(torch.cat([x, x]), torch.cat([sigma_hat, sigma_hat]), cond, control_scale)  # (2n, ...)
        d_uncond, d_cond = out.chunk(2)
        return d_uncond + append_dims(cfg_scale, x.ndim) * (d_cond - d_uncond)


TileDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoise(x_tiles, sigma_hat, sigma, lq_tiles) -> denoised`` (`TileGuidedDenoiser`)."""


# --------------------------------------------------------------------------------------------------
# the samplers
# --------------------------------------------------------------------------------------------------


def _loop_setup(x: torch.Tensor, sigmas: torch.Tensor, tile: int | Sequence[int], stride: int, tile_batch: int):
    """What both tiled samplers compute once before their loop: the tile plan, the batches of windows, the
    number of images and steps, the σ values as host floats (for branch decisions only: the one device read)
    and a ones vector per batch size (σ per tile)."""
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    plan = TilePlan.build(x.shape[-2], x.shape[-1], tile, stride, x.device)
    batches = _batches(plan.windows, tile_batch)
    images = x.shape[0]
    ones = {n: sigmas.new_ones(n * images) for n in {len(b) for b in batches}}
    return plan, batches, images, sigmas.shape[0] - 1, sigmas.tolist(), ones


def sample_restore_edm_tiled(
    denoise: TileDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    lq_latent: torch.Tensor,
    x_center: torch.Tensor | None,
    restore_cfg: float,
    restore_cfg_s_tmin: float = 0.05,
    s_churn: float,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float,
    noise: NoiseFn,
    tile: int | Sequence[int] = DEFAULT_TILE_LATENT,
    stride: int = DEFAULT_STRIDE_LATENT,
    tile_batch: int = 1,
    restore_sigma_max: float = OFFICIAL_SIGMA_MAX,
    callback: Callable[[StepInfo], None] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Tiled restoration-guided EDM sampling, SUPIR `TiledRestoreEDMSampler` (module docstring).

    Same arguments as `sample_restore_edm`, plus the LQ control latent ``lq_latent`` (B, 4, h, w) that
    each tile's conditioning slices, the ``tile`` (int or (h, w)) and ``stride`` in latent px, and
    ``tile_batch`` (tiles per network call). ``noise(x)`` is called once per step for the whole latent.
    ``callback`` gets one `StepInfo` per step whose ``denoised`` is the blend of the tiles' D (only
    computed when a callback is given); ``progress(n)`` is told after every batch of n tiles.
    """
    if restore_cfg > 0 and x_center is None:
        raise ValueError(f"restore_cfg={restore_cfg} > 0 needs x_center")
    plan, batches, images, total, sigma_values, ones = _loop_setup(x, sigmas, tile, stride, tile_batch)
    for k in range(total):
        gamma = min(s_churn / total, 2**0.5 - 1) if s_tmin <= sigma_values[k] <= s_tmax else 0.0
        guided = sigma_values[k + 1] > restore_cfg_s_tmin and restore_cfg > 0
        eps_full = noise(x) * s_noise  # one draw per step, also when γ = 0 (official order)
        x_next = torch.zeros_like(x)
        d_next = torch.zeros_like(x) if callback is not None else None
        inputs = []
        for group in batches:
            s_in = ones[len(group)]
            sigma = sigmas[k] * s_in
            sigma_hat = sigma * (gamma + 1.0)
            xt = _gather(x, group)  # (n·B, C, th, tw)
            if gamma > 0:
                xt = xt + _gather(eps_full, group) * append_dims(sigma_hat**2 - sigma**2, xt.ndim) ** 0.5
            inputs.append((xt, sigma_hat, sigma, _gather(lq_latent, group)))
        sigma_next = sigmas[k + 1]
        # all batches of the step are handed over at once (a sharding denoiser runs them in parallel)
        for group, (xt, sigma_hat, sigma, _), denoised in zip(batches, inputs, iter_tiles(denoise, inputs)):
            if guided:
                weight = (sigma / restore_sigma_max) ** restore_cfg
                denoised = denoised - (denoised - _gather(x_center, group)) * append_dims(weight, xt.ndim)
            d = (xt - denoised) / append_dims(sigma_hat, xt.ndim)
            out = xt + append_dims(sigma_next - sigma_hat, xt.ndim) * d
            for i, (a, b, c, e) in enumerate(group):
                x_next[..., a:b, c:e] += out[i * images:(i + 1) * images] * plan.weights
                if d_next is not None:
                    d_next[..., a:b, c:e] += denoised[i * images:(i + 1) * images] * plan.weights
            if progress is not None:
                progress(len(group))
        if callback is not None:
            _report_tiled(callback, denoise, k, total, sigmas, gamma, guided, restore_cfg, restore_sigma_max,
                          x, d_next / plan.count)
        x = x_next / plan.count
    return x


def sample_dpmpp_2m_sde_tiled(
    denoise: TileDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    lq_latent: torch.Tensor,
    s_noise: float,
    noise: NoiseFn,
    eta: float = 1.0,
    tile: int | Sequence[int] = DEFAULT_TILE_LATENT,
    stride: int = DEFAULT_STRIDE_LATENT,
    tile_batch: int = 1,
    callback: Callable[[StepInfo], None] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Tiled DPM++ 2M SDE, SUPIR's `TiledRestoreDPMPP2MSampler`: `sample_dpmpp_2m_sde`'s step on every
    tile with the same windows and weights as the EDM sampler, blending both x and the denoised
    estimate (the next step's ``old_denoised``). The SDE noise is one whole-latent ``noise(x)`` draw
    per noised step, sliced per tile (the same draws as the untiled function; the official sampler
    uses a Brownian-tree noise sampler, so neither is seed-identical to the official output)."""
    plan, batches, images, total, sigma_values, ones = _loop_setup(x, sigmas, tile, stride, tile_batch)
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for k in range(total):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        last = sigma_values[k + 1] == 0.0
        second_order = old_denoised is not None and h_last is not None and not last
        if not last:
            h = torch.log(sigma / sigma_next)
            eta_h = eta * h
            x_std_coef = sigma_next / sigma * torch.exp(-eta_h)
            d_coef = -torch.expm1(-h - eta_h)
        eps_full = noise(x) if second_order and eta else None
        x_next, d_next = torch.zeros_like(x), torch.zeros_like(x)
        inputs = [(_gather(x, group), sigma * ones[len(group)], sigma * ones[len(group)], _gather(lq_latent, group))
                  for group in batches]
        for group, (xt, *_), denoised in zip(batches, inputs, iter_tiles(denoise, inputs)):
            if last:
                out = denoised
            elif not second_order:
                out = x_std_coef * xt + d_coef * denoised
            else:
                r = h_last / h
                corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * _gather(old_denoised, group)
                out = x_std_coef * xt + d_coef * corrected
                if eps_full is not None:
                    out = out + _gather(eps_full, group) * sigma_next * torch.sqrt(-torch.expm1(-2 * eta_h)) * s_noise
            for i, (a, b, c, e) in enumerate(group):
                x_next[..., a:b, c:e] += out[i * images:(i + 1) * images] * plan.weights
                d_next[..., a:b, c:e] += denoised[i * images:(i + 1) * images] * plan.weights
            if progress is not None:
                progress(len(group))
        blended_d = d_next / plan.count
        if callback is not None:
            _report_tiled(callback, denoise, k, total, sigmas, 0.0, False, 0.0, OFFICIAL_SIGMA_MAX, x, blended_d)
        x = x_next / plan.count
        if not last:
            old_denoised, h_last = blended_d, h
    return x


def _report_tiled(
    callback: Callable[[StepInfo], None], denoise: TileDenoiser, k: int, total: int, sigmas: torch.Tensor,
    gamma: float, guided: bool, restore_cfg: float, restore_sigma_max: float, x: torch.Tensor,
    denoised: torch.Tensor,
) -> None:
    """One `StepInfo` per step (host reads happen only here, when a callback asked for them)."""
    sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
    sigma_hat = sigma * (gamma + 1.0)
    scales = getattr(denoise, "scales", None)
    lazy = None if scales is None else (lambda: scales(torch.tensor([sigma_hat]), torch.tensor([sigma])))
    k_t = (sigma / restore_sigma_max) ** restore_cfg if guided else 0.0
    callback(StepInfo(index=k, total=total, sigma=sigma, sigma_next=sigma_next, sigma_hat=sigma_hat, gamma=gamma,
                      k_t=k_t, x=x, denoised=denoised, scales=lazy))


__all__ = [
    "DEFAULT_STRIDE_LATENT", "DEFAULT_STRIDE_PX", "DEFAULT_TILE_LATENT", "DEFAULT_TILE_PX", "DEFAULT_TILE_SHAPE",
    "LATENT_FACTOR", "TileDenoiser", "TileGuidedDenoiser", "TilePlan", "Window", "gaussian_weights",
    "plan_sampler_tiles", "sample_dpmpp_2m_sde_tiled", "sample_restore_edm_tiled", "sliding_windows",
    "tiles_per_axis", "window_starts",
]
