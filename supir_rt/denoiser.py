"""The denoiser stack: ε-preconditioning around a network, then classifier-free guidance.

Three layers, each a callable, composed as::

    network   (x_in, t, cond, control_scale) -> ε̂          GLVControl + UNet, or an engine
    EpsDenoiser(network, table)
              (x, σ, cond, control_scale) -> D            σ snapped to the DDPM table, D = x − σ_q·ε̂
    GuidedDenoiser(eps_denoiser, cond, uncond, LinearCFG(...), ControlScale(...))
              (x, σ̂, σ) -> D                               one batch-2 call [uncond, cond], linear CFG
    sample_restore_edm(guided, x, sigmas, ...)             the sampler only sees (x, σ̂, σ) -> D

Why the `Denoiser` takes two σ: SUPIR evaluates some schedules at the churned σ̂ (the noise level of x:
preconditioning, linear CFG) and others at the un-churned schedule value σ_k of the step (the linear
control scale; the restoration weight, which the sampler applies itself). The sampler passes both, per
sample, as ``denoise(x, sigma_hat, sigma)``; they are equal when there is no churn. A plain denoiser
ignores the third argument. Everything stays a pure function of its inputs: no step counter is kept.

A denoiser may also expose ``scales(sigma_hat, sigma) -> (cfg_scale, control_scale)`` (`ReportsScales`);
the sampler calls it only to fill `StepInfo` for callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from supir_rt.schedule import OFFICIAL_SIGMA_MAX, legacy_ddpm_sigmas, sigma_to_index

Network = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], float | torch.Tensor], torch.Tensor]
"""``network(x_in, t, cond, control_scale) -> eps``: x_in is the c_in-scaled latent (B, 4, h, w), t the
integer DDPM timestep (B,) int64, cond holds ``crossattn`` (B, 77, 2048), ``vector`` (B, 2816) and
``control`` (B, 4, h, w); control_scale is a float or a 0-dim tensor."""


class ConditionedDenoiser(Protocol):
    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor], control_scale: float | torch.Tensor
    ) -> torch.Tensor: ...


class Denoiser(Protocol):
    """What the samplers call: ``denoise(x, sigma_hat, sigma) -> denoised``, σ's of shape (B,)."""

    def __call__(self, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ReportsScales(Protocol):
    def scales(self, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims in all, for broadcasting against (B, C, H, W)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def per_sample(sigma: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A σ given as a number, a 0-dim or a (B,) tensor, as a (B,) tensor on ``like``'s device."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.ndim == 0:
        return sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not match batch size {batch}")
    return sigma


class EpsDenoiser:
    """sgm `DiscreteDenoiserWithControl` with `EpsScaling` over the `LegacyDDPMDiscretization` table.

    ``__call__(x, σ, cond, control_scale)``: per sample, σ is snapped to the nearest discrete σ_q of the
    table (in the table's dtype: float32, or float16 to mimic the official ``--loading_half_params``),
    then ``D = x + network(x·c_in, t, cond, control_scale)·(−σ_q)`` with c_in = 1/√(σ_q² + 1) and t the
    integer index of σ_q. The network predicts ε.
    """

    def __init__(self, network: Network, sigmas_table: torch.Tensor | None = None) -> None:
        self.network = network
        self.sigmas = legacy_ddpm_sigmas() if sigmas_table is None else sigmas_table

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ_q, c_in, t) for σ of shape (B,): snapped σ, input scale (table dtype) and int64 index."""
        table = self.sigmas.to(sigma.device)
        t = sigma_to_index(sigma, table)  # (B,) int64
        sigma_q = table[t]  # (B,)
        c_in = 1 / (sigma_q**2 + 1.0) ** 0.5
        return sigma_q, c_in, t

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        control_scale: float | torch.Tensor,
    ) -> torch.Tensor:
        sigma = per_sample(sigma, x.shape[0], x)
        sigma_q, c_in, t = self.scalings(sigma)
        eps = self.network(x * append_dims(c_in, x.ndim), t, cond, control_scale)  # (B, C, h, w)
        return eps * append_dims(-sigma_q, x.ndim) + x  # c_out = −σ_q, c_skip = 1


@dataclass(frozen=True)
class LinearCFG:
    """sgm `LinearCFG`: guidance scale ``s(σ̂) = (scale − scale_min)·σ̂/σ_max + scale_min`` at the churned σ̂.

    SUPIR passes ``scale = spt_linear_CFG`` (cfg_scale_start) and ``scale_min = s_cfg``; without linear
    CFG both are ``s_cfg``. σ̂ above σ_max extrapolates (0.7 at step 0 for 1.0 → 4.0 with γ = 0.1).
    """

    scale: float
    scale_min: float
    sigma_max: float = OFFICIAL_SIGMA_MAX

    @classmethod
    def constant(cls, scale: float) -> LinearCFG:
        return cls(scale=scale, scale_min=scale)

    def __call__(self, sigma_hat: torch.Tensor) -> torch.Tensor:
        return (self.scale - self.scale_min) * sigma_hat / self.sigma_max + self.scale_min


@dataclass(frozen=True)
class ControlScale:
    """SUPIR's control scale (`RestoreEDMSampler`): ``control_scale`` (s_stage2), or with
    ``use_linear_control_scale`` the linear schedule ``(σ_k/σ_max)·(control_scale_start − control_scale)
    + control_scale``, evaluated at the un-churned σ_k of the first sample. Returns a 0-dim tensor."""

    control_scale: float = 1.0
    use_linear_control_scale: bool = False
    control_scale_start: float = 0.0
    sigma_max: float = OFFICIAL_SIGMA_MAX

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma0 = sigma.reshape(-1)[0]
        if not self.use_linear_control_scale:
            return torch.full_like(sigma0, self.control_scale)
        return (sigma0 / self.sigma_max) * (self.control_scale_start - self.control_scale) + self.control_scale


class GuidedDenoiser:
    """Classifier-free guidance (sgm `LinearCFG` guider) with SUPIR's control-scale schedule; a `Denoiser`.

    ``__call__(x, σ̂, σ)`` runs ``model`` once on the batch ``[x, x]`` at ``[σ̂, σ̂]`` with every cond tensor
    concatenated as ``[uncond, cond]`` (done once here, not per step), splits the result into (D_u, D_c)
    and returns ``D_u + s(σ̂)·(D_c − D_u)``. The control scale ``cs(σ)`` (σ = un-churned σ_k) is passed to
    the model unchanged for both halves.
    """

    def __init__(
        self,
        model: ConditionedDenoiser,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor],
        cfg: LinearCFG,
        control: ControlScale = ControlScale(),
    ) -> None:
        if set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ")
        self.model = model
        self.cfg = cfg
        self.control = control
        self.cond = {key: torch.cat([uncond[key], cond[key]]) for key in cond}  # (2B, ...) as [uc, c]
        self._checked_batch: int | None = None

    def scales(self, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CFG scale per sample (B,), control scale 0-dim) for this step."""
        return self.cfg(sigma_hat), self.control(sigma)

    def __call__(self, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        sigma_hat, sigma = per_sample(sigma_hat, batch, x), per_sample(sigma, batch, x)
        if batch != self._checked_batch:  # validated once per batch size, not at every step
            for key, value in self.cond.items():
                if value.shape[0] != 2 * batch:
                    raise ValueError(f"cond[{key!r}] has batch {value.shape[0] // 2}, x has batch {batch}")
            self._checked_batch = batch
        cfg_scale, control_scale = self.scales(sigma_hat, sigma)
        out = self.model(torch.cat([x, x]), torch.cat([sigma_hat, sigma_hat]), self.cond, control_scale)  # (2B, ...)
        d_uncond, d_cond = out.chunk(2)
        return d_uncond + append_dims(cfg_scale, x.ndim) * (d_cond - d_uncond)


__all__ = [
    "ConditionedDenoiser", "ControlScale", "Denoiser", "EpsDenoiser", "GuidedDenoiser", "LinearCFG", "Network",
    "ReportsScales", "append_dims", "per_sample",
]
