"""The stages of a SUPIR restore, as functions named after the algorithm; `supir_rt.pipeline.Pipeline`
only composes them. Together they reproduce `test.py` + `SUPIRModel.batchify_sample`.

Stages, in order:

1. `preprocess`        PIL RGB -> (1, 3, H, W) in [-1, 1] at the processing size (upscale, min_size,
                       sides snapped to multiples of 64 with round-half-even, PIL bicubic);
2. `stage1`            degradation-robust encoder -> control latent (posterior mean × 0.13025), decoded to
                       the stage-1 image (colour-fix reference, caption source);
3. `encode_x_center`   standard encoder on the stage-1 image, posterior *sample* × 0.13025 (restoration
                       guidance's x_center). Its noise is always drawn; the encoder is skipped when the
                       result is unused (τ_r ≤ 0), which leaves the random stream unchanged;
4. `caption_image` /   the stage-1 image at short side 512 for an image captioner, only when the
   `prompt_for`        captioner needs pixels; caption + quality prompt joined as the official code does;
5. `encode_prompt`,    text encoders once per distinct prompt, fixed 1024/0/1024 size conditioning;
   `prepare_condition`
6. `sample`            restoration-guided EDM sampling over the `unet_adaptor` engine (or, with
                       ``sampler="dpmpp2m-sde"``, the few-step DPM++ 2M SDE of the Lightning config);
7. `decode`            VAE decoder, with a check for non-finite values (fp16 overflow);
8. `color_fix`         Wavelet / AdaIN / none against the stage-1 image;
9. `postprocess`       torch bicubic back to upscale × input size, truncating uint8 conversion.

All networks are reached through `Engine.infer` only (`supir_rt.backends`); nothing here knows which
backend runs them. All randomness comes from one `NoiseSource`. Each stage reports its phase
(``caption``, ``encode``, ``sampling`` with steps, ``decode``) through `supir_rt.progress.phase`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from supir_rt.backends import Engine
from supir_rt.caption import NoCaptioner, SidecarCaptioner, TextCaptioner
from supir_rt.config import ModelConfig, VAEConfig
from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG, Network
from supir_rt.errors import SettingError, UserError
from supir_rt.model.text import size_vector
from supir_rt.model.vae import DiagonalGaussian
from supir_rt.noise import NoiseSource
from supir_rt.tiling.policy import TilingPlan
from supir_rt.restore_config import RestoreConfig
from supir_rt.sampler import StepInfo, initial_latent, sample_dpmpp_2m_sde, sample_restore_edm
from supir_rt.schedule import dpmpp_sigmas, legacy_ddpm_sigmas, restore_sigmas
from supir_rt.tiling import ProgressFn, TileGrid, TiledDenoiser

log = logging.getLogger(__name__)

SNAP = 64  # test.py snaps processing sides to multiples of 64 px (8 latent px)
CAPTION_SHORT_SIDE = 512  # LLaVA sees the stage-1 image at short side 512
SIZE_CONDITIONING = ((1024, 1024), (0, 0), (1024, 1024))  # original, crop, target
_OFFICIAL_DOWNSAMPLE = VAEConfig().downsample_factor  # 8: image px per latent px of the SDXL VAE


class NonFiniteOutputError(UserError, RuntimeError):
    """The decoded image has NaN/Inf values (typically fp16 overflow); nothing is saved. A `UserError`:
    the message says which precision to choose instead."""


# --------------------------------------------------------------------------------------------------
# 1. sizes and preprocessing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """``output`` = (w0, h0), the size written out; ``processing`` = (W, H), multiples of 64."""

    output: tuple[int, int]
    processing: tuple[int, int]

    @property
    def latent(self) -> tuple[int, int]:
        """(h, w) of the latent (processing / 8)."""
        return self.processing[1] // 8, self.processing[0] // 8


def snap(value: float, unit: int = SNAP) -> int:
    """``int(np.round(value / unit)) * unit``: numpy round-half-even, as `PIL2Tensor`."""
    return int(np.round(value / unit)) * unit


def processing_sizes(
    width: int, height: int, upscale: float = 1.0, min_size: int = 1024, *, fix_resize: int | None = None
) -> Sizes:
    """`PIL2Tensor`'s size arithmetic: upscale, record the output size, scale the short side up
    to ``min_size``, optionally force the short side to ``fix_resize`` (and output at that size), snap."""
    w, h = width * upscale, height * upscale
    w0, h0 = round(w), round(h)
    if min(w, h) < min_size:
        k = min_size / min(w, h)
        w, h = w * k, h * k
    if fix_resize is not None:
        k = fix_resize / min(w, h)
        w, h = w * k, h * k
        w0, h0 = round(w), round(h)
    pw, ph = snap(w), snap(h)
    if pw < SNAP or ph < SNAP or w0 < 1 or h0 < 1:
        raise UserError(
            f"a {width}x{height} image at upscale {upscale} and min_size {min_size} would be processed at "
            f"{pw}x{ph} px; SUPIR needs at least {SNAP} px per side: raise --min-size or --upscale"
        )
    return Sizes(output=(w0, h0), processing=(pw, ph))


def preprocess(image: Image.Image, sizes: Sizes) -> torch.Tensor:
    """RGB PIL -> (1, 3, H, W) float32 in [-1, 1]: the *original* image resized straight to the
    processing size with PIL bicubic, through uint8, ``x/255·2 − 1``."""
    if image.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image, got mode {image.mode!r}; load it with supir_rt.images")
    resized = image.resize(sizes.processing, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(resized, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(torch.float32)  # (1, 3, H, W)
    return x / 255.0 * 2.0 - 1.0


def postprocess(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """`Tensor2PIL`: (1, 3, H, W) in [-1, 1] -> (h0, w0, 3) uint8. Torch bicubic (align_corners=False,
    no antialias) to ``size`` = (w0, h0), then ``x·127.5 + 127.5``, clip, and a *truncating* cast."""
    w0, h0 = size
    x = image.detach().to(torch.float32)
    if tuple(x.shape[-2:]) != (h0, w0):
        x = F.interpolate(x, size=(h0, w0), mode="bicubic", align_corners=False)
    x = (x[0].permute(1, 2, 0) * 127.5 + 127.5).cpu().numpy()  # (h0, w0, 3)
    return np.clip(x, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# engine helpers
# --------------------------------------------------------------------------------------------------


def _infer(engine: Engine, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
    """``engine.infer(feed)``. The feed holds the spec's dtypes (float32 / int64); moving it to the
    engine's device and into the backend's precision is the engine's one conversion
    (`EngineBase.conform_inputs`), so nothing is converted here."""
    return engine.infer(feed)


def engine_network(engine: Engine) -> Network:
    """The denoiser's ``network(x_in, t, cond, control_scale) -> eps`` over the ``unet_adaptor`` engine.
    The returned eps belongs to the engine; `EpsDenoiser` consumes it before the next call.

    Checked once: the first feed is checked against the spec, later steps of the same sampling run
    change values only, so they pass ``check_inputs=False``."""
    checked = False

    def network(x_in: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor],
                control_scale: float | torch.Tensor) -> torch.Tensor:
        nonlocal checked
        cs = torch.as_tensor(control_scale, dtype=torch.float32).reshape(1)
        feed = dict(x_in=x_in, timesteps=t, context=cond["crossattn"], vector=cond["vector"],
                    lq_latent=cond["control"], control_scale=cs)
        out = engine.infer(feed, check_inputs=not checked)
        checked = True
        return out["eps"].to(x_in.device)  # no-op (no copy) when the engine is on the latent's device

    return network


# --------------------------------------------------------------------------------------------------
# 2-3. stage 1 and x_center
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage1:
    control_latent: torch.Tensor  # (1, 4, h, w): 0.13025 · posterior mean of the DR encoder
    image: torch.Tensor  # (1, 3, H, W): decode of control_latent, not clamped


def stage1(engines: Mapping[str, Engine], lq: torch.Tensor) -> Stage1:
    """`encode_first_stage_with_denoise` (mean) and `decode_first_stage`: control latent + stage-1 image."""
    # copies on lq's device (a split placement runs the VAE on another GPU than the sampler)
    latent = _infer(engines["dr_encoder"], image=lq)["latent"].to(lq.device, copy=True)
    image = _infer(engines["vae_decoder"], latent=latent)["image"].to(lq.device, copy=True)
    return Stage1(control_latent=latent, image=image)


def encode_x_center(
    engines: Mapping[str, Engine], stage1_image: torch.Tensor, noise: NoiseSource, scale_factor: float,
    *, needed: bool = True, downsample_factor: int | None = None,
) -> torch.Tensor | None:
    """`encode_first_stage(x_stage1)`: posterior sample of the standard encoder × scale_factor.

    The posterior noise is drawn first (CPU generator, latent shape) in every case; when ``needed`` is
    False the encoder pass is skipped and None returned, leaving later draws unchanged.
    ``downsample_factor``: the VAE's (`VAEConfig.downsample_factor`; default the official VAE's, 8).
    """
    f = _OFFICIAL_DOWNSAMPLE if downsample_factor is None else downsample_factor
    b, _, height, width = stage1_image.shape
    shape = (b, engines["vae_encoder"].spec.output("moments").shape[1] // 2, height // f, width // f)
    if not needed:
        noise.skip_posterior(shape)
        return None
    eps = noise.posterior(shape)
    moments = _infer(engines["vae_encoder"], image=stage1_image)["moments"]
    posterior = DiagonalGaussian.from_moments(moments.to(stage1_image.device))
    if tuple(posterior.mean.shape) != shape:
        raise RuntimeError(f"vae_encoder returned moments {tuple(moments.shape)}, expected a latent of {shape}")
    return posterior.sample(eps) * scale_factor


def caption_image(engines: Mapping[str, Engine], image: Image.Image, upscale: float, min_size: int) -> Image.Image:
    """the stage-1 image at short side 512 that the official code gives LLaVA (a separate
    DR-encoder + decoder pass at that resolution, then `Tensor2PIL` to the rounded 512-short-side size)."""
    sizes = processing_sizes(*image.size, upscale, min_size, fix_resize=CAPTION_SHORT_SIDE)
    first = stage1(engines, preprocess(image, sizes))
    return Image.fromarray(postprocess(first.image, sizes.output), "RGB")


# --------------------------------------------------------------------------------------------------
# 4-5. prompt and conditioning
# --------------------------------------------------------------------------------------------------


def encode_prompt(
    engines: Mapping[str, Engine], tokenizer: Any, prompt: str, config: ModelConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """One prompt -> {"crossattn": (1, 77, ctx), "vector": (1, adm)} with the fixed size conditioning."""
    cc = config.conditioner_config
    ids_l = tokenizer([prompt], pad_token=cc.clip_l_pad_token, context_length=cc.clip_l.context_length)
    ids_g = tokenizer([prompt], pad_token=cc.bigg_pad_token, context_length=cc.bigg.context_length)
    out = _infer(engines["text_encoders"], clip_l_ids=ids_l, bigg_ids=ids_g)
    # outputs are the spec's float32 and belong to the engine: one copy each, onto the pipeline's device
    crossattn = out["crossattn"].to(device, copy=True)
    pooled = out["pooled"].to(device, copy=True)
    original, crop, target = SIZE_CONDITIONING
    vector = size_vector(pooled, cc.size_embed_dim, original, crop, target)
    return {"crossattn": crossattn, "vector": vector}


def prepare_condition(
    positive: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor], control_latent: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(c, uc): text embeddings of the positive / negative prompt, both with ``control`` = the LQ latent."""
    cond = {"crossattn": positive["crossattn"], "vector": positive["vector"], "control": control_latent}
    uncond = {"crossattn": negative["crossattn"], "vector": negative["vector"], "control": control_latent}
    return cond, uncond


