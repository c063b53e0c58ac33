"""EpsDenoiser preconditioning and the CFG / control-scale wrapper against the formulas of doc §1.6, §5.3."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG
from supir_rt.schedule import OFFICIAL_SIGMA_MAX, legacy_ddpm_sigmas, restore_sigmas

TABLE = legacy_ddpm_sigmas()
SHAPE = (2, 4, 8, 8)


class RecordingNetwork:
    """Returns eps = 0.5·x_in + 0.1·mean(vector) per sample and records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], control_scale: float | torch.Tensor) -> torch.Tensor:
        self.calls.append({"x_in": x_in.clone(), "t": t.clone(), "cond": {k: v.clone() for k, v in cond.items()}, "cs": control_scale})
        return 0.5 * x_in + 0.1 * cond["vector"].mean(dim=1).reshape(-1, 1, 1, 1)


def _cond(value: float, batch: int = 2) -> dict[str, torch.Tensor]:
    return {
        "crossattn": torch.full((batch, 77, 16), value),
        "vector": torch.full((batch, 24), value),
        "control": torch.full((batch, 4, 8, 8), value),
    }


def test_eps_scaling_snaps_sigma_per_sample() -> None:
    net = RecordingNetwork()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = torch.stack([TABLE[310] * 0.6 + TABLE[311] * 0.4, torch.tensor(16.08)])  # 310 and 999 after snapping
    denoised = EpsDenoiser(net, TABLE)(x, sigma, _cond(1.0), 0.8)
    assert len(net.calls) == 1
    call = net.calls[0]
    assert call["t"].dtype == torch.int64 and call["t"].tolist() == [310, 999]
    sigma_q = TABLE[[310, 999]].reshape(2, 1, 1, 1)
    c_in = 1 / torch.sqrt(sigma_q**2 + 1)
    torch.testing.assert_close(call["x_in"], x * c_in, rtol=1e-6, atol=0)
    eps = 0.5 * x * c_in + 0.1
    torch.testing.assert_close(denoised, x - sigma_q * eps, rtol=1e-6, atol=1e-6)
    assert call["cs"] == 0.8


def test_scalar_sigma_is_broadcast() -> None:
    net = RecordingNetwork()
    EpsDenoiser(net, TABLE)(torch.zeros(SHAPE), torch.tensor(1.0), _cond(0.0), 1.0)
    assert net.calls[0]["t"].shape == (2,)


def test_cfg_is_one_batch2_call_ordered_uncond_cond() -> None:
    net = RecordingNetwork()
    cond, uncond = _cond(3.0), _cond(-1.0)
    guided = GuidedDenoiser(EpsDenoiser(net, TABLE), cond, uncond, LinearCFG(scale=1.0, scale_min=4.0))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 5.0)
    out = guided(x, sigma * 1.1, sigma)
    assert len(net.calls) == 1
    call = net.calls[0]
    for key in cond:
        assert torch.equal(call["cond"][key], torch.cat([uncond[key], cond[key]]))
    assert call["x_in"].shape[0] == 4 and torch.equal(call["x_in"][:2], call["x_in"][2:])
    assert call["t"][:2].tolist() == call["t"][2:].tolist()
    # D_u and D_c in closed form from the toy network, then the linear-CFG mix
    sigma_q = TABLE[call["t"][:2]].reshape(2, 1, 1, 1)
    c_in = 1 / torch.sqrt(sigma_q**2 + 1)
    d_u = x - sigma_q * (0.5 * x * c_in + 0.1 * -1.0)
    d_c = x - sigma_q * (0.5 * x * c_in + 0.1 * 3.0)
    s = (1.0 - 4.0) * 5.5 / OFFICIAL_SIGMA_MAX + 4.0
    torch.testing.assert_close(out, d_u + s * (d_c - d_u), rtol=1e-5, atol=1e-5)


