"""The tiled VAE behind the Engine protocol: ``dr_encoder`` / ``vae_encoder`` / ``vae_decoder`` engines
computed by `supir_rt.tiling.vae` over the PyTorch VAE of a torch-backend engine, so that the pipeline's
stage functions do not change when the VAE is tiled.
"""

from __future__ import annotations

import torch
from torch import nn

from supir_rt.tiling.vae import VAETiling, decoder_passes, encoder_passes, tiled_decode, tiled_encode


class TiledVAEEngine:
    """``dr_encoder`` / ``vae_encoder`` / ``vae_decoder`` with the engine's I/O contract, computed by the
    tiled VAE over the PyTorch `AutoencoderKL` (the same operations as `supir_rt.backends.modules`:
    quant_conv / post_quant_conv, posterior mean, scale factor, untiled around the tiled trunk). Each
    call is a progress phase of its own (`supir_rt.progress`) counting tile passes."""

    backend = "torch-tiled"

    def __init__(self, name: str, spec, vae: nn.Module, scale: float, *, tile_px: int, mode: VAETiling,
                 keep: int = 0) -> None:
        if name not in ("dr_encoder", "vae_encoder", "vae_decoder"):
            raise ValueError(f"no tiled VAE for network {name!r}")
        self.name, self.spec, self.vae, self.scale = name, spec, vae, scale
        self.tile_px, self.mode, self.keep = tile_px, mode, keep
        p = next(vae.parameters())
        self.device, self.dtype = p.device, p.dtype

    def vae_modules(self) -> tuple[nn.Module, float]:
        return self.vae, self.scale

    @torch.inference_mode()
    def infer(self, feed, *, check_inputs: bool = True):
        from supir_rt.model.vae import DiagonalGaussian
        from supir_rt.progress import phase

        if self.name == "vae_decoder":
            z = feed["latent"].to(self.device, self.dtype)
            h, w = z.shape[-2:]
            passes = decoder_passes(h, w, self.tile_px, self.mode, self.vae.decoder)
            with phase("VAE decoder tiles", total=passes, unit="tile") as p:
                image = tiled_decode(self.vae.decoder, self.vae.post_quant_conv(z / self.scale), tile_px=self.tile_px,
                                     mode=self.mode, keep=self.keep, progress=p.advance)
            return {"image": image.float()}
        image = feed["image"].to(self.device, self.dtype)
        encoder = self.vae.denoise_encoder if self.name == "dr_encoder" else self.vae.encoder
        passes = encoder_passes(image.shape[-2], image.shape[-1], self.tile_px, self.mode, encoder)
        label = "DR encoder tiles" if self.name == "dr_encoder" else "VAE encoder tiles"
        with phase(label, total=passes, unit="tile") as p:
            moments = self.vae.quant_conv(tiled_encode(encoder, image, tile_px=self.tile_px, mode=self.mode,
                                                       keep=self.keep, progress=p.advance))
        if self.name == "dr_encoder":
            return {"latent": (DiagonalGaussian.from_moments(moments).mode() * self.scale).float()}
        return {"moments": moments.float()}

    def close(self) -> None:
        pass


def torch_vae(engines) -> tuple[nn.Module, float] | None:
    """The PyTorch `AutoencoderKL` and scale factor behind the torch backend's VAE engines, or None when
    the VAE runs as an exported graph (ONNX Runtime, TensorRT), where it cannot be tiled layer by layer."""
    engine = engines.get("vae_decoder")
    return None if engine is None else engine.vae_modules()


def tiled_vae_engines(engines, *, tile_px: int, mode: VAETiling, keep: int = 0) -> dict:
    """Tiled replacements for the three VAE engines of a torch-backend engine dict."""
    found = torch_vae(engines)
    if found is None:
        raise ValueError("the tiled VAE needs the PyTorch VAE modules (backend torch); this backend runs the VAE "
                         "as one exported graph: use --vae-tiling none or --backend torch")
    vae, scale = found
    return {name: TiledVAEEngine(name, engines[name].spec, vae, scale, tile_px=tile_px, mode=mode, keep=keep)
            for name in ("dr_encoder", "vae_encoder", "vae_decoder")}


__all__ = ["TiledVAEEngine", "tiled_vae_engines", "torch_vae"]
