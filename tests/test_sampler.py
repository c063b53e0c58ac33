"""Samplers with closed-form toy denoisers, checked step by step against doc §5.2 / §5.6 formulas."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG
from supir_rt.noise import NoiseSource
from supir_rt.sampler import StepInfo, initial_latent, sample_dpmpp_2m_sde, sample_restore_edm
from supir_rt.schedule import OFFICIAL_SIGMA_MAX, dpmpp_sigmas, restore_sigmas

SHAPE = (1, 4, 8, 8)


def _randn(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _edm(denoise, sigmas: torch.Tensor, seed: int = 0, **kwargs) -> tuple[torch.Tensor, list[StepInfo]]:
    steps: list[StepInfo] = []
    source = NoiseSource(seed)
    x = initial_latent(source.randn_like(torch.zeros(SHAPE, dtype=sigmas.dtype)), sigmas)
    options = dict(x_center=None, restore_cfg=-1.0, s_churn=0.0, s_noise=1.0)
    options.update(kwargs)
    out = sample_restore_edm(denoise, x, sigmas, noise=source.randn_like, callback=steps.append, **options)
    return out, steps


def test_initial_latent_scale() -> None:
    noise = _randn(0)
    torch.testing.assert_close(initial_latent(noise, restore_sigmas(50)), noise * 14.6488, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_constant_denoiser_reaches_the_constant(dtype: torch.dtype, atol: float) -> None:
    const = _randn(1, dtype)
    out, steps = _edm(lambda x, s_hat, s: const, restore_sigmas(50).to(dtype))
    assert len(steps) == 50
    # Euler to σ = 0: x − σ̂·(x − c)/σ̂, exact up to the rounding of one division and multiplication
    torch.testing.assert_close(out, const, atol=atol, rtol=0)


def test_denoiser_returning_x_center_with_guidance() -> None:
    x_center = _randn(2)
    out, steps = _edm(lambda x, s_hat, s: x_center, restore_sigmas(8), x_center=x_center, restore_cfg=4.0)
    torch.testing.assert_close(out, x_center, atol=1e-5, rtol=0)
    for step in steps:
        torch.testing.assert_close(step.denoised, x_center)


@pytest.mark.parametrize("n, s_churn, expected_gamma", [(50, 5.0, 0.1), (8, 100.0, math.sqrt(2) - 1), (8, 0.0, 0.0)])
def test_gamma_and_sigma_hat_per_step(n: int, s_churn: float, expected_gamma: float) -> None:
    sigmas = restore_sigmas(n)
    draws = []
    source = NoiseSource(0)

    def noise(x: torch.Tensor) -> torch.Tensor:
        draws.append(1)
        return source.randn_like(x)

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def denoise(x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append((sigma_hat, sigma))
        return torch.zeros_like(x)

    steps: list[StepInfo] = []
    sample_restore_edm(denoise, initial_latent(_randn(3), sigmas), sigmas,
                       x_center=None, restore_cfg=0.0, s_churn=s_churn, s_noise=1.003, noise=noise, callback=steps.append)
    assert [s.index for s in steps] == list(range(n)) and all(s.total == n for s in steps)
    assert len(draws) == (n if expected_gamma > 0 else 0)  # one churn draw per churned step
    for k, step in enumerate(steps):
        assert step.sigma == sigmas[k].item() and step.sigma_next == sigmas[k + 1].item()
        assert abs(step.gamma - expected_gamma) < 1e-12
        assert abs(step.sigma_hat - sigmas[k].item() * (1 + expected_gamma)) < 1e-5
        sigma_hat, sigma = seen[k]
        assert sigma.shape == sigma_hat.shape == (1,)
        assert sigma.item() == step.sigma and sigma_hat.item() == step.sigma_hat


def test_churn_window_s_tmin_s_tmax() -> None:
    sigmas = restore_sigmas(8)  # 14.61, 7.30, 4.08, 2.49, ..., 1.07, 0.69, 0.40
    _, steps = _edm(lambda x, s_hat, s: torch.zeros_like(x), sigmas, s_churn=0.8, s_tmin=1.0, s_tmax=10.0)
    for step in steps:
        expected = 0.1 if 1.0 <= step.sigma <= 10.0 else 0.0
        assert step.gamma == pytest.approx(expected)


def test_churn_noise_is_added_with_s_noise() -> None:
    # With D = x the Euler step is the identity, so the output is x_0 plus the churn noise in closed form.
    sigmas = restore_sigmas(8)
    x0 = initial_latent(_randn(4), sigmas)
    out = sample_restore_edm(lambda x, s_hat, s: x, x0, sigmas, x_center=None, restore_cfg=0.0, s_churn=0.8,
                             s_noise=1.003, noise=NoiseSource(9).randn_like)
    source, expected = NoiseSource(9), x0
    for sigma in sigmas[:-1]:
        expected = expected + 1.003 * source.randn_like(x0) * math.sqrt((sigma.item() * 1.1) ** 2 - sigma.item() ** 2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


class ToyModel:
    """A `ConditionedDenoiser` whose D depends on the cond half: D = x·0 + cond['vector'] mean."""

    def __init__(self) -> None:
        self.calls = 0
        self.control_scales: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor], control_scale) -> torch.Tensor:
        self.calls += 1
        self.control_scales.append(float(control_scale))
        return torch.zeros_like(x) + cond["vector"].mean(dim=1).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("n", [8, 50])
def test_cfg_control_scale_and_k_t_per_step(n: int) -> None:
    sigmas = restore_sigmas(n)
    model = ToyModel()
    cond = {"vector": torch.full((1, 8), 1.0)}
    uncond = {"vector": torch.full((1, 8), 0.0)}
    guided = GuidedDenoiser(model, cond, uncond, LinearCFG(scale=1.0, scale_min=4.0),
                            ControlScale(control_scale=1.0, use_linear_control_scale=True, control_scale_start=0.0))
    x_center = _randn(5)
    _, steps = _edm(guided, sigmas, x_center=x_center, restore_cfg=4.0, s_churn=5.0)
    assert model.calls == n  # one network call per step
    gamma = min(5.0 / n, math.sqrt(2) - 1)
    if n == 50:
        assert steps[0].cfg_scale == pytest.approx(0.7, abs=1e-4)  # extrapolated at the churned first step
    for k, step in enumerate(steps):
        sigma = sigmas[k].item()
        assert step.cfg_scale == pytest.approx((1.0 - 4.0) * sigma * (1 + gamma) / OFFICIAL_SIGMA_MAX + 4.0, abs=1e-5)
        assert step.control_scale == pytest.approx(sigma / OFFICIAL_SIGMA_MAX * (0.0 - 1.0) + 1.0, abs=1e-6)
        assert model.control_scales[k] == step.control_scale  # the network got the un-churned schedule value
        last = k == n - 1
        k_t = 0.0 if last else (sigma / OFFICIAL_SIGMA_MAX) ** 4.0
        assert step.k_t == pytest.approx(k_t, rel=1e-5, abs=0)
        # D_u = 0, D_c = 1 -> D = s; then restoration guidance pulls it towards x_center by k_t
        expected = (1 - k_t) * step.cfg_scale + k_t * x_center
        torch.testing.assert_close(step.denoised, expected, atol=1e-5, rtol=1e-5)
    assert steps[-1].k_t == 0.0 and steps[-2].k_t > 0.0


def test_restoration_guidance_skipped_below_s_tmin() -> None:
    sigmas = restore_sigmas(8)
    _, steps = _edm(lambda x, s_hat, s: torch.zeros_like(x), sigmas, x_center=_randn(6), restore_cfg=2.0,
                    restore_cfg_s_tmin=1.0)
    for step in steps:
        assert (step.k_t > 0) == (step.sigma_next > 1.0)


def test_non_positive_restore_cfg_is_exactly_no_guidance() -> None:
    sigmas = restore_sigmas(8)
    denoise = lambda x, s_hat, s: 0.3 * x + 0.1  # noqa: E731
    reference, _ = _edm(denoise, sigmas, s_churn=0.8, x_center=None, restore_cfg=0.0)
    for restore_cfg in (0.0, -1.0):
        out, steps = _edm(denoise, sigmas, s_churn=0.8, x_center=_randn(7) * 100, restore_cfg=restore_cfg)
        assert torch.equal(out, reference)
        assert all(step.k_t == 0.0 for step in steps)
    guided, _ = _edm(denoise, sigmas, s_churn=0.8, x_center=_randn(7) * 100, restore_cfg=1.0)
    assert not torch.equal(guided, reference)
    with pytest.raises(ValueError, match="x_center"):
        _edm(denoise, sigmas, restore_cfg=1.0)


def test_edm_matches_an_independent_euler_loop() -> None:
    sigmas = restore_sigmas(8).double()
    denoise = lambda x, s_hat, s: 0.5 * x - 0.2  # noqa: E731
    out, _ = _edm(denoise, sigmas, s_churn=0.0)
    x = _randn(0, torch.float64) * math.sqrt(1 + sigmas[0].item() ** 2)  # NoiseSource(0)'s first draw
    for k in range(8):
        s, s_next = sigmas[k].item(), sigmas[k + 1].item()
        x = x + (s_next - s) * (x - denoise(x, s, s)) / s
    torch.testing.assert_close(out, x, atol=1e-10, rtol=0)


def test_eps_denoiser_sees_snapped_sigma_from_the_sampler() -> None:
    seen: list[list[int]] = []

    def network(x_in, t, cond, cs):
        seen.append(t.tolist())
        return torch.zeros_like(x_in)

    sigmas = restore_sigmas(50)
    guided = GuidedDenoiser(EpsDenoiser(network), {"vector": torch.ones(1, 2)}, {"vector": torch.zeros(1, 2)},
                            LinearCFG.constant(4.0))
    _edm(guided, sigmas, s_churn=5.0)
    assert seen[0] == [999, 999]  # σ̂ = 16.08 snaps to the top of the table
    assert len(seen) == 50


def test_dpmpp_constant_denoiser_and_noise_free_closed_form() -> None:
    sigmas = dpmpp_sigmas(8)
    const = _randn(8)
    out = sample_dpmpp_2m_sde(lambda x, s_hat, s: const, initial_latent(_randn(9), sigmas), sigmas,
                              s_noise=1.0, noise=NoiseSource(0).randn_like)
    assert torch.equal(out, const)  # the step to σ = 0 returns D
    # D = 0, ε = 0: with η = 1 each step multiplies x by (σ_{k+1}/σ_k)·e^{−h} = (σ_{k+1}/σ_k)²
    steps: list[StepInfo] = []
    x0 = initial_latent(_randn(9), sigmas)
    sample_dpmpp_2m_sde(lambda x, s_hat, s: torch.zeros_like(x), x0, sigmas, s_noise=1.0,
                        noise=torch.zeros_like, callback=steps.append)
    for k, step in enumerate(steps):
        torch.testing.assert_close(step.x, x0 * (sigmas[k] / sigmas[0]) ** 2, rtol=1e-5, atol=1e-6)
        assert step.sigma_hat == step.sigma and step.gamma == 0.0 and step.k_t == 0.0


def test_dpmpp_noise_is_seeded_and_skips_the_first_step() -> None:
    sigmas = dpmpp_sigmas(8)
    denoise = lambda x, s_hat, s: 0.2 * x  # noqa: E731
    draws: list[int] = []

    def run(seed: int) -> torch.Tensor:
        source = NoiseSource(seed)

        def noise(x: torch.Tensor) -> torch.Tensor:
            draws.append(1)
            return source.randn_like(x)

        steps: list[StepInfo] = []
        sample_dpmpp_2m_sde(denoise, initial_latent(_randn(10), sigmas), sigmas, s_noise=1.0, noise=noise,
                            callback=steps.append)
        return steps[-1].x  # last step returns D = 0.2·x, so compare the input of the last step

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(draws) == 3 * 6  # steps 1..6 add noise; step 0 does not, step 7 goes to σ = 0
