"""Building blocks of the SDXL UNet and of GLVControl, with SGM's module names.

Ports, from Stability-AI/generative-models as vendored by Fanghua-Yu/SUPIR @ bda91af:
`sgm/modules/diffusionmodules/openaimodel.py` (TimestepEmbedSequential, ResBlock, Downsample,
Upsample), `sgm/modules/attention.py` (CrossAttention, FeedForward/GEGLU, BasicTransformerBlock,
SpatialTransformer) and `sgm/modules/diffusionmodules/util.py` (GroupNorm32).
Removed upstream branches: gradient checkpointing, xformers kernels, scale-shift norm, conv
resamplers of other dims, dropout (0 at inference; kept as identity-like modules so indices match).

Norms compute in float32 and cast back, as the official run does (GroupNorm32 upcasts explicitly;
autocast runs GroupNorm/LayerNorm in fp32), so a half-precision model keeps the official numerics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The attention kernel: one module-level seam so that export or benchmarks can swap it.
# Signature: (q, k, v) each (B, heads, tokens, dim_head) -> (B, heads, tokens_q, dim_head).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
attention_fn: AttentionFn = F.scaled_dot_product_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention, scale 1/sqrt(dim_head), no mask. (B, T, C) -> (B, Tq, C)."""
    b, tq, c = q.shape
    q = q.reshape(b, tq, heads, c // heads).transpose(1, 2)  # (B, heads, Tq, d)
    k = k.reshape(b, k.shape[1], heads, c // heads).transpose(1, 2)  # (B, heads, Tk, d)
    v = v.reshape(b, v.shape[1], heads, c // heads).transpose(1, 2)
    out = attention_fn(q, k, v)  # (B, heads, Tq, d)
    return out.transpose(1, 2).reshape(b, tq, c)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32, result cast back to the input dtype (sgm `GroupNorm32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm evaluated in float32 (as under autocast), result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=eps)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose members get `emb` (ResBlock) or `context` (SpatialTransformer) as they need."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(emb)) per channel, GN-SiLU-Dropout-conv, + skip (1x1 conv if widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 conv3x3 with symmetric padding 1 (the UNet's; the VAE's pads asymmetrically)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then conv3x3. (Upstream interpolates in fp32; nearest copies values, so it is exact in any dtype.)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """q from x, k/v from context (or x); no q/k/v bias, biased output projection `to_out.0`."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)  # (B, T, inner)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, dim_out) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += SelfAttn(LN1 x); x += CrossAttn(LN2 x, context); x += GEGLU-FF(LN3 x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN(eps 1e-6) -> tokens -> Linear proj_in -> depth x BasicTransformerBlock -> Linear proj_out -> + input."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm
        tokens = F.group_norm(x.float(), n.num_groups, n.weight.float(), n.bias.float(), n.eps).to(x.dtype)
        tokens = tokens.reshape(b, c, h * w).transpose(1, 2)  # (B, H*W, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)