def test_cfg_conditions_are_concatenated_once_not_per_step() -> None:
    """The network sees [uncond, cond] on every step, from one buffer built before sampling: the same
    storage on every call, and later changes to the caller's tensors do not leak into it."""
    cond, uncond = _cond(3.0), _cond(-1.0)
    seen: list[dict[str, tuple[int, torch.Tensor]]] = []

    def network(x_in, t, c, control_scale):
        seen.append({k: (v.data_ptr(), v.clone()) for k, v in c.items()})
        return torch.zeros_like(x_in)

    guided = GuidedDenoiser(EpsDenoiser(network, TABLE), cond, uncond, LinearCFG.constant(4.0))
    guided(torch.zeros(SHAPE), torch.ones(2), torch.ones(2))
    cond["crossattn"].fill_(99.0)  # the caller reuses its tensor: the sampler's conditions must not change
    guided(torch.zeros(SHAPE), torch.ones(2), torch.ones(2))
    assert len(seen) == 2
    for key in cond:
        (ptr1, first), (ptr2, second) = seen[0][key], seen[1][key]
        assert ptr1 == ptr2  # no per-step concatenation into a new buffer
        expected = torch.cat([_cond(-1.0)[key], _cond(3.0)[key]])
        assert torch.equal(first, expected) and torch.equal(second, expected)


def test_cfg_rejects_mismatched_conditions() -> None:
    net = EpsDenoiser(RecordingNetwork(), TABLE)
    with pytest.raises(ValueError, match="keys"):
        GuidedDenoiser(net, _cond(1.0), {"vector": torch.zeros(2, 24)}, LinearCFG.constant(4.0))
    guided = GuidedDenoiser(net, _cond(1.0, batch=1), _cond(0.0, batch=1), LinearCFG.constant(4.0))
    with pytest.raises(ValueError, match="batch"):
        guided(torch.zeros(SHAPE), torch.ones(2), torch.ones(2))


def test_linear_cfg_extrapolates_to_0_7_at_churned_first_step() -> None:
    sigma_hat = restore_sigmas(50)[0] * (1 + 0.1)  # γ = min(5/50, √2−1)
    s = LinearCFG(scale=1.0, scale_min=4.0)(sigma_hat)  # spt_linear_CFG = 1.0, s_cfg = 4.0
    assert abs(s.item() - 0.7) < 1e-4
    assert abs(LinearCFG(1.0, 4.0)(torch.tensor(0.0)).item() - 4.0) < 1e-7
    assert LinearCFG.constant(7.5)(torch.tensor(3.0)).item() == 7.5


@pytest.mark.parametrize("sigma", [14.6146, 7.3073, 1.0, 0.0])
def test_linear_control_scale_formula(sigma: float) -> None:
    schedule = ControlScale(control_scale=0.9, use_linear_control_scale=True, control_scale_start=0.2)
    expected = (sigma / OFFICIAL_SIGMA_MAX) * (0.2 - 0.9) + 0.9
    value = schedule(torch.tensor([sigma, 99.0]))  # only the first sample's σ is used
    assert value.ndim == 0 and abs(value.item() - expected) < 1e-6


def test_constant_control_scale_is_passed_to_network() -> None:
    net = RecordingNetwork()
    guided = GuidedDenoiser(EpsDenoiser(net, TABLE), _cond(1.0), _cond(0.0), LinearCFG.constant(4.0), ControlScale(0.93))
    guided(torch.zeros(SHAPE), torch.full((2,), 9.0), torch.full((2,), 8.0))
    assert abs(float(net.calls[0]["cs"]) - 0.93) < 1e-7


def test_control_scale_uses_unchurned_sigma_and_cfg_the_churned_one() -> None:
    net = RecordingNetwork()
    control = ControlScale(1.0, use_linear_control_scale=True, control_scale_start=0.0)
    guided = GuidedDenoiser(EpsDenoiser(net, TABLE), _cond(1.0), _cond(0.0), LinearCFG(1.0, 4.0), control)
    sigma = torch.full((2,), 10.0)
    cfg_scale, cs = guided.scales(sigma * 1.1, sigma)
    guided(torch.zeros(SHAPE), sigma * 1.1, sigma)
    assert abs(float(net.calls[0]["cs"]) - (1.0 - 10.0 / OFFICIAL_SIGMA_MAX)) < 1e-6
    assert float(net.calls[0]["cs"]) == float(cs)
    torch.testing.assert_close(cfg_scale, torch.full((2,), 4.0 - 3.0 * 11.0 / OFFICIAL_SIGMA_MAX))
