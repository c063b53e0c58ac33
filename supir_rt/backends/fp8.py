"""fp8 (e4m3) storage of the UNet + adaptor weights, upcast per layer at use.

Applied from outside the reference model by module replacement (gpt-fast's ``quantize.py`` style):
every `nn.Linear` and `nn.Conv2d` of a module tree is replaced by a module holding its weight as
``float8_e4m3fn`` with one fp32 scale per output channel (the channel's max |w| maps to 448, e4m3's
largest value). At each call the weight is upcast to the activation dtype and rescaled, then the
ordinary fp16/bf16 linear/conv runs: the arithmetic is unchanged, only the stored weights are
rounded. This halves the resident UNet + adaptor (7.7 GB -> 3.9 GB for the official model).

Rounding error: e4m3 keeps 3 mantissa bits, so each weight in the normal range moves by at most
2^-4 of itself (relative); weights below 2^-6 of the channel's scale, i.e. below 2^-6·max/448, are
subnormal and move by at most 2^-10·scale (half the subnormal spacing). The measured effect on the network output is in
docs/cuda.md.

On CUDA this is offered for GPUs with native fp8 (compute capability 8.9+: Ada, Hopper and newer);
`check_fp8_device` refuses others. On a CPU it works (slowly) and is what the tests measure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 per-output-channel scale) with weight ≈ fp8.float() * scale."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)  # (out,)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))  # (out, 1[, 1, 1])
    return (w / scale).to(FP8), scale


class _Fp8Weight(nn.Module):
    def _store(self, source: nn.Module) -> None:
        q, scale = _quantize(source.weight)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = source.bias
        self.compute_dtype = source.weight.dtype  # what the model reads as ``layer.weight.dtype``

    @property
    def weight(self) -> torch.Tensor:
        """The weight as used: upcast and rescaled, in the layer's original dtype. Apply fp8 after any
        cast of the model (``Module.to(dtype)`` would upcast the fp8 buffers too)."""
        return self.dequantized(self.compute_dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        # the scale is applied in fp32: per-channel scales of small weights (max |w| / 448, ~1e-5) are
        # subnormal in fp16 and would lose most of their bits there; the product is a normal weight
        return (self.weight_fp8.float() * self.weight_scale).to(dtype)


class Fp8Linear(_Fp8Weight):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class Fp8Conv2d(_Fp8Weight):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"Fp8Conv2d supports zero padding given as numbers, not {conv.padding_mode}/{conv.padding}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._store(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def quantize_fp8_(module: nn.Module) -> int:
    """Replace every Linear / Conv2d below ``module`` by its fp8-weight version, in place (the
    high-precision weight of each layer is freed as soon as it is replaced, so peak memory is the
    original model plus one layer). Returns the number of layers replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Fp8Linear(child))
            count += 1
        elif isinstance(child, nn.Conv2d):
            setattr(module, name, Fp8Conv2d(child))
            count += 1
        else:
            count += quantize_fp8_(child)
    return count


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """None if ``--fp8-weights`` may be used on ``device``, else why not (one sentence)."""
    from supir_rt import cuda_runtime

    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = cuda_runtime.capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = cuda_runtime.device_name(device)
        return (f"--fp8-weights needs a GPU with fp8 support (compute capability 8.9 or newer: Ada, Hopper, "
                f"Blackwell); {name} is {major}.{minor}. Run without --fp8-weights")
    return None


__all__ = ["FP8", "Fp8Conv2d", "Fp8Linear", "fp8_unsupported_reason", "quantize_fp8_"]
