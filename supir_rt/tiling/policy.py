"""The memory policy: whether a restore runs tiled, from an estimate of its peak working memory.

``tiling = "auto"`` runs each part untiled while its estimated peak memory fits the budget
(``max_memory_gb``, default: the memory the device has free now, after the model is loaded,
counting PyTorch's unused cache as free: `available_memory`) and
tiled otherwise; ``"on"`` always tiles, ``"off"`` never does. The sampler (the ``unet_adaptor`` calls)
and the VAE (DR encoder, encoder, decoder) are decided separately. The choice is logged and stored in
the output's metadata.

The estimates are deliberately simple, derived from the architecture rather than measured per
device, and err on the large side:

* a UNet + adaptor call on a batch of n latents of h×w holds about ``16 × model_channels`` values per
  latent pixel per batch item (skip connections of the UNet, the adaptor's features, the transformer's
  transients) in the diffusion dtype; backends whose attention stores the tokens × tokens score
  matrix (ONNX Runtime) add ``n × heads × tokens²`` values for the 1/2-resolution transformer;
* a VAE pass holds about ``6 × ch`` float32 values per image pixel at full resolution (the largest
  level: the resblock input kept for the residual, the norm and conv outputs, the upsample), and the
  mid block ``8 × ch_mult[-1] × ch`` per latent pixel; untiled under ONNX Runtime its attention also
  stores the tokens² score matrix (the PyTorch VAE's SDPA takes a fused kernel that does not);
* tiled, the same formulas apply to one tile (with its halo) plus the whole-latent part; what is left
  of the budget keeps exact-mode VAE tiles in memory between passes (`kept_tile_bytes` each), which
  saves their recomputation without changing the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from supir_rt import cuda_runtime
from supir_rt.config import ModelConfig
from supir_rt.errors import UserError
from supir_rt.tiling import vae as vae_tiling
from supir_rt.tiling.windows import LATENT_FACTOR, plan_sampler_tiles, tiles_per_axis

log = logging.getLogger(__name__)

GiB = 1024**3
# Backends whose attention stores the full score matrix (no fused memory-efficient kernel on CPU).
MATERIALISED_ATTENTION = ("onnxruntime", "onnxruntime-cuda")


def available_memory(device: torch.device) -> int:
    """Bytes a restore may use on ``device`` now (read once per restore, by `plan_tiling`): on CUDA what
    the driver has free plus what PyTorch holds in its cache without using it (``memory_reserved −
    memory_allocated``: the previous image's activations, a CUDA-graph pool), so identical requests get
    the same budget however warm the cache is; on a CPU the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = cuda_runtime.mem_get_info(device)
        allocated, reserved = cuda_runtime.memory_stats(device)
        return free + max(reserved - allocated, 0)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def unet_bytes(config: ModelConfig, n: int, h: int, w: int, *, dtype: str, backend: str) -> int:
    """Estimated working memory of one ``unet_adaptor`` call on n latents (the CFG pair doubles n)."""
    net = config.network_config
    values = 16 * net.model_channels * h * w * n * 2
    if backend in MATERIALISED_ATTENTION:
        heads = net.model_channels * net.channel_mult[1] // net.num_head_channels
        tokens = (h // 2) * (w // 2)
        values += n * 2 * heads * tokens * tokens
    return values * _dtype_bytes(dtype)


def vae_bytes(config: ModelConfig, height: int, width: int, *, backend: str) -> int:
    """Estimated working memory of one untiled VAE pass (encoder or decoder) on a height×width image."""
    vae = config.first_stage_config
    latent = (height // LATENT_FACTOR) * (width // LATENT_FACTOR)
    values = 6 * vae.ch * height * width + 8 * vae.ch_mult[-1] * vae.ch * latent
    # The untiled mid-block attention stores the tokens x tokens scores only where the kernel does:
    # ONNX Runtime's attention. The PyTorch VAE feeds SDPA dense (B, HW, C) rows, so it takes a fused
    # kernel (CUDA: flash / memory-efficient; CPU: flash) that never holds the scores.
    if backend in MATERIALISED_ATTENTION:
        values += latent * latent
    return values * 4


def tiled_vae_bytes(config: ModelConfig, height: int, width: int, tile_px: int) -> int:
    """Estimated working memory of one exact-mode tiled VAE pass: one tile with its halo plus the
    whole-latent part (memory-efficient attention)."""
    vae = config.first_stage_config
    side = tile_px + 2 * 64  # halo: the decoder's 7 latent px (56 px) and the encoder's 48 px, rounded up
    latent = (height // LATENT_FACTOR) * (width // LATENT_FACTOR)
    return (6 * vae.ch * side * side + 8 * vae.ch_mult[-1] * vae.ch * latent) * 4


def kept_tile_bytes(config: ModelConfig, tile_px: int) -> int:
    """Memory one suspended exact-mode VAE tile holds between passes: its activation and the residual
    kept by the resblock it stopped in, about ``3 × ch`` float32 values per pixel of the tile with halo."""
    side = tile_px + 2 * 64
    return 3 * config.first_stage_config.ch * side * side * 4


@dataclass(frozen=True)
class TilingPlan:
    """What a restore will tile, and why (logged; stored in the metadata)."""

    sampler_tiled: bool
    vae_tiled: bool
    tile: tuple[int, int] = (0, 0)  # sampler tile (h, w) in latent px, when tiled
    stride: int = 0  # latent px
    tiles: int = 1  # sampler tiles per step
    tile_batch: int = 1
    vae_tile_px: int = vae_tiling.DEFAULT_VAE_TILE_PX
    vae_tiling: str = "exact"
    vae_keep: int = 0  # exact mode: tiles whose activations stay in memory between passes (speed for memory)
    budget_bytes: int = 0
    estimates: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        budget = f"budget {self.budget_bytes / GiB:.1f} GiB"
        if self.sampler_tiled:
            th, tw = self.tile
            sampler = (f"sampler tiled ({self.tiles} tiles of {tw * LATENT_FACTOR}x{th * LATENT_FACTOR} px, stride "
                       f"{self.stride * LATENT_FACTOR} px, {self.tile_batch} per call)")
        else:
            sampler = "sampler untiled"
        kept = f", {self.vae_keep} kept between passes" if self.vae_tiled and self.vae_tiling == "exact" else ""
        vae = f"VAE tiled ({self.vae_tiling}, {self.vae_tile_px} px tiles{kept})" if self.vae_tiled else "VAE untiled"
        return f"{sampler}, {vae}; {budget}"

    def as_metadata(self) -> dict[str, object]:
        return {"sampler_tiled": self.sampler_tiled, "vae_tiled": self.vae_tiled,
                "sampler_tile_px": [self.tile[1] * LATENT_FACTOR, self.tile[0] * LATENT_FACTOR] if self.sampler_tiled else None,
                "sampler_stride_px": self.stride * LATENT_FACTOR if self.sampler_tiled else None,
                "sampler_tiles": self.tiles if self.sampler_tiled else None,
                "vae_tiling": self.vae_tiling if self.vae_tiled else None,
                "vae_tiles_kept": self.vae_keep if self.vae_tiled else None,
                "budget_gib": round(self.budget_bytes / GiB, 2)}


class TilingError(UserError):
    """A tiling setting cannot work for this image or budget; the message names the option and a fix."""


@dataclass(frozen=True)
class TilingSettings:
    """The tiling settings of one restore: the tiling fields of `RestoreConfig` (same names and defaults;
    ``mode`` is its ``tiling``, ``vae_tiling_mode`` its ``vae_tiling``)."""

    mode: str = "auto"
    tile_size: int = 1024  # image px
    tile_stride: int = 512
    tile_batch: int = 1
    vae_tile_size: int = vae_tiling.DEFAULT_VAE_TILE_PX
    vae_tiling_mode: str = "exact"
    max_memory_gb: float | None = None

    @classmethod
    def of(cls, config: Any) -> TilingSettings:
        """The tiling settings of a `RestoreConfig`."""
        return cls(mode=config.tiling, tile_size=config.tile_size, tile_stride=config.tile_stride,
                   tile_batch=config.tile_batch, vae_tile_size=config.vae_tile_size,
                   vae_tiling_mode=config.vae_tiling, max_memory_gb=config.max_memory_gb)


def plan_tiling(
    config: ModelConfig, processing: tuple[int, int], settings: TilingSettings, *, device: torch.device,
    dtype: str, backend: str, vae_tiling_available: bool = True,
) -> TilingPlan:
    """Decide the tiling of one restore at ``processing`` = (W, H) px with ``settings`` on ``device``
    (``dtype`` and ``backend`` of the diffusion engine); raises `TilingError` for settings that cannot
    work (tile larger than the image, budget too small for one tile, tiled VAE unavailable)."""
    tiling, tile_size, tile_stride, tile_batch = settings.mode, settings.tile_size, settings.tile_stride, settings.tile_batch
    vae_tile_size, vae_tiling_mode, max_memory_gb = settings.vae_tile_size, settings.vae_tiling_mode, settings.max_memory_gb
    default_tile_size = TilingSettings.tile_size
    width, height = processing
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    budget = int(max_memory_gb * GiB) if max_memory_gb is not None else available_memory(device)
    tile_latent, stride = tile_size // LATENT_FACTOR, tile_stride // LATENT_FACTOR
    estimates = {
        "unet_untiled": unet_bytes(config, 1, h, w, dtype=dtype, backend=backend),
        "vae_untiled": vae_bytes(config, height, width, backend=backend),
    }
    notes: list[str] = []
    if tiling == "off":
        sampler_tiled = vae_tiled = False
    elif tiling == "on":
        sampler_tiled = vae_tiled = True
    else:
        sampler_tiled = estimates["unet_untiled"] > budget
        vae_tiled = estimates["vae_untiled"] > budget
    if vae_tiling_mode == "none":
        vae_tiled = False
    if sampler_tiled and tile_size > min(width, height):
        if default_tile_size is not None and tile_size == default_tile_size:
            notes.append(f"the default sampler tile ({tile_size} px) is clamped to the {width}x{height} px image")
        else:
            raise TilingError(
                f"--tile-size {tile_size} is larger than the {width}x{height} px processing size; use at most "
                f"{min(width, height) // 64 * 64} (a multiple of 64), or --tiling off")
    th, tw = (0, 0)
    tiles, vae_keep = 1, 0
    if sampler_tiled:
        (th, tw), stride, clamp_notes = plan_sampler_tiles(h, w, tile_latent, stride)
        notes.extend(clamp_notes)
        tiles = tiles_per_axis(h, th, stride) * tiles_per_axis(w, tw, stride)
        estimates["unet_tiled"] = unet_bytes(config, min(tile_batch, tiles), th, tw, dtype=dtype, backend=backend)
        if estimates["unet_tiled"] > budget:
            raise TilingError(
                f"one batch of {min(tile_batch, tiles)} sampler tile(s) of {tile_size} px needs about "
                f"{estimates['unet_tiled'] / GiB:.1f} GiB, more than the --max-memory budget of {budget / GiB:.1f} GiB; "
                f"lower --tile-batch to 1 or --tile-size (e.g. {max(64, tile_size // 2 // 64 * 64)}), or raise --max-memory")
    if vae_tiled:
        if not vae_tiling_available:
            raise TilingError(
                f"the tiled VAE runs the PyTorch VAE modules, and backend {backend!r} runs the VAE as one exported "
                f"graph (the untiled VAE needs about {estimates['vae_untiled'] / GiB:.1f} GiB here); use "
                "--vae-tiling none to tile only the sampler, or --backend torch")
        estimates["vae_tiled"] = tiled_vae_bytes(config, height, width, vae_tile_size)
        if estimates["vae_tiled"] > budget:
            raise TilingError(
                f"one VAE tile of {vae_tile_size} px needs about {estimates['vae_tiled'] / GiB:.1f} GiB, more than the "
                f"--max-memory budget of {budget / GiB:.1f} GiB; lower --vae-tile-size (e.g. 256) or raise --max-memory")
        if vae_tiling_mode == "exact":  # spend what is left of the budget on keeping tiles between passes
            vae_keep = int((budget - estimates["vae_tiled"]) // kept_tile_bytes(config, vae_tile_size))
    return TilingPlan(
        sampler_tiled=sampler_tiled, vae_tiled=vae_tiled, tile=(th, tw), stride=stride, tiles=tiles,
        tile_batch=tile_batch, vae_tile_px=vae_tile_size, vae_tiling=vae_tiling_mode, vae_keep=vae_keep,
        budget_bytes=budget,
        estimates=estimates, notes=tuple(notes),
    )


__all__ = ["GiB", "TilingError", "TilingPlan", "TilingSettings", "available_memory", "kept_tile_bytes", "plan_tiling", "tiled_vae_bytes", "unet_bytes",
           "vae_bytes"]
