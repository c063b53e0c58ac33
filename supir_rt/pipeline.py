"""The SUPIR restoration pipeline: stage functions named after the algorithm, and a `Pipeline` that
only composes them. Reproduces `test.py` + `SUPIRModel.batchify_sample`.

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

import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from supir_rt.backends import NETWORKS, Engine
from supir_rt.caption import NoCaptioner, SidecarCaptioner, TextCaptioner, check_truncation, join_prompt
from supir_rt.colorfix import color_fix
from supir_rt.config import ModelConfig, VAEConfig
from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG, Network
from supir_rt.errors import SettingError, UserError
from supir_rt.model.text import size_vector
from supir_rt.model.vae import DiagonalGaussian
from supir_rt.noise import NoiseSource
from supir_rt.memory import TilingPlan, plan_tiling
from supir_rt.progress import active as active_progress
from supir_rt.progress import phase
from supir_rt.restore_config import RestoreConfig
from supir_rt.sampler import StepInfo, initial_latent, sample_dpmpp_2m_sde, sample_restore_edm
from supir_rt.schedule import dpmpp_sigmas, legacy_ddpm_sigmas, restore_sigmas
from supir_rt.tiling import ProgressFn, TileGuidedDenoiser, sample_dpmpp_2m_sde_tiled, sample_restore_edm_tiled
from supir_rt.vae_tiling import tiled_vae_engines, torch_vae

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

    Validated once: the first feed is checked against the spec (if the engine validates),
    later steps of the same sampling run change values only, so they skip the check."""
    checked = False

    def network(x_in: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor],
                control_scale: float | torch.Tensor) -> torch.Tensor:
        nonlocal checked
        cs = torch.as_tensor(control_scale, dtype=torch.float32).reshape(1)
        feed = dict(x_in=x_in, timesteps=t, context=cond["crossattn"], vector=cond["vector"],
                    lq_latent=cond["control"], control_scale=cs)
        with _validation_skipped(engine) if checked else contextlib.nullcontext():
            out = _infer(engine, **feed)
        checked = True
        return out["eps"].to(x_in.device)  # no-op (no copy) when the engine is on the latent's device

    return network


@contextlib.contextmanager
def _validation_skipped(engine: Engine):
    """The hot loop's opt-out of feed validation (engines validate by default, `EngineBase.validate`)."""
    saved = getattr(engine, "validate", None)
    if saved:
        engine.validate = False
    try:
        yield
    finally:
        if saved:
            engine.validate = saved


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
    noise: NoiseSource,
    config: RestoreConfig,
    model_config: ModelConfig,
    callback: Callable[[StepInfo], None] | None = None,
    *,
    tiling: TilingPlan | None = None,
    progress: ProgressFn | None = None,
    tile_pool: Any = None,
) -> torch.Tensor:
    """Initial noise (one draw), then the sampler ``config.sampler`` names.

    ``edm``: `sample_restore_edm` over the restore σ schedule, with linear CFG, the control-scale
    schedule, restoration guidance and churn. ``dpmpp2m-sde``: `sample_dpmpp_2m_sde` over the Karras
    schedule (`dpmpp_sigmas`), with linear CFG and a constant control scale; as in the official
    `RestoreDPMPP2MSampler`, ``x_center``, ``restore_cfg``, ``s_churn`` and the linear control scale are
    not used (`ignored_settings` names the ones a config sets to no effect).

    With a ``tiling`` plan whose sampler is tiled, the tiled twin of that sampler (`supir_rt.tiling`)
    runs over the same denoiser stack, calling ``progress(n)`` after every batch of n tiles. With a
    ``tile_pool`` (`supir_rt.tile_workers.TilePool`) the tile batches of each step run on its workers
    (the blend and the sampler update stay here).
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
    x = initial_latent(noise.randn_like(control_latent), sigmas)
    if tiling is not None and tiling.sampler_tiled:
        denoise = (TileGuidedDenoiser(network, cond, uncond, cfg, control) if tile_pool is None
                   else tile_pool.denoiser(cond, uncond, cfg, control, table))
        options = dict(lq_latent=control_latent, noise=noise.randn_like, tile=tiling.tile, stride=tiling.stride,
                       tile_batch=tiling.tile_batch, callback=callback, progress=progress)
        if dpmpp:
            return sample_dpmpp_2m_sde_tiled(denoise, x, sigmas, s_noise=config.s_noise, **options)
        return sample_restore_edm_tiled(
            denoise, x, sigmas, x_center=x_center, restore_cfg=config.restore_cfg,
            restore_cfg_s_tmin=config.restore_cfg_s_tmin, s_churn=config.s_churn, s_noise=config.s_noise, **options)
    denoiser = GuidedDenoiser(network, cond, uncond, cfg, control)
    if dpmpp:
        return sample_dpmpp_2m_sde(denoiser, x, sigmas, s_noise=config.s_noise, noise=noise.randn_like,
                                   callback=callback)
    return sample_restore_edm(
        denoiser, x, sigmas, x_center=x_center, restore_cfg=config.restore_cfg,
        restore_cfg_s_tmin=config.restore_cfg_s_tmin, s_churn=config.s_churn, s_noise=config.s_noise,
        noise=noise.randn_like, callback=callback,
    )


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


# --------------------------------------------------------------------------------------------------
# the composition
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    image: np.ndarray  # (h0, w0, 3) uint8, RGB
    sizes: Sizes
    seed: int  # the seed actually used (a random one when config.seed == -1)
    caption: str
    prompt: str
    negative_prompt: str
    config: RestoreConfig
    tiling: dict[str, Any] | None = None  # what was tiled (`TilingPlan.as_metadata`)


def resolve_seed(seed: int) -> int:
    """test.py: seed −1 means ``random.randint(0, 65535)``."""
    return random.randint(0, 65535) if seed == -1 else seed


def noise_source(seed: int, device: str) -> NoiseSource:
    """The run's `NoiseSource`, with a clear error for a noise device this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingError("noise_device", device, "not a device name; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("noise_device", device, "this machine has no CUDA GPU; use cpu")
    return NoiseSource(seed, device=dev)


