"""Independent formulas the tests compare the implementation with (written from the published
definitions, sharing no code with supir_rt).

* `direct_wavelet_lowpass`: the à-trous low band of SUPIR's colour fix as an explicit sum over the 3x3
  binomial taps [[1,2,1],[2,4,2],[1,2,1]]/16 at offsets ±r (r = 1, 2, 4, 8, 16), with replicate
  padding expressed as index clamping; no convolution routine is used.
* `sinusoid`: the SGM timestep embedding (cos half first, then sin; frequencies 10000^(-k/half)).
* `ddpm_sigma_table`: the legacy DDPM σ table (scaled-linear β from 0.00085 to 0.012, 1000 steps).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BINOMIAL_3X3 = ((1, 2, 1), (2, 4, 2), (1, 2, 1))
WAVELET_RADII = (1, 2, 4, 8, 16)


def direct_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """(..., H, W) float64 -> same: out[y, x] = Σ_ij w_ij/16 · image[clamp(y + i·r), clamp(x + j·r)]."""
    h, w = image.shape[-2:]
    out = np.zeros_like(image, dtype=np.float64)
    for i, row in zip((-1, 0, 1), BINOMIAL_3X3):
        ys = np.clip(np.arange(h) + i * radius, 0, h - 1)
        for j, weight in zip((-1, 0, 1), row):
            xs = np.clip(np.arange(w) + j * radius, 0, w - 1)
            out += weight / 16.0 * image[..., ys, :][..., :, xs]
    return out


def direct_wavelet_lowpass(image: np.ndarray) -> np.ndarray:
    """The residual low band after the five à-trous levels (high band = image − this)."""
    low = np.asarray(image, dtype=np.float64)
    for radius in WAVELET_RADII:
        low = direct_blur(low, radius)
    return low


def direct_wavelet_fix(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """SUPIR's wavelet colour fix: high band of ``content`` + low band of ``style``."""
    content = np.asarray(content, dtype=np.float64)
    return content - direct_wavelet_lowpass(content) + direct_wavelet_lowpass(style)


def sinusoid(value: float, dim: int, max_period: float = 10000.0) -> list[float]:
    half = dim // 2
    freqs = [math.exp(-math.log(max_period) * k / half) for k in range(half)]
    return [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]


def ddpm_sigma_table(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """float32 (n,) ascending: σ_j = sqrt((1 − ᾱ_j)/ᾱ_j), ᾱ = Π(1 − β), β_j = (√start + j/(n−1)(√end − √start))²."""
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return torch.from_numpy(np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)).to(torch.float32)
