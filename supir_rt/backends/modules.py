"""One `nn.Module` per exported network, with positional tensor inputs in spec order.

These adapt the reference model's signatures to the I/O contract of `specs.py`: the
PyTorch backend runs them and the ONNX exporter traces them, so both see the same computation.
Per-step values (timestep, control_scale) are inputs, never constants.
"""

from __future__ import annotations

import torch
from torch import nn

from supir_rt.backends.specs import NETWORKS
from supir_rt.model.supir import SUPIRModel


class DREncoder(nn.Module):
    """image (B,3,H,W) -> scale_factor x posterior mean of the degradation-robust encoder."""

    def __init__(self, model: SUPIRModel) -> None:
        super().__init__()
        self.vae = model.first_stage_model
        self.scale = model.config.first_stage_config.scale_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image, denoise=True).mode() * self.scale


class VAEEncoder(nn.Module):
    """image -> posterior moments (B, 8, h, w) of the standard encoder (logvar not yet clamped)."""

    def __init__(self, model: SUPIRModel) -> None:
        super().__init__()
        self.vae = model.first_stage_model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.quant_conv(self.vae.encoder(image))


class UNetAdaptor(nn.Module):
    """(x_in, timesteps, context, vector, lq_latent, control_scale) -> eps; control features stay inside."""

    def __init__(self, model: SUPIRModel) -> None:
        super().__init__()
        self.model = model.model

    def forward(self, x_in, timesteps, context, vector, lq_latent, control_scale):  # noqa: ANN001 - spec order
        return self.model(x_in, timesteps, context, vector, lq_latent, control_scale).float()


class VAEDecoder(nn.Module):
    """scaled latent -> image (decode of latent / scale_factor), not clamped."""

    def __init__(self, model: SUPIRModel) -> None:
        super().__init__()
        self.vae = model.first_stage_model
        self.scale = model.config.first_stage_config.scale_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scale)


class TextEncoders(nn.Module):
    """(clip_l_ids, bigg_ids) -> (crossattn, pooled)."""

    def __init__(self, model: SUPIRModel) -> None:
        super().__init__()
        self.conditioner = model.conditioner

    def forward(self, clip_l_ids: torch.Tensor, bigg_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conditioner.encode_tokens(clip_l_ids, bigg_ids)


NETWORK_MODULES: dict[str, type[nn.Module]] = {
    "dr_encoder": DREncoder,
    "vae_encoder": VAEEncoder,
    "unet_adaptor": UNetAdaptor,
    "vae_decoder": VAEDecoder,
    "text_encoders": TextEncoders,
}
# The SUPIRModel submodule each network's module reads (the rest of the model can stay on `meta`).
OWNER_MODULES: dict[str, str] = {
    "dr_encoder": "first_stage_model", "vae_encoder": "first_stage_model", "vae_decoder": "first_stage_model",
    "unet_adaptor": "model", "text_encoders": "conditioner",
}
if set(NETWORK_MODULES) != set(NETWORKS) or set(OWNER_MODULES) != set(NETWORKS):  # specs.NETWORKS is the one list
    raise ImportError(f"backends.modules covers {sorted(NETWORK_MODULES)}, specs.NETWORKS is {NETWORKS}")

