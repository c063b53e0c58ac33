"""The SUPIR restoration pipeline: a `Pipeline` that composes the stage functions of `supir_rt.stages`
for a *batch* of compatible restores. A single restore is a batch of one.

Per request: preprocessing, stage 1, x_center, caption and prompts (text embeddings cached per prompt),
decode, colour fix, postprocessing. Shared by the batch: one sampler loop, whose UNet sees a batch of 2B
([uncond_1..B, cond_1..B]). Every request keeps its own `NoiseSource` (its own seed), drawn in the order of
its single run, so batching changes only the batch size the networks see (on CPU a batched convolution may
round differently from a single one; `docs/serving.md`).

Compatible (`check_batch`): equal processing size and equal values of every `RestoreConfig` field that is
not in `PER_REQUEST_FIELDS`; which requests to put together is `supir_rt.batching`'s business.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from supir_rt.backends import NETWORKS, Engine
from supir_rt.caption import check_truncation, join_prompt
from supir_rt.colorfix import color_fix
from supir_rt.config import ModelConfig
from supir_rt.backends.tiled_vae import tiled_vae_engines, torch_vae
from supir_rt.progress import active as active_progress
from supir_rt.progress import phase
from supir_rt.restore_config import PER_REQUEST_FIELDS, RestoreConfig
from supir_rt.sampler import StepInfo
from supir_rt.stages import (  # noqa: F401 - re-exported: the stages were part of this module
    CAPTION_SHORT_SIDE, SIZE_CONDITIONING, NonFiniteOutputError, Sizes, Stage1, caption_image, captioner_needs_image,
    decode, encode_prompt, encode_x_center, engine_network, ignored_settings, needs_x_center, noise_source,
    postprocess, prepare_condition, preprocess, processing_sizes, resolve_seed, sample, snap, stage1,
)
from supir_rt.tiling.policy import TilingPlan, TilingSettings, plan_tiling
from supir_rt.tiling.windows import sliding_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreResult:
    image: np.ndarray  # (h0, w0, 3) uint8, RGB
    sizes: Sizes
    seed: int  # the seed actually used (a random one when config.seed == -1)
    caption: str
    prompt: str
    negative_prompt: str
    config: RestoreConfig
    tiling: dict[str, Any] | None = None  # what was tiled (`TilingPlan.as_metadata`) + ``tile_workers`` used
    # per-tile captions (`RestoreConfig.tile_captions`): {"box": [left, top, right, bottom] px of the processing
    # size, "caption": the tile's own caption, "" where the tile used the global caption}, in window order
    tile_captions: list[dict[str, Any]] | None = None


@dataclass
class Request:
    """One restore of a batch: the RGB image, its settings, its caption (None: ask the captioner) and the
    file it came from (for sidecar captions and messages)."""

    image: Image.Image
    config: RestoreConfig
    caption: str | None = None
    source: Path | None = None


def shared_settings(config: RestoreConfig) -> tuple[tuple[str, Any], ...]:
    """The settings a batch shares: every field not in `PER_REQUEST_FIELDS` (a field added to
    `RestoreConfig` later is shared by default, so a new setting can never silently mix in a batch)."""
    return tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                 if f.name not in PER_REQUEST_FIELDS)


def check_batch(requests: Sequence[Request]) -> Sizes:
    """The common `Sizes` of a batch; ValueError when its requests cannot share a sampler loop."""
    if not requests:
        raise ValueError("a batch needs at least one request")
    sizes = [processing_sizes(*r.image.size, r.config.upscale, r.config.min_size) for r in requests]
    if len({s.processing for s in sizes}) != 1 or len({shared_settings(r.config) for r in requests}) != 1:
        raise ValueError("a batch needs requests with one processing size and equal shared settings "
                         "(supir_rt.batching.batch_key)")
    return sizes[0]


@dataclass
class _Prepared:
    """A request after everything that comes before the sampler loop."""

    sizes: Sizes
    seed: int
    noise: Any  # NoiseSource
    caption: str
    prompt: str
    stage1_image: torch.Tensor
    x_center: torch.Tensor | None
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    tile_captions: list[dict[str, Any]] | None = None  # `RestoreResult.tile_captions`
    tile_text: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] | None = None  # (cond, uncond) per tile


TILE_CAPTION_BATCH = 8  # tiles captioned per captioner call (`caption_many`)


class Pipeline:
    """Holds the engines, the model configuration and the tokenizer; `run_batch` composes the stages.

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
        self.device = torch.device(engines["unet_adaptor"].device)
        self.tile_pool: Any = None  # a `supir_rt.tile_workers.TilePool`: tiled steps run on its workers
        self._prompts: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size

    def plan_tiling(self, sizes: Sizes, config: RestoreConfig) -> TilingPlan:
        """The tiling of a restore at ``sizes`` (`supir_rt.tiling.policy.plan_tiling`): raises `TilingError` for
        settings that cannot work, before any work is done."""
        unet = self.engines["unet_adaptor"]
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(unet.dtype, "fp32")
        return plan_tiling(self.model_config, sizes.processing, TilingSettings.of(config), device=self.device,
                           dtype=dtype, backend=unet.backend, vae_tiling_available=torch_vae(self.engines) is not None)

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

    def run(
        self, image: Image.Image, config: RestoreConfig = RestoreConfig(), *, caption: str | None = None,
        captioner: Any = None, source: Path | None = None, callback: Callable[[StepInfo], None] | None = None,
        tiling: TilingPlan | None = None,
    ) -> RestoreResult:
        """Restore one RGB image: a batch of one (`run_batch`)."""
        return self.run_batch([Request(image, config, caption, source)], captioner=captioner, callback=callback,
                              tiling=tiling)[0]

    @torch.no_grad()  # not inference_mode: engines recognise unchanged inputs by their version counters
    def run_batch(
        self, requests: Sequence[Request], *, captioner: Any = None,
        callback: Callable[[StepInfo], None] | None = None, tiling: TilingPlan | None = None,
    ) -> list[RestoreResult]:
        """Restore a batch of compatible requests (`check_batch`) with one sampler loop; results in input
        order, each the uint8 image at upscale × its input size. ``tiling``: the plan from `plan_tiling`
        (computed here when not given). A batch that tiles runs its requests one after the other (the
        memory plan is per image). Progress: the sampling phase counts tiles × steps when tiled, and each
        tiled VAE pass is a phase of its own."""
        sizes = check_batch(requests)
        config = requests[0].config
        tiling = tiling or self.plan_tiling(sizes, config)
        if len(requests) > 1 and (tiling.sampler_tiled or tiling.vae_tiled):
            return [result for request in requests
                    for result in self.run_batch([request], captioner=captioner, callback=callback, tiling=tiling)]
        log.info("tiling %s: %s", config.tiling, tiling.describe())
        for note in tiling.notes:
            log.info("%s", note)
        engines = self.engines
        if tiling.vae_tiled:
            engines = {**engines, **tiled_vae_engines(engines, tile_px=tiling.vae_tile_px, mode=tiling.vae_tiling,
                                                      keep=tiling.vae_keep)}
        prepared = [self._prepare(engines, request, sizes, captioner) for request in requests]
        with phase("encode"):
            for prep, request in zip(prepared, requests):
                self._encode(engines, prep, request)
        if config.tile_captions:
            self._caption_tiles(prepared, requests, captioner, tiling)
        pool = self._tile_pool_for(sizes, tiling)  # the workers this restore starts with (some may die in it)
        tiling_meta = {**tiling.as_metadata(),
                       "tile_workers": (len(pool.alive) if pool is not None else 0) if tiling.sampler_tiled else None}
        latents = self._sample(engines, prepared, config, callback, tiling, pool)
        results = []
        with phase("decode"):
            for prep, request, latent in zip(prepared, requests, latents.split(1)):
                restored = color_fix(decode(engines, latent), prep.stage1_image, request.config.color_fix_type)
                results.append(RestoreResult(
                    image=postprocess(restored, prep.sizes.output),
                    sizes=prep.sizes, seed=prep.seed, caption=prep.caption, prompt=prep.prompt,
                    negative_prompt=request.config.n_prompt, config=request.config, tiling=tiling_meta,
                    tile_captions=prep.tile_captions))
        return results

    def _prepare(self, engines: Mapping[str, Engine], request: Request, sizes: Sizes, captioner: Any) -> _Prepared:
        """Caption, prompt and noise source of one request, with its warnings."""
        config = request.config
        caption = request.caption
        if caption is None and captioner is not None:
            with phase("caption"):
                caption = self.caption(request.image, config, captioner, request.source)
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
        own = processing_sizes(*request.image.size, config.upscale, config.min_size)
        return _Prepared(own, seed, noise_source(seed, config.noise_device), caption, prompt, None, None, {}, {})

    def _encode(self, engines: Mapping[str, Engine], prep: _Prepared, request: Request) -> None:
        """Stage 1, x_center and the conditioning of one request (its posterior draw from its own source)."""
        config = request.config
        first = stage1(engines, preprocess(request.image, prep.sizes).to(self.device))
        prep.stage1_image = first.image
        prep.x_center = encode_x_center(
            engines, first.image, prep.noise, self.model_config.first_stage_config.scale_factor,
            needed=needs_x_center(config) or not self.skip_unused_work,
            downsample_factor=self.model_config.first_stage_config.downsample_factor,
        )
        prep.cond, prep.uncond = prepare_condition(self.embed(prep.prompt), self.embed(config.n_prompt),
                                                   first.control_latent)

    def _caption_tiles(self, prepared: Sequence[_Prepared], requests: Sequence[Request], captioner: Any,
                       tiling: TilingPlan) -> None:
        """Per-tile captions (`RestoreConfig.tile_captions`): caption each sampler tile's region of the stage-1
        image, ``TILE_CAPTION_BATCH`` tiles per captioner call, and give each tile the text conditioning of its
        caption joined with the quality prompt (each distinct prompt embedded once); the negative prompt is
        shared and a tile whose caption is empty uses the global caption. A no-op, with a log note, when the
        sampler is not tiled or the captioner does not look at pixels. A tiled batch holds one request."""
        if not tiling.sampler_tiled:
            log.info("tile captions: the sampler is not tiled for this image, so one caption serves it all")
            return
        if captioner is None or not captioner_needs_image(captioner):
            log.info("tile captions: the captioner does not look at the image (use --captioner llava or hf); "
                     "every tile uses the global caption")
            return
        (prep,), (request,) = prepared, requests
        config = request.config
        factor = self.model_config.first_stage_config.downsample_factor
        windows = sliding_windows(*prep.cond["control"].shape[-2:], tiling.tile, tiling.stride)  # the sampler's
        boxes = [(left * factor, top * factor, right * factor, bottom * factor) for top, bottom, left, right in windows]
        crops = [Image.fromarray(postprocess(prep.stage1_image[..., top:bottom, left:right],
                                             (right - left, bottom - top)), "RGB")
                 for left, top, right, bottom in boxes]
        many = getattr(captioner, "caption_many", None)
        captions: list[str] = []
        with phase("tile captions", total=len(crops), unit="tile") as progress:
            for start in range(0, len(crops), TILE_CAPTION_BATCH):
                chunk = crops[start:start + TILE_CAPTION_BATCH]
                got = many(chunk) if many is not None else [captioner.caption(c, source=request.source) for c in chunk]
                captions.extend(c.strip() if isinstance(c, str) else "" for c in got)
                progress.advance(len(chunk))
        negative = self.embed(config.n_prompt)
        texts: dict[str, dict[str, torch.Tensor]] = {}
        prep.tile_text = []
        for k, caption in enumerate(captions):
            prompt = (join_prompt(caption, config.a_prompt, quality_first=config.quality_first) if caption
                      else prep.prompt)
            if prompt not in texts:
                if caption:
                    warning = check_truncation(prompt, self.tokenizer, quality_prompt=config.a_prompt or None)
                    if warning:
                        log.warning("tile %d: %s", k, warning)
                texts[prompt] = self.embed(prompt)
            prep.tile_text.append((texts[prompt], negative))
        prep.tile_captions = [{"box": list(box), "caption": caption} for box, caption in zip(boxes, captions)]
        log.info("tile captions: %d tiles, %d distinct prompts", len(captions), len(texts))

    def _tile_pool_for(self, sizes: Sizes, tiling: TilingPlan) -> Any:
        """The `tile_pool` when this restore's tiles go to it: sampler-tiled and at least the pool's
        ``min_pixels`` processing pixels (`TilePool.takes`); else None (the tiles run on this engine)."""
        pool = self.tile_pool
        if pool is None or not tiling.sampler_tiled:
            return None
        width, height = sizes.processing
        return pool if pool.takes(width * height) else None

    def _sample(self, engines: Mapping[str, Engine], prepared: Sequence[_Prepared], config: RestoreConfig,
                callback: Callable[[StepInfo], None] | None, tiling: TilingPlan, tile_pool: Any = None) -> torch.Tensor:
        """One sampler loop over the batch: conditioning stacked per sample, noise drawn per request;
        the tiles of a tiled one on ``tile_pool``'s workers when given."""
        cond = {key: torch.cat([p.cond[key] for p in prepared]) for key in prepared[0].cond}
        uncond = {key: torch.cat([p.uncond[key] for p in prepared]) for key in prepared[0].uncond}
        centers = [p.x_center for p in prepared]
        x_center = torch.cat(centers) if all(c is not None for c in centers) else None
        noises = [p.noise for p in prepared]
        if tiling.sampler_tiled:
            with phase("sampling", total=config.num_steps * tiling.tiles, unit="tile") as tiles:
                return sample(engines, cond, uncond, x_center, noises, config, self.model_config, callback,
                              tiling=tiling, progress=tiles.advance if active_progress() is not None else None,
                              tile_pool=tile_pool, tile_text=prepared[0].tile_text)
        with phase("sampling", total=config.num_steps, unit="step") as steps:
            return sample(engines, cond, uncond, x_center, noises, config, self.model_config,
                          _counting(steps, callback))


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


__all__ = ["Pipeline", "Request", "RestoreResult", "check_batch", "shared_settings"]
