"""Colour correction of the decoded sample against the stage-1 image.

Reproduces SUPIR `SUPIR/utils/colorfix.py` (itself adapted from sd-webui-stablesr):

* wavelet reconstruction: a 5-level à-trous decomposition (replicate padding, depthwise 3×3 binomial
  kernel with dilation r = 1, 2, 4, 8, 16); the result is the high-frequency part of ``content`` plus
  the low-frequency residual of ``style``;
* AdaIN: per image and channel, ``(content − μ_c)/σ_c · σ_s + μ_s`` with the **unbiased** variance over
  H·W plus 1e-5.

``content`` is the decoded SUPIR sample, ``style`` the stage-1 image; both in [−1, 1], shape
(B, C, H, W), and nothing is clamped. Unlike the official code (hard-coded to 3 channels), any channel
count works.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ColorFixType = Literal["wavelet", "adain", "none"]

WAVELET_RADII: tuple[int, ...] = (1, 2, 4, 8, 16)
ADAIN_EPS: float = 1e-5


def _check_pair(content: torch.Tensor, style: torch.Tensor) -> None:
    if content.ndim != 4 or content.shape != style.shape:
        raise ValueError(
            f"content and style must both be (B, C, H, W) of the same shape, got {tuple(content.shape)} "
            f"and {tuple(style.shape)}"
        )


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Replicate-pad by ``radius`` and convolve each channel with [[1,2,1],[2,4,2],[1,2,1]]/16 dilated by
    ``radius``. (B, C, H, W) -> (B, C, H, W)."""
    channels = image.shape[1]
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device)
    kernel = (kernel / 16).expand(channels, 1, 3, 3)  # (C, 1, 3, 3) depthwise
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")  # (B, C, H+2r, W+2r)
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(
    image: torch.Tensor, radii: tuple[int, ...] = WAVELET_RADII
) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with high = Σ_r (img_r − blur(img_r, r)) and low the last blur; high + low = image."""
    high = torch.zeros_like(image)
    for radius in radii:
        low = wavelet_blur(image, radius)
        high = high + (image - low)
        image = low
    return high, image


def wavelet_reconstruction(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """SUPIR `wavelet_reconstruction`: high frequencies of ``content`` + low frequencies of ``style``."""
    _check_pair(content, style)
    content_high, _ = wavelet_decomposition(content)
    _, style_low = wavelet_decomposition(style)
    return content_high + style_low


def _mean_std(feat: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)  # (B, C, H*W)
    mean = flat.mean(dim=2).reshape(b, c, 1, 1)
    std = (flat.var(dim=2, unbiased=True) + eps).sqrt().reshape(b, c, 1, 1)
    return mean, std


def adain_color_fix(content: torch.Tensor, style: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """SUPIR `adaptive_instance_normalization`: match each channel's mean and std to ``style``."""
    _check_pair(content, style)
    content_mean, content_std = _mean_std(content, eps)
    style_mean, style_std = _mean_std(style, eps)
    return (content - content_mean) / content_std * style_std + style_mean


def color_fix(content: torch.Tensor, style: torch.Tensor, kind: ColorFixType) -> torch.Tensor:
    """Apply the colour fix named by ``kind`` (official ``color_fix_type`` Wavelet / AdaIn / None)."""
    if kind == "wavelet":
        return wavelet_reconstruction(content, style)
    if kind == "adain":
        return adain_color_fix(content, style)
    if kind == "none":
        return content
    raise ValueError(f"unknown colour fix {kind!r}; choose 'wavelet', 'adain' or 'none'")


__all__ = [
    "ColorFixType", "adain_color_fix", "color_fix", "wavelet_blur", "wavelet_decomposition",
    "wavelet_reconstruction",
]