# --------------------------------------------------------------------------------------------------
# 6-8. sampling, decoding, colour fix
# --------------------------------------------------------------------------------------------------


def sample(
    engines: Mapping[str, Engine],
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    x_center: torch.Tensor | None,
    noise: NoiseSource | Sequence[NoiseSource],
    config: RestoreConfig,
    model_config: ModelConfig,
    callback: Callable[[StepInfo], None] | None = None,
    *,
    tiling: TilingPlan | None = None,
    progress: ProgressFn | None = None,
    tile_pool: Any = None,
    tile_text: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]] | None = None,
) -> torch.Tensor:
    """Initial noise (one draw per request), then the sampler ``config.sampler`` names, for a batch of B
    restores: ``cond`` / ``uncond`` / ``x_center`` hold B samples and ``noise`` one `NoiseSource` per
    request (or one source for B = 1); every draw of sample i comes from request i's own source, in the
    order of a single run, so a batched request gets the noise of its single run.

    ``edm``: `sample_restore_edm` over the restore σ schedule, with linear CFG, the control-scale
    schedule, restoration guidance and churn. ``dpmpp2m-sde``: `sample_dpmpp_2m_sde` over the Karras
    schedule (`dpmpp_sigmas`), with linear CFG and a constant control scale; as in the official
    `RestoreDPMPP2MSampler`, ``x_center``, ``restore_cfg``, ``s_churn`` and the linear control scale are
    not used (`ignored_settings` names the ones a config sets to no effect).

    With a ``tiling`` plan whose sampler is tiled, the same sampler runs over a `TiledDenoiser`
    (`supir_rt.tiling`), which calls ``progress(n)`` after every batch of n tiles; the EDM sampler then
    draws its churn noise every step, as the official tiled sampler does. With a ``tile_pool``
    (`supir_rt.tile_workers.TilePool`) its tile batches run on the pool's workers; the blend and the
    sampler update stay here. ``tile_text`` (per-tile captions, one restore): the (cond, uncond) text
    conditioning of each tile in window order, used instead of ``cond`` / ``uncond``'s text.
    """
    control_latent = cond["control"]
    table = legacy_ddpm_sigmas(model_config.denoiser_config).to(control_latent.device)
    cfg = (LinearCFG(scale=config.cfg_scale_start, scale_min=config.cfg_scale) if config.use_linear_cfg
           else LinearCFG.constant(config.cfg_scale))
    network = EpsDenoiser(engine_network(engines["unet_adaptor"]), table)
    dpmpp = config.sampler == "dpmpp2m-sde"
    sigmas = dpmpp_sigmas(config.num_steps, table) if dpmpp else restore_sigmas(config.num_steps, table)
    control = (ControlScale(config.control_scale) if dpmpp else
               ControlScale(config.control_scale, config.use_linear_control_scale, config.control_scale_start))
    sources = [noise] if isinstance(noise, NoiseSource) else list(noise)
    if len(sources) != control_latent.shape[0]:
        raise ValueError(f"{len(sources)} noise sources for a batch of {control_latent.shape[0]}")
    x = torch.cat([initial_latent(src.randn_like(lq), sigmas) for src, lq in zip(sources, control_latent.split(1))])
    draw = sources[0].randn_like if len(sources) == 1 else per_request_noise(sources)
    tiled = tiling is not None and tiling.sampler_tiled
    if tiled:
        grid = TileGrid.build(*control_latent.shape[-2:], tiling.tile, tiling.stride, control_latent.device)
        if tile_text is not None and len(tile_text) != len(grid.windows):
            raise ValueError(f"{len(tile_text)} tile conditionings for {len(grid.windows)} tiles")
        denoiser = TiledDenoiser(network, cond, uncond, cfg, control, grid, tile_batch=tiling.tile_batch,
                                 progress=progress, runner=tile_pool,
                                 conditioning=None if tile_text is None else lambda k, _window: tile_text[k])
    else:
        denoiser = GuidedDenoiser(network, cond, uncond, cfg, control)
    if dpmpp:
        return sample_dpmpp_2m_sde(denoiser, x, sigmas, s_noise=config.s_noise, noise=draw, callback=callback)
    return sample_restore_edm(
        denoiser, x, sigmas, x_center=x_center, restore_cfg=config.restore_cfg,
        restore_cfg_s_tmin=config.restore_cfg_s_tmin, s_churn=config.s_churn, s_noise=config.s_noise,
        noise=draw, noise_every_step=tiled, callback=callback,
    )


