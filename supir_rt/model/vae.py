"""The SDXL VAE (AutoencoderKL) with SUPIR's degradation-robust `denoise_encoder`.

Ports `Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample` (and `Upsample`, shared with the UNet) of
`sgm/modules/diffusionmodules/model.py`, `AutoencoderKL` of `sgm/models/autoencoder.py`,
`DiagonalGaussianDistribution` of `sgm/modules/distributions/distributions.py`, and the denoise
encoder of `SUPIR/models/SUPIR_model.py` (Fanghua-Yu/SUPIR @ bda91af).
The denoise encoder is a second `Encoder` sharing `quant_conv`. Mid attention is single-head SDPA
(the `vanilla-xformers` block computes the same thing). Removed: temb paths (unused),
in-level attention (attn_resolutions is empty), training losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from supir_rt.config import VAEConfig
from supir_rt.model import blocks
from supir_rt.model.blocks import Upsample  # nearest x2 + conv3x3, same as the UNet's


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with 1x1-conv q/k/v/proj_out, scale C^-0.5."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # contiguous (B, HW, C): a transposed view makes SDPA take its math kernel, which stores the
        # HW x HW scores (2.3 GB at 16k tokens); dense rows let it use a fused (flash / memory-efficient) one
        q, k, v = (conv(n).reshape(b, c, h * w).transpose(1, 2).contiguous() for conv in (self.q, self.k, self.v))
        out = blocks.attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by 1 (asymmetric), then a stride-2 conv3x3 without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> moments (B, 2*z, H/8, W/8) (before quant_conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            block_out = cfg.ch * mult
            stage.block = nn.ModuleList(
                [ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(cfg.num_res_blocks)]
            )
            block_in = block_out
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) (after post_quant_conv) -> image (B, 3, 8h, 8w), not clamped."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        up: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList(
                [ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(cfg.num_res_blocks + 1)]
            )
            block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)  # up[0] is the full-resolution level, run last
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class DiagonalGaussian:
    """The VAE posterior: moments split into mean and logvar (clamped to [-30, 20])."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std * noise; the caller draws `noise` (official: CPU generator, then moved)."""
        return self.mean + torch.exp(0.5 * self.logvar) * noise.to(self.mean)


class AutoencoderKL(nn.Module):
    """`first_stage_model`: encoder, denoise_encoder (DR encoder), decoder, quant_conv, post_quant_conv."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.denoise_encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor, *, denoise: bool = False) -> DiagonalGaussian:
        """Posterior of the standard encoder, or of the degradation-robust one (`denoise=True`)."""
        encoder = self.denoise_encoder if denoise else self.encoder
        return DiagonalGaussian.from_moments(self.quant_conv(encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in about [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))