class Pipeline:
    """Holds the engines, the model configuration and the tokenizer; `run` composes the stages.

    ``skip_unused_work`` (default True) skips the x_center encoder pass when restoration guidance is off;
    set it False to run it anyway (the result is bit-identical, which the tests check).
    Text embeddings are cached per prompt (`prompt_cache_size` most recent prompts).
    """

    def __init__(
        self, engines: Mapping[str, Engine], model_config: ModelConfig, *, tokenizer: Any = None,
        skip_unused_work: bool = True, prompt_cache_size: int = 16,
    ) -> None:
        missing = [n for n in NETWORKS if n not in engines]
        if missing:
            raise ValueError(f"engine dict lacks {missing}; open all five networks with supir_rt.backends.open_engines")
        if tokenizer is None:
            from supir_rt.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.engines = dict(engines)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.skip_unused_work = skip_unused_work
        self.device = torch.device(getattr(engines["unet_adaptor"], "device", "cpu"))
        self.tile_pool: Any = None  # a `supir_rt.tile_workers.TilePool`: tiled steps run on its workers
        self._prompts: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size

    def plan_tiling(self, sizes: Sizes, config: RestoreConfig) -> TilingPlan:
        """The tiling of a restore at ``sizes`` (`supir_rt.memory.plan_tiling`): raises `TilingError` for
        settings that cannot work, before any work is done."""
        unet = self.engines["unet_adaptor"]
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(getattr(unet, "dtype", torch.float32), "fp32")
        return plan_tiling(
            self.model_config, sizes.processing, tiling=config.tiling, tile_size=config.tile_size,
            tile_stride=config.tile_stride, tile_batch=config.tile_batch, vae_tile_size=config.vae_tile_size,
            vae_tiling_mode=config.vae_tiling, max_memory_gb=config.max_memory_gb, device=self.device, dtype=dtype,
            backend=getattr(unet, "backend", "torch"), vae_tiling_available=torch_vae(self.engines) is not None,
            default_tile_size=RestoreConfig.tile_size,
        )

    def embed(self, prompt: str) -> dict[str, torch.Tensor]:
        """Text conditioning of one prompt, computed once and cached."""
        if prompt in self._prompts:
            self._prompts.move_to_end(prompt)
            return self._prompts[prompt]
        emb = encode_prompt(self.engines, self.tokenizer, prompt, self.model_config, self.device)
        self._prompts[prompt] = emb
        while len(self._prompts) > self._prompt_cache_size:
            self._prompts.popitem(last=False)
        return emb

    def caption(self, image: Image.Image, config: RestoreConfig, captioner: Any, source: Path | None) -> str:
        """The caption for ``image``: from ``captioner`` on the 512-short-side stage-1 image when it needs
        pixels; text/sidecar/none captioners get the input image untouched (no extra pass)."""
        if captioner is None:
            return ""
        if captioner_needs_image(captioner):
            return captioner.caption(caption_image(self.engines, image, config.upscale, config.min_size), source=source)
        return captioner.caption(image, source=source)

    @torch.no_grad()  # not inference_mode: engines recognise unchanged inputs by their version counters
    def run(
        self,
        image: Image.Image,
        config: RestoreConfig = RestoreConfig(),
        *,
        caption: str | None = None,
        captioner: Any = None,
        source: Path | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        tiling: TilingPlan | None = None,
    ) -> RestoreResult:
        """Restore one RGB image; returns the uint8 result at upscale × input size. ``tiling``: a plan
        from `plan_tiling` (computed here when not given). Progress: the sampling phase counts tiles ×
        steps when tiled, and each tiled VAE pass is a phase of its own."""
        sizes = processing_sizes(*image.size, config.upscale, config.min_size)
        tiling = tiling or self.plan_tiling(sizes, config)
        log.info("tiling %s: %s", config.tiling, tiling.describe())
        for note in tiling.notes:
            log.info("%s", note)
        engines = self.engines
        if tiling.vae_tiled:
            engines = {**engines, **tiled_vae_engines(engines, tile_px=tiling.vae_tile_px, mode=tiling.vae_tiling,
                                                      keep=tiling.vae_keep)}
        if caption is None and captioner is not None:
            with phase("caption"):
                caption = self.caption(image, config, captioner, source)
        caption = "" if caption is None else caption
        prompt = join_prompt(caption, config.a_prompt, quality_first=config.quality_first)
        warning = check_truncation(prompt, self.tokenizer, quality_prompt=config.a_prompt or None)
        if warning:
            log.warning("%s", warning)
        ignored = ignored_settings(config)
        if ignored:
            log.warning("the %s sampler does not use %s (as in the official code): no effect",
                        config.sampler, ", ".join(ignored))
        seed = resolve_seed(config.seed)
        noise = noise_source(seed, config.noise_device)
        with phase("encode"):
            lq = preprocess(image, sizes).to(self.device)
            first = stage1(engines, lq)
            x_center = encode_x_center(
                engines, first.image, noise, self.model_config.first_stage_config.scale_factor,
                needed=needs_x_center(config) or not self.skip_unused_work,
                downsample_factor=self.model_config.first_stage_config.downsample_factor,
            )
            cond, uncond = prepare_condition(self.embed(prompt), self.embed(config.n_prompt), first.control_latent)
        if tiling.sampler_tiled:
            with phase("sampling", total=config.num_steps * tiling.tiles, unit="tile") as tiles:
                latent = sample(engines, cond, uncond, x_center, noise, config, self.model_config, callback,
                                tiling=tiling, progress=tiles.advance if active_progress() is not None else None,
                                tile_pool=self.tile_pool)
        else:
            with phase("sampling", total=config.num_steps, unit="step") as steps:
                latent = sample(engines, cond, uncond, x_center, noise, config, self.model_config,
                                _counting(steps, callback))
        with phase("decode"):
            restored = color_fix(decode(engines, latent), first.image, config.color_fix_type)
            image_out = postprocess(restored, sizes.output)
        return RestoreResult(
            image=image_out, sizes=sizes, seed=seed, caption=caption, prompt=prompt,
            negative_prompt=config.n_prompt, config=config, tiling=tiling.as_metadata(),
        )


