"""Shared test helpers: toy engines behind the real Engine contract, and a deterministic test image.

`toy_engines` are cheap, deterministic functions of every input (feeds checked against `network_specs`),
so a whole restore runs at real processing sizes in milliseconds. Importable from every test folder
(tests/conftest.py puts this folder on the path, as pytest does for a rootdir conftest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, MutableMapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from supir_rt.backends import EngineBase
from supir_rt.backends.specs import network_specs
from supir_rt.config import ModelConfig


class ToyEngine(EngineBase):
    """One toy network; counts its calls in ``calls`` and, with ``log``, keeps a copy of every feed."""

    backend = "toy"

    def __init__(self, spec, fn, calls: Counter, log: MutableMapping[str, list] | None = None) -> None:
        super().__init__(spec, "cpu")
        self.fn, self.calls, self.log = fn, calls, log

    def _run(self, feed):
        self.calls[self.spec.name] += 1
        if self.log is not None:
            self.log.setdefault(self.spec.name, []).append({k: v.clone() for k, v in feed.items()})
        return self.fn(**feed)


def toy_engines(config: ModelConfig | None = None, *, nan: bool = False, unet: Callable | None = None,
                log: MutableMapping[str, list] | None = None) -> tuple[dict[str, ToyEngine], Counter]:
    """Engines whose outputs depend on every input, at negligible cost. ``nan``: the decoder emits NaN;
    ``unet``: another closed-form ``unet_adaptor`` (same keyword arguments as the feed); ``log``: record
    every feed per network."""
    config = config or ModelConfig.tiny()
    specs = network_specs(config)
    ctx = config.network_config.context_dim
    proj = config.conditioner_config.bigg.projection_dim
    calls: Counter = Counter()

    def pool(image):  # (B, 3, 8h, 8w) -> (B, 4, h, w)
        p = F.avg_pool2d(image, 8)
        return torch.cat([p, p.mean(1, keepdim=True)], 1)

    def dr_encoder(image):
        return {"latent": pool(image) * 0.5}

    def vae_encoder(image):
        p = pool(image)
        return {"moments": torch.cat([p * 0.4, torch.full_like(p, -3.0)], 1)}

    def vae_decoder(latent):
        img = torch.tanh(F.interpolate(latent[:, :3] * 2.0, scale_factor=8, mode="nearest"))
        return {"image": img * float("nan") if nan else img}

    def text_encoders(clip_l_ids, bigg_ids):
        pos = torch.arange(ctx, dtype=torch.float32)
        crossattn = torch.sin(clip_l_ids[..., None].float() * 0.01 + pos * 0.1 + bigg_ids[..., None].float() * 0.001)
        pooled = torch.cos(bigg_ids.float().mean(1, keepdim=True) * 0.01 + torch.arange(proj) * 0.2)
        return {"crossattn": crossattn, "pooled": pooled}

    def unet_adaptor(x_in, timesteps, context, vector, lq_latent, control_scale):
        b = x_in.shape[0]
        bias = (context.mean((1, 2)) + vector.mean(1) + timesteps.float() / 1000).reshape(b, 1, 1, 1)
        return {"eps": 0.5 * x_in + 0.3 * control_scale * lq_latent + 0.1 * bias}

    fns = {"dr_encoder": dr_encoder, "vae_encoder": vae_encoder, "vae_decoder": vae_decoder,
           "text_encoders": text_encoders, "unet_adaptor": unet or unet_adaptor}
    return {name: ToyEngine(specs[name], fn, calls, log) for name, fn in fns.items()}, calls


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img if mode == "RGB" else img.convert(mode)
