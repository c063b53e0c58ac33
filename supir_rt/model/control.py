"""SUPIR's adaptor: the ZeroSFT and ZeroCrossAttn connectors and the GLVControl trunk.

Ports `ZeroSFT`, `ZeroCrossAttn` and `GLVControl` of `SUPIR/modules/SUPIR_v0.py`
(Fanghua-Yu/SUPIR @ bda91af), from its documented formulas.
Removed upstream: the `mask`/progressive-mask training branches (asserted off at inference), the
unused `ZeroConv`, xformers switches, gradient checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn

from supir_rt.config import ControlConfig
from supir_rt.model.blocks import CrossAttention, normalization
from supir_rt.model.trunk import EncoderTrunk

ControlScale = float | torch.Tensor


def _as_scale(s: ControlScale, like: torch.Tensor) -> ControlScale:
    """A float stays a float; a tensor (scalar, (1,) or (B,)) broadcasts over (B, C, H, W)."""
    if isinstance(s, torch.Tensor):
        return s.to(like.dtype).reshape(-1, 1, 1, 1)
    return s


class ZeroSFT(nn.Module):
    """Spatial feature transform of the UNet skip (and decoder state) by a control feature.

    y = GN(cat(h_dec, h + zero_conv(c))) * (1 + zero_mul(a)) + zero_add(a),  a = SiLU(mlp_shared(c))
    out = s * y + (1 - s) * cat(h_dec, h)        (the GN spans the whole concatenation)
    """

    def __init__(self, label_nc: int, norm_nc: int, concat_channels: int = 0, nhidden: int = 128) -> None:
        super().__init__()
        self.concat_channels = concat_channels
        width = norm_nc + concat_channels
        self.param_free_norm = normalization(width)  # affine despite the upstream name
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.SiLU())
        self.zero_mul = nn.Conv2d(nhidden, width, 3, padding=1)
        self.zero_add = nn.Conv2d(nhidden, width, 3, padding=1)
        self.zero_conv = nn.Conv2d(label_nc, norm_nc, 1)

    def forward(
        self, c: torch.Tensor, h: torch.Tensor, h_dec: torch.Tensor | None = None, control_scale: ControlScale = 1.0
    ) -> torch.Tensor:
        has_dec = h_dec is not None and self.concat_channels > 0
        raw = torch.cat([h_dec, h], dim=1) if has_dec else h  # (B, C_dec + C_skip, H, W), decoder first
        injected = h + self.zero_conv(c)  # only the skip gets the additive injection
        u = torch.cat([h_dec, injected], dim=1) if has_dec else injected
        actv = self.mlp_shared(c)  # (B, 128, H, W)
        y = self.param_free_norm(u) * (1 + self.zero_mul(actv)) + self.zero_add(actv)
        s = _as_scale(control_scale, y)
        return s * y + (1 - s) * raw


class ZeroCrossAttn(nn.Module):
    """h + s * Attn(q = GN1(h) tokens, kv = GN2(c) tokens); 64-dim heads."""

    def __init__(self, context_dim: int, query_dim: int, dim_head: int = 64) -> None:
        super().__init__()
        self.attn = CrossAttention(query_dim, context_dim=context_dim, heads=query_dim // dim_head, dim_head=dim_head)
        self.norm1 = normalization(query_dim)
        self.norm2 = normalization(context_dim)

    def forward(self, c: torch.Tensor, h: torch.Tensor, control_scale: ControlScale = 1.0) -> torch.Tensor:
        b, ch, hh, ww = h.shape
        q = self.norm1(h).reshape(b, ch, hh * ww).transpose(1, 2)  # (B, H*W, C_q)
        kv = self.norm2(c)
        kv = kv.reshape(b, kv.shape[1], -1).transpose(1, 2)  # (B, H*W, C_ctx)
        out = self.attn(q, kv).transpose(1, 2).reshape(b, ch, hh, ww)  # (B, C_q, H, W)
        return h + _as_scale(control_scale, out) * out


class GLVControl(EncoderTrunk):
    """The adaptor trunk: a full SDXL encoder + `input_hint_block`, returning 10 control features.

    The LQ latent enters only through `input_hint_block`, added after `input_blocks[0]` (which sees
    the c_in-scaled noisy latent `xt`); there is no channel concatenation.
    """

    def __init__(self, cfg: ControlConfig) -> None:
        super().__init__(cfg)
        self.input_hint_block = nn.Sequential(nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, xt: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> list[torch.Tensor]:
        dtype = x.dtype
        xt, context, y = xt.to(dtype), context.to(dtype), y.to(dtype)
        emb = self.embed(timesteps, y)  # (B, 4*mc)
        h = self.input_blocks[0](xt, emb, context) + self.input_hint_block(x)  # (B, mc, H, W)
        features = [h]
        for block in self.input_blocks[1:]:
            h = block(h, emb, context)
            features.append(h)
        features.append(self.middle_block(h, emb, context))  # feature 9: (B, 4*mc, H/4, W/4)
        return features
