"""SUPIR's samplers as pure functions over a `Denoiser`.

* `sample_restore_edm`: sgm/SUPIR `RestoreEDMSampler`, i.e. EDM Euler sampling with churn (Karras et
  al. 2022, Alg. 2 without the Heun correction) plus SUPIR's restoration guidance (paper Algorithm 1).
* `sample_dpmpp_2m_sde`: SUPIR `RestoreDPMPP2MSampler` (lightning config), DPM++ 2M SDE with η = 1.

The caller builds the σ schedule (`supir_rt.schedule`), the denoiser stack (`supir_rt.denoiser`) and the
initial latent (`initial_latent`), and passes a ``noise(x) -> ε`` function (``NoiseSource.randn_like``).
Both samplers call ``denoise(x, sigma_hat, sigma)`` with (B,) tensors; see `supir_rt.denoiser` for why
two σ are passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from supir_rt.denoiser import Denoiser, ReportsScales, append_dims
from supir_rt.schedule import OFFICIAL_SIGMA_MAX

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""``noise(x) -> ε``: a standard normal tensor like x (``NoiseSource.randn_like``)."""


@dataclass(frozen=True)
class StepInfo:
    """What one sampler step did; passed to ``callback`` after the denoiser call and the guidance.

    Building it reads nothing from the device: the σ values, γ and k_t are host floats
    from the schedule (σ̂ = σ_k·(1 + γ) and k_t = (σ_k/σ_max)^τ_r computed in float64, where the
    sampler applies them in the latent's dtype), ``x`` / ``denoised`` are the device tensors themselves
    (the latent the denoiser saw, after churn noise; the D used for the update, after restoration
    guidance), and ``cfg_scale`` / ``control_scale`` are read from the device only when a callback
    accesses them (None when the denoiser does not report them, `ReportsScales`; ``cfg_scale`` is that
    of the first sample). A progress bar that only counts steps therefore costs no synchronisation.
    """

    index: int
    total: int
    sigma: float
    sigma_next: float
    sigma_hat: float
    gamma: float
    k_t: float
    x: torch.Tensor
    denoised: torch.Tensor
    scales: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def cfg_scale(self) -> float | None:
        return None if self.scales is None else float(self.scales()[0].reshape(-1)[0])

    @property
    def control_scale(self) -> float | None:
        return None if self.scales is None else float(self.scales()[1])


