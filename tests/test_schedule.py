"""σ tables and schedules against the values in the reference doc §1.6 / §5.1 / §5.6."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supir_rt.config import DenoiserConfig
from supir_rt.schedule import (
    OFFICIAL_SIGMA_MAX,
    SIGMA_MAX,
    dpmpp_sigmas,
    karras_sigmas,
    legacy_ddpm_sigmas,
    restore_sigmas,
    restore_timesteps,
    sigma_to_index,
)

ATOL = 1e-4  # the doc prints 4-6 significant digits


def test_legacy_table_endpoints_and_order() -> None:
    table = legacy_ddpm_sigmas()
    assert table.dtype == torch.float32 and table.shape == (1000,)
    assert abs(table[0].item() - 0.029167) < 1e-5
    assert abs(table[-1].item() - 14.614641) < 1e-5
    assert bool((table[1:] > table[:-1]).all())


def test_legacy_table_matches_float64_formula() -> None:
    cfg = DenoiserConfig()
    j = np.arange(1000, dtype=np.float64)
    betas = (cfg.linear_start**0.5 + j / 999 * (cfg.linear_end**0.5 - cfg.linear_start**0.5)) ** 2
    ac = np.cumprod(1 - betas)
    expected = torch.from_numpy(np.sqrt((1 - ac) / ac)).float()
    assert torch.equal(legacy_ddpm_sigmas(cfg), expected)


def test_sigma_max_is_derived_and_official_literal_is_its_rounding() -> None:
    assert SIGMA_MAX == legacy_ddpm_sigmas()[-1].item()
    assert OFFICIAL_SIGMA_MAX == round(SIGMA_MAX, 4)
    assert SIGMA_MAX != OFFICIAL_SIGMA_MAX


def test_timesteps_50() -> None:
    t = restore_timesteps(50)
    assert t.dtype == torch.int64
    assert t.tolist() == list(range(999, 0, -20))  # 999, 979, ..., 39, 19


@pytest.mark.parametrize(
    "n, head, tail",
    [
        (50, [14.6146, 12.9663, 11.5428, 10.3094], [0.24822, 0.19630, 0.13445, 0.0]),
        (100, [14.6146, 13.7600, 12.9663], [0.16731, 0.13445, 0.09357, 0.0]),
        (8, [14.6146, 7.2974, 4.0817, 2.4925], [1.0690, 0.6932, 0.3977, 0.0]),
    ],
)
def test_restore_sigmas_match_reference(n: int, head: list[float], tail: list[float]) -> None:
    sigmas = restore_sigmas(n)
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas[: len(head)], torch.tensor(head), atol=ATOL, rtol=0)
    torch.testing.assert_close(sigmas[-len(tail):], torch.tensor(tail), atol=ATOL, rtol=0)


def test_restore_sigmas_are_table_entries() -> None:
    table = legacy_ddpm_sigmas()
    assert torch.equal(restore_sigmas(8, table)[:-1], table[restore_timesteps(8)])


def test_timesteps_follow_numpy_linspace_rounding() -> None:
    # 999 - 77*999/99 is exactly 222, but linspace computes 77*step + 999 = 221.999..., truncated to 221.
    assert restore_timesteps(99)[77].item() == 221
    assert restore_timesteps(1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="n=0"):
        restore_timesteps(0)


def test_karras_endpoints_and_rho_spacing() -> None:
    sig = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    assert sig.shape == (6,) and sig[-1].item() == 0.0
    torch.testing.assert_close(sig[[0, 4]], torch.tensor([10.0, 0.1]))
    roots = sig[:5] ** (1 / 7)
    torch.testing.assert_close(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(4))


def test_dpmpp_sigmas_span_the_legacy_schedule() -> None:
    legacy = restore_sigmas(8)
    sig = dpmpp_sigmas(8)
    assert sig.shape == (9,)
    torch.testing.assert_close(sig[[0, 7, 8]], legacy[[0, 7, 8]])


def test_snapping_to_nearest_discrete_sigma() -> None:
    table = legacy_ddpm_sigmas()
    between = (table[499] * 0.7 + table[500] * 0.3).reshape(1)
    assert sigma_to_index(between, table).tolist() == [499]
    between = (table[499] * 0.3 + table[500] * 0.7).reshape(1)
    assert sigma_to_index(between, table).tolist() == [500]
    assert sigma_to_index(torch.tensor([16.08, 0.0, 1e-9]), table).tolist() == [999, 0, 0]
    idx = sigma_to_index(table[[3, 700]], table)
    assert idx.dtype == torch.int64 and idx.tolist() == [3, 700]