def _counting(steps: Any, callback: Callable[[StepInfo], None] | None) -> Callable[[StepInfo], None] | None:
    """The sampler callback: ``callback`` plus one ``steps.advance()`` per step when a `Progress` is
    active. Without either, None, so that the sampler builds no per-step `StepInfo` at all."""
    if active_progress() is None:
        return callback

    def on_step(info: StepInfo) -> None:
        steps.advance()
        if callback is not None:
            callback(info)

    return on_step


def captioner_needs_image(captioner: Any) -> bool:
    """Whether a captioner looks at pixels (LLaVA) rather than text it already has (none/text/sidecar)."""
    explicit = getattr(captioner, "needs_image", None)
    if explicit is not None:
        return bool(explicit)
    return not isinstance(captioner, (NoCaptioner, SidecarCaptioner, TextCaptioner))


__all__ = [
    "CAPTION_SHORT_SIDE", "NonFiniteOutputError", "Pipeline", "RestoreResult", "SIZE_CONDITIONING", "Sizes",
    "Stage1", "caption_image", "captioner_needs_image", "decode", "encode_prompt", "encode_x_center",
    "engine_network", "ignored_settings", "needs_x_center", "noise_source", "postprocess", "prepare_condition", "preprocess", "processing_sizes",
    "resolve_seed", "sample", "snap", "stage1",
]
