"""`Restorer`: load SUPIR once, restore many images (from a script, a notebook or a serving process).

    from supir_rt import Restorer, RestoreConfig

    with Restorer.from_weights(sdxl="sd_xl_base_1.0_0.9vae.safetensors", supir="SUPIR-v0Q.ckpt") as r:
        r.restore_file("in.jpg", "out.png", RestoreConfig(seed=7))
        pil = r.restore(Image.open("other.png")).image

The engines (one per network, `supir_rt.backends`) are opened once; the PyTorch model is built only for
the torch backend. A `Restorer` is not thread-safe: serve one request at a time per instance (engines
own their output buffers until the next call).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from supir_rt.backends import Engine
from supir_rt.config import ModelConfig
from supir_rt.errors import UserError
from supir_rt.images import (
    DEFAULT_MAX_PIXELS, ImageError, LoadedImage, check_output_path, from_pil, load_image, save_image,
)
from supir_rt.caption import check_truncation, join_prompt
from supir_rt.errors import SetupError
from supir_rt.loading import (  # noqa: F401 - DTYPES, SDXL_FILE, SUPIR_FILES, parse_dtype, check_device: public here too
    DTYPES, SDXL_FILE, SUPIR_FILES, check_device, open_checkpoint_engines, open_exported_engines, open_tiny_engines,
    parse_dtype,
)
from supir_rt.tiling.policy import TilingError, TilingPlan
from supir_rt.pipeline import Pipeline, Request, RestoreResult
from supir_rt.progress import Progress, phase
from supir_rt.progress import active as active_progress
from supir_rt.restore_config import RestoreConfig
from supir_rt.sampler import StepInfo
from supir_rt.stages import Sizes, postprocess, preprocess, processing_sizes, stage1

log = logging.getLogger(__name__)

# Largest processing size accepted (pixels): SDXL's self-attention at this size already needs a big GPU.
DEFAULT_MAX_PROCESSING_PIXELS = 16 * 1024 * 1024


@dataclass(frozen=True)
class RestorePlan:
    """What `Restorer.plan` decided for one image and config: the sizes and the tiling."""

    sizes: Sizes
    tiling: TilingPlan


@dataclass(frozen=True)
class Restored:
    """One restored image: ``image`` is RGB or RGBA (alpha resized and reattached), plus what made it."""

    image: Image.Image
    result: RestoreResult
    metadata: dict[str, Any]


class Restorer:
    """Holds the engines and the pipeline; `restore` / `restore_file` run one image each.

    ``progress``: False (default) reports nothing; True shows a status line per phase on a terminal
    (unless the caller already activated a `supir_rt.progress.Progress`); a `Progress` instance collects
    the phase times of every call (its `summary_line`) and shows them as it is configured to."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        model_config: ModelConfig,
        *,
        captioner: Any = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_processing_pixels: int | None = DEFAULT_MAX_PROCESSING_PIXELS,
        skip_unused_work: bool = True,
        progress: bool | Progress = False,
        description: Mapping[str, Any] | None = None,
    ) -> None:
        self.engines = dict(engines)
        self.model_config = model_config
        self.pipeline = Pipeline(self.engines, model_config, skip_unused_work=skip_unused_work)
        self.captioner = captioner
        self.max_pixels = max_pixels
        self.max_processing_pixels = max_processing_pixels
        self.progress = progress
        self.description = dict(description or {})  # weights, backend, dtype: stored in outputs' metadata

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_weights(cls, sdxl: str | Path, supir: str | Path, *, device: str = "cpu", dtype: str = "fp32",
                     backend: str = "torch", engines_dir: str | Path | None = None, config: ModelConfig | None = None,
                     vae_dtype: str | None = None, offload: bool | None = None, fp8_weights: bool = False,
                     torch_options: Any = None, devices: Sequence[str] | None = None, cfg_parallel: bool = False,
                     **kwargs: Any) -> Restorer:
        """Load the official SDXL base + SUPIR-v0Q/v0F checkpoints (`loading.open_checkpoint_engines`:
        the torch backend's placement and speed options; ``devices``/``cfg_parallel``: split placement and
        CFG-parallel, docs/scale.md), or open exported engines from ``engines_dir``. ``kwargs`` go to the
        `Restorer`."""
        engines, config, desc = open_checkpoint_engines(
            sdxl, supir, device=device, dtype=dtype, backend=backend, engines_dir=engines_dir, config=config,
            vae_dtype=vae_dtype, offload=offload, fp8_weights=fp8_weights, torch_options=torch_options,
            devices=devices, cfg_parallel=cfg_parallel)
        return cls(engines, config, description=desc, **kwargs)

    @classmethod
    def from_engines(cls, engines_dir: str | Path, *, backend: str = "auto", dtype: str = "fp32",
                     config: ModelConfig | None = None, **kwargs: Any) -> Restorer:
        """Open exported engines (no PyTorch model is built; `loading.open_exported_engines`)."""
        engines, config, desc = open_exported_engines(engines_dir, backend=backend, dtype=dtype, config=config)
        return cls(engines, config, description=desc, **kwargs)

    @classmethod
    def tiny_random(cls, *, seed: int = 0, device: str = "cpu", dtype: str = "fp32", backend: str = "torch",
                    engines_dir: str | Path | None = None, vae_dtype: str | None = None, offload: bool | None = None,
                    fp8_weights: bool = False, torch_options: Any = None, devices: Sequence[str] | None = None,
                    cfg_parallel: bool = False, **kwargs: Any) -> Restorer:
        """The whole pipeline on the tiny configuration with random weights (`loading.open_tiny_engines`):
        shows it runs end to end. **The output is not a restoration**."""
        engines, config, desc = open_tiny_engines(
            seed=seed, device=device, dtype=dtype, backend=backend, engines_dir=engines_dir, vae_dtype=vae_dtype,
            offload=offload, fp8_weights=fp8_weights, torch_options=torch_options, devices=devices,
            cfg_parallel=cfg_parallel)
        return cls(engines, config, description=desc, **kwargs)

    # ------------------------------------------------------------------------------------- restoring

    def plan(self, image: Image.Image | LoadedImage, config: RestoreConfig | None = None, *,
             source: Path | None = None) -> RestorePlan:
        """Sizes and tiling of restoring ``image`` with ``config``, checked before any work: size limits
        and tiling settings raise `ImageError` here. Pass it to `restore` (nothing is planned twice; the
        device's free memory is read once, here)."""
        config = config or RestoreConfig()
        loaded = image if isinstance(image, LoadedImage) else from_pil(image)
        name = source or loaded.path or "image"
        try:
            sizes = processing_sizes(*loaded.size, config.upscale, config.min_size)
        except UserError as err:  # too small for SUPIR: name the image
            raise ImageError(f"{name}: {err}") from None
        pw, ph = sizes.processing
        if self.max_processing_pixels is not None and pw * ph > self.max_processing_pixels:
            raise ImageError(
                f"{name}: {loaded.size[0]}x{loaded.size[1]} at upscale {config.upscale} would be processed at "
                f"{pw}x{ph} px, above the limit of {self.max_processing_pixels:,} pixels; lower --upscale, "
                "downscale the input, or raise the limit (Restorer(max_processing_pixels=...))"
            )
        try:
            return RestorePlan(sizes, self.pipeline.plan_tiling(sizes, config))
        except TilingError as err:
            raise ImageError(f"{name}: {err}") from None

    def restore(
        self,
        image: Image.Image | LoadedImage | str | Path,
        config: RestoreConfig | None = None,
        *,
        caption: str | None = None,
        source: Path | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        plan: RestorePlan | None = None,
    ) -> Restored:
        """Restore one image (a PIL image, a `LoadedImage` or a path). Alpha is kept. ``plan``: from
        `plan` for this image and config (made here when not given)."""
        return self.restore_many([Request(image, config or RestoreConfig(), caption, source)], callback=callback,
                                 plan=plan)[0]

    def restore_many(self, requests: Sequence[Request], *, callback: Callable[[StepInfo], None] | None = None,
                     plan: RestorePlan | None = None) -> list[Restored]:
        """Restore a batch of compatible requests (equal processing size and shared settings:
        `supir_rt.batching.batch_key`) with one sampler loop; results in input order. ``request.image``
        may be a PIL image, a `LoadedImage` or a path; alpha is kept."""
        loaded, sources = [], []
        for request in requests:
            image, source = _load(request.image, request.source, self.max_pixels)
            for note in image.notes:
                log.info("%s: %s", source or "image", note)
            loaded.append(image)
            sources.append(source)
        plan = plan or self.plan(loaded[0], requests[0].config, source=sources[0])
        batch = [Request(image.rgb, request.config, request.caption, source)
                 for image, request, source in zip(loaded, requests, sources)]
        progress = self._progress_for_call()
        token = progress.activate() if progress is not None else None
        try:
            results = self.pipeline.run_batch(batch, captioner=self.captioner, callback=callback, tiling=plan.tiling)
        finally:
            if progress is not None:
                progress.deactivate(token)
                progress.clear()
        restored = []
        for image, result, source in zip(loaded, results, sources):
            out = Image.fromarray(result.image, "RGB")
            if image.alpha is not None:
                out.putalpha(image.alpha.resize(out.size, Image.Resampling.BICUBIC))
            restored.append(Restored(image=out, result=result, metadata=self.metadata(result, source)))
        return restored

    def caption(self, image: Image.Image | LoadedImage, config: RestoreConfig | None = None, *,
                source: Path | None = None) -> str:
        """The captioner's caption of ``image`` ("" without a captioner)."""
        loaded, source = _load(image, source, self.max_pixels)
        with torch.no_grad():
            return self.pipeline.caption(loaded.rgb, config or RestoreConfig(), self.captioner, source)

    def prompt_warnings(self, caption: str, a_prompt: str, n_prompt: str = "", *,
                        quality_first: bool = False) -> tuple[str | None, str | None]:
        """(positive, negative): what CLIP's 77-token window cuts of the joined prompt and of the negative
        prompt, or None where nothing is cut."""
        tokenizer = self.pipeline.tokenizer
        prompt = join_prompt(caption or "", a_prompt or "", quality_first=bool(quality_first))
        return (check_truncation(prompt, tokenizer, quality_prompt=a_prompt or None),
                check_truncation(n_prompt or "", tokenizer))

    @property
    def device(self) -> torch.device:
        """Where the diffusion networks run."""
        return self.pipeline.device

    def stage1_image(self, image: Image.Image | LoadedImage, config: RestoreConfig | None = None) -> Image.Image:
        """The stage-1 image (degradation-robust encoder, then the VAE decoder) at the output size: what
        the colour fix uses as reference and, at short side 512, what an image captioner looks at."""
        config = config or RestoreConfig()
        loaded = image if isinstance(image, LoadedImage) else from_pil(image)
        sizes = self.plan(loaded, config).sizes
        with torch.no_grad():
            first = stage1(self.engines, preprocess(loaded.rgb, sizes).to(self.pipeline.device))
            return Image.fromarray(postprocess(first.image, sizes.output), "RGB")

    def restore_file(
        self, input_path: str | Path, output_path: str | Path, config: RestoreConfig | None = None, *,
        caption: str | None = None, overwrite: bool = False, callback: Callable[[StepInfo], None] | None = None,
    ) -> Restored:
        """Restore ``input_path`` into ``output_path`` (format from the extension), atomically, with the
        generation parameters in the file's metadata. The input is never overwritten."""
        input_path, output_path = Path(input_path), Path(output_path)
        check_output_path(output_path, [input_path], overwrite=overwrite)
        loaded = load_image(input_path, max_pixels=self.max_pixels)
        restored = self.restore(loaded, config, caption=caption, source=input_path, callback=callback)
        rgb = restored.image.convert("RGB") if restored.image.mode == "RGBA" else restored.image
        alpha = restored.image.getchannel("A") if restored.image.mode == "RGBA" else None
        with phase("save"):
            save_image(output_path, rgb, alpha=alpha, metadata=restored.metadata, icc_profile=loaded.icc_profile)
        return restored

    def metadata(self, result: RestoreResult, source: Path | None) -> dict[str, Any]:
        """Everything needed to reproduce ``result``: settings (with the seed used), caption, runtime."""
        from supir_rt import __version__

        settings = dataclasses.asdict(result.config)
        settings["seed"] = result.seed
        return {
            "software": f"supir-rt {__version__}",
            "settings": settings,
            "caption": result.caption,
            "prompt": result.prompt,
            "negative_prompt": result.negative_prompt,
            "processing_size": list(result.sizes.processing),
            "output_size": list(result.sizes.output),
            "tiling": result.tiling,
            "tile_captions": result.tile_captions,
            "source": source.name if source is not None else None,
            "runtime": self.description,
        }

    def _progress_for_call(self) -> Progress | None:
        """The `Progress` to activate for one call: ``progress`` itself when it is one; a terminal
        status line when it is True and the caller has not activated its own; else None."""
        if isinstance(self.progress, Progress):
            return self.progress
        if self.progress and active_progress() is None:
            progress = Progress()
            return progress if progress.display else None  # nothing to show: no per-step callback
        return None

    # ------------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self.pipeline.tile_pool is not None:  # tile workers (`supir_rt.tile_workers.attach_tile_workers`)
            self.pipeline.tile_pool.close()
            self.pipeline.tile_pool = None
        for engine in self.engines.values():
            engine.close()
        if self.captioner is not None and hasattr(self.captioner, "close"):
            self.captioner.close()

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(image: Image.Image | LoadedImage | str | Path, source: Path | None,
          max_pixels: int | None) -> tuple[LoadedImage, Path | None]:
    """A request's image as a `LoadedImage`, and the file it came from."""
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels=max_pixels), Path(image)
    if isinstance(image, LoadedImage):
        return image, source or image.path
    if isinstance(image, Image.Image):
        return from_pil(image), source
    raise TypeError(f"restore() takes a PIL image, a LoadedImage or a path, got {type(image).__name__}")


__all__ = [
    "DTYPES", "Request", "RestorePlan", "Restored", "Restorer", "SDXL_FILE", "SUPIR_FILES", "SetupError",
    "check_device", "parse_dtype",
]