def per_request_noise(sources: Sequence[NoiseSource]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``noise(x)`` for a batch: sample i's draw comes from request i's own generator."""

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([source.randn_like(part) for source, part in zip(sources, x.split(1))])

    return noise


def ignored_settings(config: RestoreConfig) -> list[str]:
    """Fields ``config`` sets that its sampler does not use (the DPM++ sampler ignores restoration
    guidance, churn and the linear control scale), for a warning."""
    if config.sampler != "dpmpp2m-sde":
        return []
    ignored = []
    if config.restore_cfg > 0:
        ignored.append("restore_cfg")
    if config.use_linear_control_scale:
        ignored.append("use_linear_control_scale")
    return ignored


def needs_x_center(config: RestoreConfig) -> bool:
    """Whether the sampler reads ``x_center``: restoration guidance on, with the EDM sampler."""
    return config.sampler == "edm" and config.restore_cfg > 0


def decode(engines: Mapping[str, Engine], latent: torch.Tensor) -> torch.Tensor:
    """`decode_first_stage`: scaled latent -> image (not clamped). Non-finite values raise."""
    image = _infer(engines["vae_decoder"], latent=latent)["image"].to(latent.device, copy=True)
    bad = int((~torch.isfinite(image)).sum())
    if bad or not torch.isfinite(latent).all():
        raise NonFiniteOutputError(
            f"the restored image contains {bad or 'some'} NaN/Inf values (the sampled latent "
            f"{'is' if not torch.isfinite(latent).all() else 'is not'} finite): the diffusion networks overflowed, "
            "which happens in fp16. Nothing was saved; run again with --dtype fp32 or --dtype bf16"
        )
    return image


def resolve_seed(seed: int) -> int:
    """test.py: seed −1 means ``random.randint(0, 65535)``."""
    return random.randint(0, 65535) if seed == -1 else seed


def noise_source(seed: int, device: str) -> NoiseSource:
    """The run's `NoiseSource`, with a clear error for a noise device this machine does not have."""
    from supir_rt import cuda_runtime

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingError("noise_device", device, "not a device name; use cpu or cuda") from None
    if dev.type == "cuda" and not cuda_runtime.is_available():
        raise SettingError("noise_device", device, "this machine has no CUDA GPU; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= cuda_runtime.device_count():
        raise SettingError("noise_device", device, f"this machine has {cuda_runtime.device_count()} CUDA GPU(s); "
                           "use cuda (the current one) or cpu")
    return NoiseSource(seed, device=cuda_runtime.normalize_device(dev))


def captioner_needs_image(captioner: Any) -> bool:
    """Whether a captioner looks at pixels (LLaVA) rather than text it already has (none/text/sidecar)."""
    explicit = getattr(captioner, "needs_image", None)
    if explicit is not None:
        return bool(explicit)
    return not isinstance(captioner, (NoCaptioner, SidecarCaptioner, TextCaptioner))


__all__ = [
    "CAPTION_SHORT_SIDE", "NonFiniteOutputError", "SIZE_CONDITIONING", "Sizes", "Stage1", "caption_image",
    "captioner_needs_image", "decode", "encode_prompt", "encode_x_center", "engine_network", "ignored_settings",
    "needs_x_center", "noise_source", "per_request_noise", "postprocess", "prepare_condition", "preprocess",
    "processing_sizes", "resolve_seed", "sample", "snap", "stage1",
]
