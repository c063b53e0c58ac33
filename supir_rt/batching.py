"""Restore several images with one ``unet_adaptor`` call per sampler step (for servers that batch).

`Pipeline.run` restores one image: its CFG pair [uncond, cond] is a batch of 2 in the UNet. When several
requests share a processing size and the settings that the sampler loop applies to the whole batch, their
sampler loops can run as one: the UNet then sees a batch of 2B, [uncond_1..B, cond_1..B], and everything
else (stage 1, x_center, prompts, decode, colour fix) stays per request, composed from the same stage
functions as `Pipeline.run`.

Each request keeps its own `NoiseSource` (its own seed): the posterior draw, the initial noise and every
churn draw come from that request's generator, in the same order as in a single run, so a batched request
gets the noise of its single run. The only difference is the batch size the networks see; on CPU a batched
convolution may round differently from a single one (see `docs/serving.md` for the measured difference).

Compatibility (`batch_key`): equal processing size and equal values of every `RestoreConfig` field that
is not in `PER_REQUEST_FIELDS`. A field added to `RestoreConfig` later is shared by default, so a new
setting can never silently mix in a batch; `batchable` additionally refuses settings this loop does not
implement (any field outside `KNOWN_FIELDS` that is not at its default).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from supir_rt.caption import check_truncation, join_prompt
from supir_rt.colorfix import color_fix
from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG
from supir_rt.noise import NoiseSource
from supir_rt.pipeline import (
    Pipeline, RestoreResult, Sizes, decode, encode_x_center, engine_network, noise_source, postprocess,
    prepare_condition, preprocess, processing_sizes, resolve_seed, stage1,
)
from supir_rt.restore_config import RestoreConfig
from supir_rt.sampler import initial_latent, sample_restore_edm
from supir_rt.schedule import legacy_ddpm_sigmas, restore_sigmas

log = logging.getLogger(__name__)

# Settings each request may choose for itself inside one batch: they act before or after the sampler
# loop (seed, prompts, output size, colour fix) or per sample inside it.
PER_REQUEST_FIELDS = frozenset({
    "seed", "upscale", "min_size", "color_fix_type", "a_prompt", "n_prompt", "quality_first",
})
# Every field the batched loop implements; others (added later) must be at their default to batch.
KNOWN_FIELDS = PER_REQUEST_FIELDS | frozenset({
    "num_steps", "cfg_scale", "use_linear_cfg", "cfg_scale_start", "control_scale", "use_linear_control_scale",
    "control_scale_start", "restore_cfg", "restore_cfg_s_tmin", "s_churn", "s_noise", "noise_device",
})


def batchable(config: RestoreConfig) -> bool:
    """Whether ``config`` only uses settings the batched sampler loop implements."""
    return all(getattr(config, f.name) == _default(f) for f in dataclasses.fields(config) if f.name not in KNOWN_FIELDS)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def batch_key(image_size: tuple[int, int], config: RestoreConfig) -> tuple[Any, ...] | None:
    """Requests with equal keys can share a sampler loop; None when ``config`` cannot be batched."""
    if not batchable(config):
        return None
    sizes = processing_sizes(*image_size, config.upscale, config.min_size)
    shared = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                   if f.name not in PER_REQUEST_FIELDS)
    return (sizes.processing, shared)


@dataclass
class BatchItem:
    """One request: the RGB image, its settings and (optionally) its caption."""

    image: Image.Image
    config: RestoreConfig
    caption: str | None = None
    source: Path | None = None


@dataclass
class _Prepared:
    sizes: Sizes
    seed: int
    noise: NoiseSource
    caption: str
    prompt: str
    stage1_image: torch.Tensor
    x_center: torch.Tensor | None
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]


@torch.inference_mode()
def run_batch(
    pipeline: Pipeline, items: Sequence[BatchItem], *, captioner: Any = None,
) -> list[RestoreResult]:
    """Restore ``items`` (all with one `batch_key`) with a shared sampler loop; results in input order."""
    if not items:
        return []
    keys = {batch_key(item.image.size, item.config) for item in items}
    if len(keys) != 1 or None in keys:
        raise ValueError("run_batch needs items with one batch_key (equal processing size and shared settings)")
    shared = items[0].config
    # The shared loop is the untiled one: where the memory policy tiles this size, each request runs alone.
    plan = pipeline.plan_tiling(processing_sizes(*items[0].image.size, shared.upscale, shared.min_size), shared)
    if plan.sampler_tiled or plan.vae_tiled:
        return [pipeline.run(item.image, item.config, caption=item.caption, captioner=captioner, source=item.source,
                             tiling=plan) for item in items]
    prepared = [_prepare(pipeline, item, captioner) for item in items]
    latents = _sample_batch(pipeline, prepared, shared)
    results = []
    for item, prep, latent in zip(items, prepared, latents.split(1)):
        restored = color_fix(decode(pipeline.engines, latent), prep.stage1_image, item.config.color_fix_type)
        results.append(RestoreResult(
            image=postprocess(restored, prep.sizes.output), sizes=prep.sizes, seed=prep.seed, caption=prep.caption,
            prompt=prep.prompt, negative_prompt=item.config.n_prompt, config=item.config,
            tiling=plan.as_metadata(),
        ))
    return results


def _prepare(pipeline: Pipeline, item: BatchItem, captioner: Any) -> _Prepared:
    """Everything of `Pipeline.run` before the sampler loop, for one request (same order of draws)."""
    config = item.config
    sizes = processing_sizes(*item.image.size, config.upscale, config.min_size)
    caption = item.caption if item.caption is not None else pipeline.caption(item.image, config, captioner, item.source)
    prompt = join_prompt(caption, config.a_prompt, quality_first=config.quality_first)
    warning = check_truncation(prompt, pipeline.tokenizer, quality_prompt=config.a_prompt or None)
    if warning:
        log.warning("%s", warning)
    seed = resolve_seed(config.seed)
    noise = noise_source(seed, config.noise_device)
    first = stage1(pipeline.engines, preprocess(item.image, sizes).to(pipeline.device))
    x_center = encode_x_center(
        pipeline.engines, first.image, noise, pipeline.model_config.first_stage_config.scale_factor,
        needed=config.restore_cfg > 0 or not pipeline.skip_unused_work,
    )
    cond, uncond = prepare_condition(pipeline.embed(prompt), pipeline.embed(config.n_prompt), first.control_latent)
    return _Prepared(sizes, seed, noise, caption, prompt, first.image, x_center, cond, uncond)


def _sample_batch(pipeline: Pipeline, prepared: Sequence[_Prepared], config: RestoreConfig) -> torch.Tensor:
    """`pipeline.sample` over a batch: conditioning stacked per sample, noise drawn per request."""
    table = legacy_ddpm_sigmas(pipeline.model_config.denoiser_config).to(pipeline.device)
    sigmas = restore_sigmas(config.num_steps, table)
    cfg = (LinearCFG(scale=config.cfg_scale_start, scale_min=config.cfg_scale) if config.use_linear_cfg
           else LinearCFG.constant(config.cfg_scale))
    control = ControlScale(config.control_scale, config.use_linear_control_scale, config.control_scale_start)
    cond = {key: torch.cat([p.cond[key] for p in prepared]) for key in prepared[0].cond}
    uncond = {key: torch.cat([p.uncond[key] for p in prepared]) for key in prepared[0].uncond}
    network = engine_network(pipeline.engines["unet_adaptor"])
    denoiser = GuidedDenoiser(EpsDenoiser(network, table), cond, uncond, cfg, control)
    x = torch.cat([initial_latent(p.noise.randn_like(p.cond["control"]), sigmas) for p in prepared])
    x_center = (torch.cat([p.x_center for p in prepared]) if all(p.x_center is not None for p in prepared)
                else None)
    return sample_restore_edm(
        denoiser, x, sigmas, x_center=x_center, restore_cfg=config.restore_cfg,
        restore_cfg_s_tmin=config.restore_cfg_s_tmin, s_churn=config.s_churn, s_noise=config.s_noise,
        noise=_per_request_noise([p.noise for p in prepared]),
    )


def _per_request_noise(sources: Sequence[NoiseSource]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``noise(x)`` for a batch: sample i's draw comes from request i's own generator."""

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([source.randn_like(part) for source, part in zip(sources, x.split(1))])

    return noise


def group_by_key(items: Sequence[BatchItem], max_batch: int) -> list[list[int]]:
    """Indices of ``items`` grouped by `batch_key` (input order kept, at most ``max_batch`` per group);
    unbatchable items get groups of their own."""
    groups: dict[Any, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, item in enumerate(items):
        key = batch_key(item.image.size, item.config)
        if key is None:
            order.append([i])
            continue
        runs = groups.setdefault(key, [])
        if not runs or len(runs[-1]) >= max_batch:
            runs.append([])
            order.append(runs[-1])
        runs[-1].append(i)
    return order


__all__ = ["BatchItem", "KNOWN_FIELDS", "PER_REQUEST_FIELDS", "batch_key", "batchable", "group_by_key", "run_batch"]
