"""Sinusoidal embeddings shared by the UNet, GLVControl and the size conditioner.

Ports `timestep_embedding` of Stability-AI/generative-models `sgm/modules/diffusionmodules/util.py`
(the version SUPIR vendors at Fanghua-Yu/SUPIR @ bda91af): **cos first, then sin**, frequencies
exp(-ln(max_period) * k / half) for k = 0..half-1, computed in float32.
"""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps (integer DDPM indices or sizes) -> (N, dim) float32 embedding, cos first."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
