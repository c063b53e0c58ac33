"""The assembled SUPIR model: state-dict keys exactly those of the official `SUPIRModel`.

Mirrors the module tree of `SUPIR/models/SUPIR_model.py::SUPIRModel` (Fanghua-Yu/SUPIR @ bda91af):
`model.diffusion_model` (LightGLVUNet), `model.control_model` (GLVControl), `first_stage_model`
(AutoencoderKL + denoise_encoder) and `conditioner` (text encoders + size embedders). The sampler,
denoiser and pipeline are plain functions elsewhere; this file only holds networks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from supir_rt.config import ModelConfig
from supir_rt.model.control import ControlScale, GLVControl
from supir_rt.model.text import Conditioner
from supir_rt.model.unet import LightGLVUNet
from supir_rt.model.vae import AutoencoderKL


class ControlWrapper(nn.Module):
    """`model`: holds the UNet and the control trunk under their checkpoint names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.diffusion_model = LightGLVUNet(config.network_config)
        self.control_model = GLVControl(config.control_stage_config)

    def forward(
        self,
        x_in: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        lq_latent: torch.Tensor,
        control_scale: ControlScale = 1.0,
    ) -> torch.Tensor:
        """One network evaluation: GLVControl then the UNet with connectors -> eps (B, 4, h, w).

        `x_in` is the c_in-scaled noisy latent, `timesteps` the integer DDPM index, `lq_latent`
        the control latent (DR-encoder posterior mean x scale_factor), same batch as `x_in`.
        """
        control = self.control_model(x=lq_latent, timesteps=timesteps, xt=x_in, context=context, y=y)
        return self.diffusion_model(x_in, timesteps=timesteps, context=context, y=y, control=control,
                                    control_scale=control_scale)


class SUPIRModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ControlWrapper(config)
        self.first_stage_model = AutoencoderKL(config.first_stage_config)
        self.conditioner = Conditioner(config.conditioner_config)

    def network(
        self, x_in: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], control_scale: ControlScale
    ) -> torch.Tensor:
        """The denoiser's network callable: cond holds `crossattn`, `vector` and `control`."""
        return self.model(x_in, t, cond["crossattn"], cond["vector"], cond["control"], control_scale)


def initialise_random(module: nn.Module) -> None:
    """Default PyTorch init for every module that has one; N(0, 0.02) for other direct parameters."""
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        elif any(True for _ in sub.parameters(recurse=False)):
            with torch.no_grad():
                for p in sub.parameters(recurse=False):
                    p.normal_(0.0, 0.02)


def build_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
    init: bool = True,
) -> SUPIRModel:
    """Build SUPIR in `dtype` on `device` without ever materialising an fp32 copy.

    The module tree is made on the meta device, cast, then allocated directly on `device`; with
    `init=True` parameters get PyTorch's default random init in place (seed with torch.manual_seed),
    with `init=False` they are left uninitialised for a checkpoint to fill. `device="meta"` allocates
    nothing. The model is returned in eval mode with gradients off.
    """
    with torch.device("meta"):
        model = SUPIRModel(config)
    model = model.to(dtype)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
        if init:
            initialise_random(model)
    return model.eval().requires_grad_(False)
