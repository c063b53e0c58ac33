"""Tiled VAE passes in bounded memory, over the reference `Encoder` / `Decoder` modules (applied from
outside the model: nothing in `supir_rt/model/` changes).

Two modes:

``exact`` (default): as close to the untiled VAE as float arithmetic allows.
  * The full-resolution part of each network (encoder: ``conv_in`` and every level but the last, with
    their downsamples; decoder: the first upsample and every level above the latent resolution,
    ``norm_out``, ``conv_out``) runs tile by tile. Each tile carries a halo at least as wide as the
    receptive field of that part (`encoder_halo` / `decoder_halo`), so its core is computed from
    exactly the pixels the untiled network sees.
  * Every GroupNorm uses the statistics of the *whole* image: for the k-th norm, every tile is run up
    to it (with the already known statistics of norms 1..k−1), the per-group count, mean and sum of
    squared deviations of its core are pooled in float64 (Chan et al.'s parallel update: the exact
    variance of the union, not an average of per-tile variances), and the pass stops there. The
    (K+1)-th pass writes the outputs. Memory is one tile's activations; compute is about K/2 times
    the tiled part's (K = number of norms in it), which is small next to the diffusion steps.
  * The part at latent resolution (encoder: last level, mid block, ``norm_out``, ``conv_out``;
    decoder: ``conv_in``, mid block, the lowest level's blocks) runs on the whole latent with the
    reference modules, so the mid-block self-attention (the VAE's only global operation) sees the
    whole latent. PyTorch's scaled-dot-product attention uses its flash / memory-efficient kernels
    there, so no tokens × tokens matrix is stored.
  What is left is float rounding: different summation orders in the statistics and in convolutions.

``official``: the algorithm of the official `--use_tile_vae` (the MIT multidiffusion-upscaler tiled
  VAE in Fanghua-Yu/SUPIR @ bda91af, `SUPIR/utils/tilevae.py`), for users who want the official tiled
  output: skipped when ``max(H, W) <= 2·pad + tile``; ``n = ceil((side − 2·pad)/tile)`` tiles per axis
  of size ``ceil((side − 2·pad)/n)`` rounded up to a multiple of 32/16/8/4/2 when that stays within
  the tile; each tile's input is its core grown by ``pad`` (32 image px for the encoders, 11 latent px
  for the decoder); all tiles advance together and every GroupNorm uses the pixel-weighted *average*
  of the per-tile group means and of the per-tile variances (over the padded tiles); the mid-block
  attention runs per tile; each output is cropped to its core. This approximates the untiled VAE (and
  holds all tiles' activations at once, as the official code does; it moves them to the CPU on a GPU).

Both walk the networks as generators that yield at each GroupNorm (`supir_rt.tiling.vae_walks`), so one
description of the forward serves every schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from supir_rt.model.vae import Decoder, Encoder
from supir_rt.tiling.vae_walks import (
    ALIGN_PX, _Request, _Walk, decoder_halo, decoder_head, decoder_walk, encoder_halo, encoder_tail, encoder_walk,
)

VAETiling = Literal["exact", "official"]
VAE_TILINGS: tuple[str, ...] = ("exact", "official")
DEFAULT_VAE_TILE_PX = 512  # core of one tile in image px (the official encoder tile; decoder 64 latent px)
OFFICIAL_ENCODER_PAD = 32  # image px
OFFICIAL_DECODER_PAD = 11  # latent px

ProgressFn = Callable[[int], None]
"""``progress(n)``: n more tile passes are done."""

# --------------------------------------------------------------------------------------------------
# tile layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile in the tiled part's input coordinates: ``core`` (written to the output) and ``box``
    (the input read, core + halo clamped to the image). Both (top, bottom, left, right)."""

    core: tuple[int, int, int, int]
    box: tuple[int, int, int, int]

    def crop(self, zoom: float) -> tuple[slice, slice]:
        """The core inside an activation of this tile at ``zoom``."""
        t, b, l, r = self.core
        bt, _, bl, _ = self.box
        return (slice(round((t - bt) * zoom), round((b - bt) * zoom)),
                slice(round((l - bl) * zoom), round((r - bl) * zoom)))


