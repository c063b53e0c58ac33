"""σ schedules for SUPIR sampling: the legacy DDPM discretisation and the step schedules built on it.

Reproduces, from documented facts about the official code:

* sgm `LegacyDDPMDiscretization` (``linear_start 0.00085``, ``linear_end 0.012``, 1000 steps): the
  1000 discrete σ the denoiser snaps to (`DiscreteDenoiser.sigmas`, ascending, index = DDPM timestep);
* the N-step restore schedule of `RestoreEDMSampler`: roughly equally spaced DDPM timesteps, their σ in
  descending order and a final 0;
* the Karras ρ-schedule (Karras et al. 2022, eq. 5) used by `RestoreDPMPP2MSampler`.

σ_max: the table's last entry is 14.614641 (`SIGMA_MAX`, derived here). The official sampler and guider
do not read it from the table but hard-code the literal ``14.6146``; everything in this package that
reproduces one of those formulas (linear CFG, linear control scale, restoration-guidance weight) uses
`OFFICIAL_SIGMA_MAX` instead, so that results match the official code bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from supir_rt.config import DenoiserConfig

OFFICIAL_SIGMA_MAX: float = 14.6146
"""The literal the official `RestoreEDMSampler` (restoration weight, control scale) and `LinearCFG`
use as σ_max. It is `SIGMA_MAX` rounded to 4 decimals; kept separate so that both are visible."""


def legacy_ddpm_sigmas(cfg: DenoiserConfig = DenoiserConfig()) -> torch.Tensor:
    """The discrete σ table of sgm `LegacyDDPMDiscretization`: float32, shape (num_idx,), ascending.

    β_j = (√start + j/(n−1)·(√end − √start))², ᾱ = cumprod(1 − β), σ_j = √((1 − ᾱ_j)/ᾱ_j); all in
    float64, cast to float32 at the end. Index j is the DDPM timestep fed to the UNet.
    """
    n = cfg.num_idx
    lo, hi = cfg.linear_start**0.5, cfg.linear_end**0.5
    j = torch.arange(n, dtype=torch.float64)
    betas = (lo + j / (n - 1) * (hi - lo)) ** 2  # (n,)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (n,)
    return torch.sqrt((1.0 - alphas_cumprod) / alphas_cumprod).to(torch.float32)


SIGMA_MAX: float = float(legacy_ddpm_sigmas()[-1])
"""σ at DDPM timestep 999 of the default table (14.614641...), derived from the table."""


def restore_timesteps(n: int, num_idx: int = DenoiserConfig.num_idx) -> torch.Tensor:
    """DDPM timesteps of an n-step restore schedule, descending: ``int(999 − k·999/n)``, k = 0..n−1.

    Computed like sgm's `generate_roughly_equally_spaced_steps` (numpy ``linspace(999, 0, n,
    endpoint=False)`` cast to int), so that float rounding in ``k·step + 999`` matches; with n equal to
    ``num_idx`` every timestep is used, as in `LegacyDDPMDiscretization`. Returns int64, shape (n,).
    """
    if not 1 <= n <= num_idx:
        raise ValueError(f"number of steps n={n} must be in 1..{num_idx}")
    if n == num_idx:
        return torch.arange(num_idx - 1, -1, -1, dtype=torch.int64)
    steps = np.linspace(num_idx - 1, 0, n, endpoint=False).astype(int)
    return torch.from_numpy(steps.astype(np.int64))


def restore_sigmas(n: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """σ schedule of `RestoreEDMSampler` for n steps: table[restore_timesteps(n)] descending, then 0.

    Returns n+1 values in the table's dtype (float32). ``table`` defaults to `legacy_ddpm_sigmas()`.
    """
    table = legacy_ddpm_sigmas() if table is None else table
    sigmas = table[restore_timesteps(n, table.shape[0]).to(table.device)]  # (n,)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 schedule, n values from sigma_max down to sigma_min, then 0.

    σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ in float32 (as k-diffusion's
    `get_sigmas_karras`, which the official DPM++ sampler calls). Returns n+1 values.
    """
    if n < 1:
        raise ValueError(f"number of steps n={n} must be >= 1")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    ramp = torch.linspace(0, 1, n)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # (n,)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def dpmpp_sigmas(n: int, table: torch.Tensor | None = None, rho: float = 7.0) -> torch.Tensor:
    """σ schedule of the official `RestoreDPMPP2MSampler`: Karras ρ=7 between the legacy σ at
    the last and the first timestep of `restore_timesteps(n)`, then 0. Returns n+1 values."""
    table = legacy_ddpm_sigmas() if table is None else table
    legacy = restore_sigmas(n, table)
    return karras_sigmas(n, float(legacy[n - 1]), float(legacy[0]), rho).to(table.device)


def sigma_to_index(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest discrete σ (argmin |table − σ|, first on ties), as in sgm
    `DiscreteDenoiser.sigma_to_idx`. σ is compared in the table's dtype. Returns int64, σ's shape."""
    sigma = torch.as_tensor(sigma, device=table.device).to(table.dtype)
    dists = (sigma.reshape(-1, 1) - table.reshape(1, -1)).abs()  # (numel, num_idx)
    return dists.argmin(dim=1).reshape(sigma.shape)


__all__ = [
    "OFFICIAL_SIGMA_MAX", "SIGMA_MAX", "dpmpp_sigmas", "karras_sigmas", "legacy_ddpm_sigmas",
    "restore_sigmas", "restore_timesteps", "sigma_to_index",
]
