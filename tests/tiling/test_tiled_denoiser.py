"""Tiled restoration sampling (supir_rt.tiling) against the official tiled sampler's documented rules.

Expected window coordinates are written out by hand from the official rule (starts 0, stride, ... while
the tile fits, plus a last start snapped to ``side − tile``), the blend weights from the formula, and
the tiled step from a plain re-statement of the official algorithm (blend of each tile's x_next) in this
file; the samplers under test run over `TiledDenoiser` (blend of each tile's D). The tiny model checks
that a single tile covering the latent gives the untiled sampler's result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from supir_rt import tiling
from supir_rt.backends import open_engines
from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG
from supir_rt.noise import NoiseSource
from supir_rt.pipeline import engine_network
from supir_rt.sampler import initial_latent, sample_dpmpp_2m_sde, sample_restore_edm
from supir_rt.schedule import OFFICIAL_SIGMA_MAX, dpmpp_sigmas, restore_sigmas
from supir_rt.tiling import TileGrid, TiledDenoiser, gaussian_weights, sliding_windows


def toy_tiled(toy, lq, tile, stride, tile_batch=1, progress=None):
    """A `TiledDenoiser` over ``toy(x_tiles, lq_tiles)`` as both halves of the CFG pair (scale 1: D = toy)."""
    def model(x2, sigma2, cond, control_scale):
        return toy(x2, cond["control"])

    text = {"crossattn": torch.zeros(1, 1)}
    grid = TileGrid.build(*lq.shape[-2:], tile, stride, lq.device)
    return TiledDenoiser(model, {**text, "control": lq}, text, LinearCFG.constant(1.0), ControlScale(), grid,
                         tile_batch=tile_batch, progress=progress)

# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, tile, stride, rows, cols", [
    # 2048² output (256² latent) at the defaults: 3 × 3 windows, aligned (doc: 9 tile-steps per step)
    (256, 256, 128, 64, [0, 64, 128], [0, 64, 128]),
    # 1024x1344 px (128x168 latent): one row; columns 0 and 40 (168 − 128 = 40, not a multiple of 64)
    (128, 168, 128, 64, [0], [0, 40]),
    # 4096x3072 px (384x512 latent): 384 − 128 = 256 = 4·64 aligned, 512 − 128 = 384 = 6·64 aligned
    (384, 512, 128, 64, [0, 64, 128, 192, 256], [0, 64, 128, 192, 256, 320, 384]),
    # unaligned on both axes: 200 − 128 = 72 -> 0, 64, then 72; 300 − 128 = 172 -> 0, 64, 128, then 172
    (200, 300, 128, 64, [0, 64, 72], [0, 64, 128, 172]),
    # exactly one tile
    (128, 128, 128, 64, [0], [0]),
])
def test_windows_follow_the_official_rule(h, w, tile, stride, rows, cols):
    got = sliding_windows(h, w, tile, stride)
    expected = [(r, r + tile, c, c + tile) for r in rows for c in cols]  # row-major
    assert got == expected
    assert len(got) == tiling.tiles_per_axis(h, tile, stride) * tiling.tiles_per_axis(w, tile, stride)


def test_tile_larger_than_latent_is_refused():
    with pytest.raises(ValueError, match="larger than the latent"):
        sliding_windows(96, 200, 128, 64)
    assert tiling.plan_sampler_tiles(96, 200, 128, 64)[0] == (96, 128)


def test_gaussian_weights_formula_and_asymmetric_midpoints():
    th, tw = 6, 5
    var = 0.01
    wy = [math.exp(-(i - th / 2) ** 2 / th**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for i in range(th)]
    wx = [math.exp(-(i - (tw - 1) / 2) ** 2 / tw**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for i in range(tw)]
    got = gaussian_weights(th, tw)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.outer(wy, wx), rtol=1e-14)
    # width: symmetric around (w − 1)/2; height: peak at row h/2, so rows are not mirror images
    np.testing.assert_allclose(got[:, 0], got[:, -1], rtol=1e-14)
    assert got[th // 2, 0] == got[:, 0].max() and got[0, 0] != got[-1, 0]


# --------------------------------------------------------------------------------------------------
# the algorithm with toy denoisers
# --------------------------------------------------------------------------------------------------


def _reference_tiled_edm_step(x, eps, lq, sigma, sigma_next, gamma, tile, stride, denoise):
    """The official tiled step written out plainly: every window from the same x, float64 weights."""
    h, w = x.shape[-2:]
    weights = torch.from_numpy(np.outer(
        [math.exp(-(i - tile / 2) ** 2 / tile**2 / 0.02) / math.sqrt(0.02 * math.pi) for i in range(tile)],
        [math.exp(-(i - (tile - 1) / 2) ** 2 / tile**2 / 0.02) / math.sqrt(0.02 * math.pi) for i in range(tile)]))
    x_next, count = torch.zeros_like(x), torch.zeros_like(x)
    starts = lambda side: sorted(set(list(range(0, side - tile + 1, stride)) + [side - tile]))  # noqa: E731
    for r in starts(h):
        for c in starts(w):
            sl = (..., slice(r, r + tile), slice(c, c + tile))
            sigma_hat = sigma * (1 + gamma)
            xt = x[sl] + eps[sl] * (sigma_hat**2 - sigma**2) ** 0.5
            d = denoise(xt, lq[sl])
            out = xt + (sigma_next - sigma_hat) * (xt - d) / sigma_hat
            x_next[sl] += out * weights
            count[sl] += weights
    return x_next / count


def test_one_step_matches_a_plain_statement_of_the_algorithm():
    # A non-local toy denoiser (each tile's own mean plus its control slice) makes the tiles differ.
    def toy(xt, lq):
        return xt.mean(dim=(-2, -1), keepdim=True) * 0.5 + lq

    g = torch.Generator().manual_seed(0)
    x, lq, eps = (torch.randn(1, 4, 24, 40, generator=g) for _ in range(3))
    sigmas = torch.tensor([2.0, 0.5])
    gamma = min(3.0 / 1, 2**0.5 - 1)
    draws = iter([eps])
    out = sample_restore_edm(toy_tiled(toy, lq, 16, 8), x, sigmas, x_center=None, restore_cfg=-1,
                             s_churn=3.0, s_noise=1.0, noise=lambda like: next(draws), noise_every_step=True)
    expected = _reference_tiled_edm_step(x, eps, lq, 2.0, 0.5, gamma, 16, 8, toy)
    # blending D then stepping vs stepping each tile then blending x_next: equal up to rounding order
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_pointwise_denoiser_gives_the_untiled_result_and_noise_is_drawn_every_step():
    # With a denoiser that works pixel by pixel, every tile computes the untiled values on its window,
    # so the blend (a weighted average of equal numbers) returns them up to float rounding.
    target = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(1))

    def point(x, s_hat, s):
        return 0.7 * x + 0.3 * target

    def point_tiles(x, lq):
        return 0.7 * x + 0.3 * lq  # lq carries the slice of `target`

    sigmas = restore_sigmas(6)
    common = dict(x_center=target * 0.5, restore_cfg=2.0, s_noise=1.01)
    for s_churn in (0.0, 5.0):
        untiled_src, tiled_src = NoiseSource(3), NoiseSource(3)
        x0 = initial_latent(untiled_src.randn_like(target), sigmas)
        assert torch.equal(x0, initial_latent(tiled_src.randn_like(target), sigmas))
        calls = []

        def counting(like, src=tiled_src):
            calls.append(1)
            return src.randn_like(like)

        ref = sample_restore_edm(point, x0, sigmas, s_churn=s_churn, noise=untiled_src.randn_like, **common)
        got = sample_restore_edm(toy_tiled(point_tiles, target, 24, 8, 4), x0, sigmas, s_churn=s_churn,
                                 noise=counting, noise_every_step=True, **common)
        assert len(calls) == 6  # one whole-latent draw per step, also when γ = 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_tiled_dpmpp_with_pointwise_denoiser_matches_untiled():
    target = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(2))
    sigmas = dpmpp_sigmas(5)
    a, b = NoiseSource(5), NoiseSource(5)
    x0 = initial_latent(a.randn_like(target), sigmas)
    b.randn_like(target)
    ref = sample_dpmpp_2m_sde(lambda x, s_hat, s: 0.6 * x + 0.4 * target, x0, sigmas, s_noise=1.0, noise=a.randn_like)
    got = sample_dpmpp_2m_sde(toy_tiled(lambda x, lq: 0.6 * x + 0.4 * lq, target, 16, 8, 3), x0, sigmas,
                              s_noise=1.0, noise=b.randn_like)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the tiny model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_stack(tiny_model, tiny_config):
    engines = open_engines("torch", model=tiny_model)
    g = torch.Generator().manual_seed(7)
    ctx, adm = tiny_config.network_config.context_dim, tiny_config.network_config.adm_in_channels
    cond = {"crossattn": torch.randn(1, 77, ctx, generator=g), "vector": torch.randn(1, adm, generator=g)}
    uncond = {"crossattn": torch.randn(1, 77, ctx, generator=g), "vector": torch.randn(1, adm, generator=g)}
    lq = torch.randn(1, 4, 16, 24, generator=g)
    cfg = LinearCFG(scale=1.0, scale_min=4.0)
    control = ControlScale(0.9, True, 0.2)
    return engines, cond, uncond, lq, cfg, control


def _run_tiled(stack, tile, stride, tile_batch, sigmas, progress=None):
    engines, cond, uncond, lq, cfg, control = stack
    grid = TileGrid.build(*lq.shape[-2:], tile, stride, lq.device)
    denoise = TiledDenoiser(EpsDenoiser(engine_network(engines["unet_adaptor"])), {**cond, "control": lq}, uncond,
                            cfg, control, grid, tile_batch=tile_batch, progress=progress)
    src = NoiseSource(11)
    x = initial_latent(src.randn_like(lq), sigmas)
    return sample_restore_edm(denoise, x, sigmas, x_center=lq * 0.5, restore_cfg=3.0, s_churn=5.0, s_noise=1.01,
                              noise=src.randn_like, noise_every_step=True)


def test_one_tile_covering_the_latent_equals_untiled(tiny_stack, monkeypatch):
    """With one window over the whole latent the tiled denoiser is the untiled one, except for the blend:
    D = float32(D_tile·w) / float32(w) with float64 weights w rounds differently from D_tile (a relative
    error of about 1e-7 per step, which the network amplifies over the steps). With all-one weights the
    blend is exact and the results are bitwise equal (churn on every step: the same noise draws)."""
    engines, cond, uncond, lq, cfg, control = tiny_stack
    sigmas = restore_sigmas(4)
    guided = GuidedDenoiser(EpsDenoiser(engine_network(engines["unet_adaptor"])),
                            {**cond, "control": lq}, {**uncond, "control": lq}, cfg, control)
    src = NoiseSource(11)
    x = initial_latent(src.randn_like(lq), sigmas)
    ref = sample_restore_edm(guided, x, sigmas, x_center=lq * 0.5, restore_cfg=3.0, s_churn=5.0, s_noise=1.01,
                             noise=src.randn_like)
    tiled = _run_tiled(tiny_stack, (16, 24), 8, 1, sigmas)
    assert not torch.equal(tiled, ref)
    torch.testing.assert_close(tiled, ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(tiling.windows, "gaussian_weights", lambda th, tw: np.ones((th, tw)))
    assert torch.equal(_run_tiled(tiny_stack, (16, 24), 8, 1, sigmas), ref)


def test_batch_of_tiles_equals_one_at_a_time(tiny_stack):
    sigmas = restore_sigmas(2)
    ticks: list[int] = []
    one = _run_tiled(tiny_stack, 8, 4, 1, sigmas)  # 3 x 5 = 15 tiles per step
    many = _run_tiled(tiny_stack, 8, 4, 4, sigmas, progress=ticks.append)
    assert ticks == [4, 4, 4, 3] * 2  # one bar over tiles x steps
    # The sampler adds the tiles in window order whatever the batch; the only difference left is the
    # network's own batch-size dependence on CPU (GEMM blocking), a few float32 ulps per call.
    torch.testing.assert_close(many, one, rtol=2e-5, atol=2e-5)


def test_batching_is_exact_with_a_batch_invariant_denoiser():
    def per_tile(xt, lq):  # each tile's own statistics: different per tile, independent of batching
        return torch.stack([t.mean() * 0.3 + 0.5 * l for t, l in zip(xt, lq)])

    g = torch.Generator().manual_seed(4)
    x, lq = torch.randn(1, 4, 20, 28, generator=g), torch.randn(1, 4, 20, 28, generator=g)
    sigmas = restore_sigmas(3)
    outs = []
    for batch in (1, 3, 100):
        src = NoiseSource(9)
        outs.append(sample_restore_edm(toy_tiled(per_tile, lq, 12, 4, batch), x, sigmas, x_center=None,
                                       restore_cfg=-1, s_churn=5.0, s_noise=1.0, noise=src.randn_like))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_default_tile_constants():
    from supir_rt.backends import specs

    assert tiling.DEFAULT_TILE_SHAPE == (128, 128) and tiling.DEFAULT_STRIDE_LATENT == 64
    assert specs.SAMPLER_TILE_LATENT == tiling.DEFAULT_TILE_LATENT  # the engines' tile profile is the sampler's tile
    assert (tiling.DEFAULT_TILE_PX, tiling.DEFAULT_STRIDE_PX) == (1024, 512)
    assert OFFICIAL_SIGMA_MAX == 14.6146


def test_tiled_hot_loop_reads_nothing_back_from_the_device(tiny_stack):
    """Only the σ schedule is read into Python (once, before the loop); no per-tile or per-step reads."""
    from collections import Counter

    from torch.overrides import TorchFunctionMode

    reads_of = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"}

    class Reads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.reads: Counter[str] = Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in reads_of:
                self.reads[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    mode = Reads()
    with mode:
        _run_tiled(tiny_stack, 8, 4, 4, restore_sigmas(3), progress=lambda n: None)
    assert dict(mode.reads) == {"tolist": 1}