def _axis_cores(side: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, side)) for a in range(0, side, tile)]


def exact_tiles(h: int, w: int, tile: int, halo: int) -> list[Tile]:
    """Cores of ``tile`` px partitioning (h, w) row-major (the last ones smaller), boxes = core ± halo."""
    out = []
    for t, b in _axis_cores(h, tile):
        for l, r in _axis_cores(w, tile):
            out.append(Tile((t, b, l, r), (max(t - halo, 0), min(b + halo, h), max(l - halo, 0), min(r + halo, w))))
    return out


def _best_tile_size(lower: int, upper: int) -> int:
    """The official rounding: ``lower`` rounded up to a multiple of 32, 16, 8, 4 or 2 (the first that
    stays <= upper), else ``lower``."""
    for divider in (32, 16, 8, 4, 2):
        rest = lower % divider
        if rest == 0:
            return lower
        if lower - rest + divider <= upper:
            return lower - rest + divider
    return lower


def official_tiles(h: int, w: int, tile: int, pad: int) -> list[Tile]:
    """The official `split_tiles`: ``core`` is the output box (the border tiles extend to the image
    edge), ``box`` the core region grown by ``pad`` and clamped. Row-major."""

    def axis(side: int) -> list[tuple[int, int, int, int]]:
        n = max(math.ceil((side - 2 * pad) / tile), 1)
        real = _best_tile_size(math.ceil((side - 2 * pad) / n), tile)
        spans = []
        for j in range(n):
            a, b = pad + j * real, min(pad + (j + 1) * real, side)
            if a >= b:
                continue
            out_a = a if a > pad else 0
            out_b = b if b < side - pad else side
            spans.append((out_a, out_b, max(a - pad, 0), min(b + pad, side)))
        return spans

    return [Tile((oa, ob, ol, orr), (ia, ib, il, ir))
            for oa, ob, ia, ib in axis(h) for ol, orr, il, ir in axis(w)]


# --------------------------------------------------------------------------------------------------
# group statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pooled:
    """Per-(batch, group) count, mean and M2 (sum of squared deviations), float64; exact union."""

    n: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor, groups: int) -> None:
        g = x.to(torch.float64).reshape(x.shape[0], groups, -1)  # (B, G, C/G·h·w)
        nb = float(g.shape[-1])
        mean_b = g.mean(-1)
        m2_b = ((g - mean_b[..., None]) ** 2).sum(-1)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * nb / total)
        self.n = total

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(dtype), (self.m2 / self.n).to(dtype)