def initial_latent(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The sampler's starting point ``noise·√(1 + σ_0²)`` (×14.6488 for the legacy schedule), as sgm's
    sampling-loop preparation does. Call it on ``noise.randn_like(z)`` before either sampler."""
    return noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)


def _report(
    callback: Callable[[StepInfo], None] | None, denoise: Denoiser, index: int, total: int,
    sigma: float, sigma_next: float, gamma: float, k_t: float, sigma_t: torch.Tensor, sigma_hat_t: torch.Tensor,
    x: torch.Tensor, denoised: torch.Tensor,
) -> None:
    """Call ``callback`` with host values only; the device scales stay behind a lazy accessor."""
    if callback is None:
        return
    scales = (lambda: denoise.scales(sigma_hat_t, sigma_t)) if isinstance(denoise, ReportsScales) else None
    sigma_hat = _in_dtype(sigma, sigma_t.dtype) * _in_dtype(1.0 + gamma, sigma_t.dtype)  # as the device rounds it
    callback(StepInfo(index=index, total=total, sigma=sigma, sigma_next=sigma_next, sigma_hat=float(sigma_hat),
                      gamma=gamma, k_t=k_t, x=x, denoised=denoised, scales=scales))


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """A host float rounded to ``dtype`` (numpy scalar arithmetic then rounds like the device does)."""
    try:
        return np.dtype(str(dtype).removeprefix("torch.")).type(value)
    except TypeError:  # bfloat16 and other dtypes numpy lacks: plain float64
        return value


def sample_restore_edm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    x_center: torch.Tensor | None,
    restore_cfg: float,
    restore_cfg_s_tmin: float = 0.05,
    s_churn: float,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float,
    noise: NoiseFn,
    restore_sigma_max: float = OFFICIAL_SIGMA_MAX,
    noise_every_step: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Restoration-guided EDM sampling, SUPIR `RestoreEDMSampler` (and, over a `TiledDenoiser` with
    ``noise_every_step=True``, `TiledRestoreEDMSampler`).

    ``x`` is the initial latent already scaled by `initial_latent`; ``sigmas`` holds N+1 descending values
    ending in 0 (`restore_sigmas`). For k = 0..N−1:

    1. γ = min(s_churn/N, √2 − 1) if s_tmin ≤ σ_k ≤ s_tmax else 0; σ̂ = σ_k·(1 + γ);
    2. if γ > 0: x ← x + s_noise·ε·√(σ̂² − σ_k²), one ``noise(x)`` draw;
    3. D = denoise(x, σ̂, σ_k);
    4. if σ_{k+1} > restore_cfg_s_tmin and restore_cfg > 0: D ← D − (D − x_center)·k_t with
       k_t = (σ_k/14.6146)^restore_cfg (so never on the last step);
    5. Euler: x ← x + (σ_{k+1} − σ̂)·(x − D)/σ̂, with the un-snapped σ̂. No Heun correction.

    After the last step x is the final D. ``restore_cfg <= 0`` disables guidance and then ``x_center``
    may be None. ``noise_every_step``: draw the churn noise every step, also when γ = 0 (and then not
    use it), which is the random stream of the official tiled sampler.
    """
    if restore_cfg > 0 and x_center is None:
        raise ValueError(f"restore_cfg={restore_cfg} > 0 needs x_center")
    total = sigmas.shape[0] - 1
    s_in = sigmas.new_ones(x.shape[0])  # (B,)
    sigma_values = sigmas.tolist()  # host floats, read once: branches and reports never touch the device
    for k in range(total):
        sigma, sigma_next = sigmas[k] * s_in, sigmas[k + 1]  # (B,), 0-dim
        gamma = min(s_churn / total, 2**0.5 - 1) if s_tmin <= sigma_values[k] <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)  # (B,)
        if gamma > 0 or noise_every_step:
            eps = noise(x) * s_noise
            if gamma > 0:
                x = x + eps * append_dims(sigma_hat**2 - sigma**2, x.ndim) ** 0.5
        denoised = denoise(x, sigma_hat, sigma)
        k_t = 0.0
        if sigma_values[k + 1] > restore_cfg_s_tmin and restore_cfg > 0:
            weight = (sigma / restore_sigma_max) ** restore_cfg  # (B,)
            denoised = denoised - (denoised - x_center) * append_dims(weight, x.ndim)
            k_t = float((_in_dtype(sigma_values[k], sigmas.dtype) / _in_dtype(restore_sigma_max, sigmas.dtype))
                        ** _in_dtype(restore_cfg, sigmas.dtype))
        _report(callback, denoise, k, total, sigma_values[k], sigma_values[k + 1], gamma, k_t, sigma, sigma_hat,
                x, denoised)
        d = (x - denoised) / append_dims(sigma_hat, x.ndim)
        x = x + append_dims(sigma_next - sigma_hat, x.ndim) * d
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_noise: float,
    noise: NoiseFn,
    eta: float = 1.0,
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """DPM++ 2M SDE (Lu et al. 2022), as SUPIR `RestoreDPMPP2MSampler` uses it.

    ``sigmas`` is the Karras schedule of `dpmpp_sigmas`; ``x`` is scaled by `initial_latent`. Like the
    official sampler this ignores ``x_center``, restoration guidance and churn; build the denoiser with a
    constant `ControlScale` to match its missing linear control scale. Per step, with h = log(σ_k/σ_{k+1}):
    x ← (σ_{k+1}/σ_k)·e^{−ηh}·x − expm1(−h−ηh)·D̃, where D̃ = D on the first step and
    (1 + 1/(2r))·D − (1/(2r))·D_prev (r = h_prev/h) afterwards, plus s_noise·σ_{k+1}·√(−expm1(−2ηh))·ε from
    the second step on. A step to σ = 0 returns D.

    Deviation: the official sampler draws ε from k-diffusion's `BrownianTreeNoiseSampler` (torchsde),
    seeded from the global RNG. Here ε is a plain Gaussian ``noise(x)`` draw per noised step, which has
    the same distribution per step but is not seed-identical to the official output.
    """
    total = sigmas.shape[0] - 1
    s_in = sigmas.new_ones(x.shape[0])
    sigma_values = sigmas.tolist()  # host floats, read once
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for k in range(total):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        sigma_b = sigma * s_in  # (B,)
        denoised = denoise(x, sigma_b, sigma_b)
        _report(callback, denoise, k, total, sigma_values[k], sigma_values[k + 1], 0.0, 0.0, sigma_b, sigma_b,
                x, denoised)
        if sigma_values[k + 1] == 0.0:
            x = denoised
            continue
        h = torch.log(sigma / sigma_next)
        eta_h = eta * h
        x_std_coef = sigma_next / sigma * torch.exp(-eta_h)
        d_coef = -torch.expm1(-h - eta_h)
        if old_denoised is None or h_last is None:
            x = x_std_coef * x + d_coef * denoised
        else:
            r = h_last / h
            corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = x_std_coef * x + d_coef * corrected
            if eta:
                x = x + noise(x) * sigma_next * torch.sqrt(-torch.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


__all__ = ["NoiseFn", "StepInfo", "initial_latent", "sample_dpmpp_2m_sde", "sample_restore_edm"]