def _apply_norm(gn: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x with given per-(batch, group) statistics, then the layer's affine."""
    b, c = x.shape[:2]
    out = x.reshape(b, gn.num_groups, -1) - mean[..., None]  # one new tensor, then in place
    out.mul_(torch.rsqrt(var[..., None] + gn.eps))
    shape = (1, c) + (1,) * (x.ndim - 2)
    return out.reshape(x.shape).mul_(gn.weight.reshape(shape)).add_(gn.bias.reshape(shape))


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------


class _Reached(Exception):
    pass


def _run_exact(walk: Callable[[torch.Tensor], _Walk], x: torch.Tensor, tiles: Sequence[Tile], out_zoom: float,
               progress: ProgressFn | None, keep: int = 0) -> torch.Tensor:
    """Pass k runs every tile up to the k-th norm and pools its statistics; the last pass writes.

    The walks of the first ``keep`` tiles stay suspended at their norm between passes (holding that
    tile's activations) and resume there, instead of being recomputed from the input: ``keep = 0``
    is the bounded-memory schedule, ``keep = len(tiles)`` computes every tile once. The results are
    identical; only memory and time differ.
    """
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    suspended: dict[int, tuple[_Walk, _Request, int]] = {}
    result: torch.Tensor | None = None
    while True:
        pooled, reached = _Pooled(), False
        for i, tile in enumerate(tiles):
            if i in suspended:
                gen, request, index = suspended.pop(i)
            else:
                t, b, l, r = tile.box
                gen, index = walk(x[..., t:b, l:r]), 0
                request = None
            try:
                if request is None:
                    request = next(gen)
                while True:
                    gn, h, zoom = request
                    if index == len(stats):
                        rows, cols = tile.crop(zoom)
                        pooled.add(h[..., rows, cols], gn.num_groups)
                        if i < keep:
                            suspended[i] = (gen, request, index)
                        else:
                            gen.close()
                        raise _Reached
                    mean, var = stats[index]
                    index += 1
                    request = gen.send(_apply_norm(gn, h, mean, var))
            except _Reached:
                reached = True
            except StopIteration as done:
                result = _paste(result, done.value, tile, x, out_zoom)
            if progress is not None:
                progress(1)
        if not reached:
            return result
        stats.append(pooled.result(x.dtype))


def _paste(result: torch.Tensor | None, out: torch.Tensor, tile: Tile, x: torch.Tensor, out_zoom: float) -> torch.Tensor:
    """Write a tile's core (its output without the halo) into the whole output, allocated on first use."""
    if result is None:
        result = out.new_empty((*out.shape[:2], round(x.shape[-2] * out_zoom), round(x.shape[-1] * out_zoom)))
    rows, cols = tile.crop(out_zoom)
    t0, b0, l0, r0 = (round(v * out_zoom) for v in tile.core)
    result[..., t0:b0, l0:r0] = out[..., rows, cols]
    return result


def _run_official(walk: Callable[[torch.Tensor], _Walk], x: torch.Tensor, tiles: Sequence[Tile], out_zoom: float,
                  progress: ProgressFn | None) -> torch.Tensor:
    """All tiles advance together; each norm uses averaged per-tile means and variances."""
    gens = [walk(x[..., t.box[0]:t.box[1], t.box[2]:t.box[3]]) for t in tiles]
    requests = [next(g) for g in gens]
    outputs: list[torch.Tensor | None] = [None] * len(tiles)
    while requests[0] is not None:
        gn = requests[0][0]
        means, variances, pixels = [], [], []
        for _, h, _ in requests:
            g = h.float().reshape(h.shape[0], gn.num_groups, -1)
            var, mean = torch.var_mean(g, dim=-1, unbiased=False)
            means.append(mean)
            variances.append(var)
            pixels.append(h.shape[-2] * h.shape[-1])
        weights = torch.tensor(pixels, dtype=torch.float32, device=x.device)
        weights = weights / weights.sum()
        mean = sum(m * wt for m, wt in zip(means, weights))
        var = sum(v * wt for v, wt in zip(variances, weights))
        for i, gen in enumerate(gens):
            gn_i, h, _ = requests[i]
            requests[i] = None  # drop the pre-norm activation as soon as its tile has moved on
            try:
                requests[i] = gen.send(_apply_norm(gn_i, h, mean, var))
            except StopIteration as done:
                outputs[i] = done.value
            del h
    result = None
    for tile, out in zip(tiles, outputs):
        result = _paste(result, out, tile, x, out_zoom)
        if progress is not None:
            progress(1)
    return result


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


def check_vae_tile(tile_px: int) -> None:
    if not isinstance(tile_px, int) or tile_px < 64 or tile_px % 64:
        raise ValueError(f"vae_tile_size={tile_px!r}: use a multiple of 64 px, at least 64 (default {DEFAULT_VAE_TILE_PX})")


def encoder_passes(h: int, w: int, tile_px: int, mode: VAETiling, enc: Encoder | None = None) -> int:
    """Tile passes an encoder call makes (for a progress bar): tiles × (norms + 1) in exact mode."""
    if mode == "official":
        return len(official_tiles(h, w, tile_px, OFFICIAL_ENCODER_PAD))
    tiles = len(exact_tiles(h, w, tile_px, 0))
    return tiles * (_count_norms_encoder(enc) + 1) if enc is not None else tiles


def _count_norms_encoder(enc: Encoder) -> int:
    levels = len(enc.down) - 1
    return 2 * len(enc.down[0].block) * levels


def _count_norms_decoder(dec: Decoder) -> int:
    return 2 * len(dec.up[0].block) * (len(dec.up) - 1) + 1


def decoder_passes(h: int, w: int, tile_px: int, mode: VAETiling, dec: Decoder | None = None) -> int:
    """Tile passes a decoder call makes for an (h, w) latent."""
    tile = tile_px // 8
    if mode == "official":
        return len(official_tiles(h, w, tile, OFFICIAL_DECODER_PAD))
    tiles = len(exact_tiles(h, w, tile, 0))
    return tiles * (_count_norms_decoder(dec) + 1) if dec is not None else tiles


@torch.inference_mode()
def tiled_encode(enc: Encoder, x: torch.Tensor, *, tile_px: int = DEFAULT_VAE_TILE_PX, mode: VAETiling = "exact",
                 keep: int = 0, progress: ProgressFn | None = None) -> torch.Tensor:
    """`Encoder.forward` (image (B, 3, H, W) -> moments (B, 2z, H/8, W/8)) in tiles of ``tile_px``.
    ``keep``: exact mode keeps that many tiles' activations between passes (faster, more memory)."""
    check_vae_tile(tile_px)
    h, w = x.shape[-2:]
    if h % ALIGN_PX or w % ALIGN_PX:
        raise ValueError(f"tiled VAE encoder needs image sides that are multiples of {ALIGN_PX} px, got {w}x{h}")
    if mode == "official":
        if max(h, w) <= 2 * OFFICIAL_ENCODER_PAD + tile_px:
            return enc(x)
        tiles = official_tiles(h, w, tile_px, OFFICIAL_ENCODER_PAD)
        return _run_official(lambda t: encoder_walk(enc, t, whole=True), x, tiles, 1 / 8, progress)
    if mode != "exact":
        raise ValueError(f"vae_tiling={mode!r}: choose one of {', '.join(VAE_TILINGS)}")
    tiles = exact_tiles(h, w, tile_px, encoder_halo(enc))
    head = _run_exact(lambda t: encoder_walk(enc, t, whole=False), x, tiles, 1 / 8, progress, keep)
    return encoder_tail(enc, head)


@torch.inference_mode()
def tiled_decode(dec: Decoder, z: torch.Tensor, *, tile_px: int = DEFAULT_VAE_TILE_PX, mode: VAETiling = "exact",
                 keep: int = 0, progress: ProgressFn | None = None) -> torch.Tensor:
    """`Decoder.forward` (latent (B, z, h, w) after post_quant_conv -> image (B, 3, 8h, 8w)) in tiles
    of ``tile_px`` image px (``tile_px / 8`` latent px)."""
    check_vae_tile(tile_px)
    tile = tile_px // 8
    h, w = z.shape[-2:]
    if mode == "official":
        if max(h, w) <= 2 * OFFICIAL_DECODER_PAD + tile:
            return dec(z)
        tiles = official_tiles(h, w, tile, OFFICIAL_DECODER_PAD)
        return _run_official(lambda t: decoder_walk(dec, t, whole=True), z, tiles, 8.0, progress)
    if mode != "exact":
        raise ValueError(f"vae_tiling={mode!r}: choose one of {', '.join(VAE_TILINGS)}")
    head = decoder_head(dec, z)
    tiles = exact_tiles(h, w, tile, decoder_halo(dec))
    return _run_exact(lambda t: decoder_walk(dec, t, whole=False), head, tiles, 8.0, progress, keep)


__all__ = [
    "DEFAULT_VAE_TILE_PX", "OFFICIAL_DECODER_PAD", "OFFICIAL_ENCODER_PAD", "Tile", "VAETiling", "VAE_TILINGS",
    "check_vae_tile", "decoder_halo", "decoder_passes", "decoder_walk", "encoder_halo", "encoder_passes",
    "encoder_walk", "exact_tiles", "official_tiles", "tiled_decode", "tiled_encode",
]
