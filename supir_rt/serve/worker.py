"""`RestoreWorker`: one loaded `Restorer` that answers lists of requests, batching the compatible ones.

The same worker runs inside a Ray Serve replica, a Triton Python-backend model instance and a PyTriton
callable. It is not thread-safe (neither is `Restorer`): each server gives it one list at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from supir_rt.batching import BatchItem, group_by_key, run_batch
from supir_rt.errors import SettingError, UserError
from supir_rt.images import ImageError, LoadedImage
from supir_rt.pipeline import NonFiniteOutputError, RestoreResult
from supir_rt.restore_config import RestoreConfig
from supir_rt.serve.protocol import Limits, RequestError, encode_png, processing_pixels_limit

log = logging.getLogger(__name__)


def as_request_error(err: BaseException) -> RequestError:
    """The `RequestError` a client sees for ``err``: a `RequestError` as is; a bad setting 422 naming its
    field; a non-finite result 500 ``non_finite``; anything else 500 ``internal`` with the exception's type
    only (the traceback goes to the server log, never to a client: it holds install paths)."""
    if isinstance(err, RequestError):
        return err
    if isinstance(err, SettingError):
        return RequestError(422, err.field, str(err), "invalid_setting")
    if isinstance(err, ImageError):
        return RequestError(413, "upscale", str(err), "too_large")
    if isinstance(err, NonFiniteOutputError):
        return RequestError(500, "dtype", str(err), "non_finite")
    if isinstance(err, UserError):
        return RequestError(422, "settings", str(err), "invalid_setting")
    log.error("request failed", exc_info=err)
    return RequestError(500, "server", f"internal error ({type(err).__name__}); see the server log", "internal")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a replica loads the runtime (the `supir-rt restore` runtime flags, as data that pickles)."""

    tiny_random: bool = False
    sdxl: str | None = None
    supir: str | None = None
    engines_dir: str | None = None
    backend: str = "auto"
    device: str | None = None  # None: cuda when the replica sees a GPU, else cpu
    dtype: str | None = None  # None: fp16 on cuda, fp32 on cpu
    captioner: str = "none"  # none | llava
    llava_dir: str | None = None

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def build_restorer(options: RuntimeOptions, limits: Limits) -> Any:
    """The `Restorer` for ``options`` (engines opened once; call from the process that serves)."""
    import torch

    from supir_rt.api import Restorer, SetupError

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = options.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    kwargs: dict[str, Any] = {"max_pixels": limits.max_image_pixels,
                              "max_processing_pixels": processing_pixels_limit(limits, device)}
    if options.captioner == "llava":
        from supir_rt.caption import make_captioner

        kwargs["captioner"] = make_captioner("llava", model_dir=options.llava_dir)
    elif options.captioner != "none":
        raise SetupError(f"captioner {options.captioner!r}: a server runs none or llava")
    if options.tiny_random:
        return Restorer.tiny_random(device=device, dtype=dtype, backend=options.backend,
                                    engines_dir=options.engines_dir, **kwargs)
    if options.engines_dir and options.backend != "torch":
        return Restorer.from_engines(options.engines_dir, backend=options.backend, dtype=dtype, **kwargs)
    if not (options.sdxl and options.supir):
        raise SetupError("the server needs the weights: pass --sdxl and --supir (paths every replica can read), "
                         "or --engines-dir, or --tiny-random")
    return Restorer.from_weights(options.sdxl, options.supir, device=device, dtype=dtype, backend=options.backend,
                                 engines_dir=options.engines_dir, **kwargs)


@dataclass
class Job:
    """One accepted request: decoded image, settings, optional caption, when it was accepted.

    ``deadline`` (a `time.time()` value) and ``cancelled`` (set by the server when the client went away)
    stop the work between two sampler steps: nobody waits for the answer any more."""

    image: LoadedImage
    config: RestoreConfig
    caption: str | None = None
    name: str | None = None
    accepted_at: float = field(default_factory=time.time)
    deadline: float | None = None
    cancelled: bool = False

    def check_alive(self) -> None:
        """Raise the `RequestError` that ends this job when it was cancelled or its deadline passed."""
        if self.cancelled:
            raise RequestError(499, "request", "the client closed the request; its work was stopped", "cancelled")
        if self.deadline is not None and time.time() > self.deadline:
            raise RequestError(504, "request_timeout_s", "the request passed this server's time limit; its work "
                               "was stopped", "timeout")


@dataclass
class Outcome:
    """A finished request: PNG bytes + metadata, or the error; timings in seconds."""

    png: bytes | None = None
    metadata: dict[str, Any] | None = None
    error: RequestError | None = None
    queue_s: float = 0.0
    run_s: float = 0.0
    batch_size: int = 1
    steps_per_s: float = 0.0


class RestoreWorker:
    """Loads the runtime once; `run` restores a list of jobs, sharing the sampler loop where it can."""

    def __init__(self, options: RuntimeOptions, limits: Limits = Limits(), *, max_batch_size: int = 4) -> None:
        self.options, self.limits, self.max_batch_size = options, limits, max_batch_size
        self.restorer = build_restorer(options, limits)

    @property
    def device(self) -> str:
        return str(self.restorer.pipeline.device)

    def info(self) -> dict[str, Any]:
        from supir_rt import __version__

        return {"runtime": self.restorer.description, "device": self.device, "supir_rt": __version__,
                "max_batch_size": self.max_batch_size, "captioner": self.options.captioner, "pid": os.getpid()}

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """One `Outcome` per job, in order. A failing request never fails the others: every failure,
        expected or not, becomes that request's `RequestError` (a message without traceback or path)."""
        started = time.time()
        outcomes: list[Outcome | None] = [None] * len(jobs)
        ready: list[int] = []
        for i, job in enumerate(jobs):
            try:
                self.check(job)
                ready.append(i)
            except Exception as err:  # noqa: BLE001 - this request alone fails
                outcomes[i] = Outcome(error=as_request_error(err))
        items = [BatchItem(jobs[i].image.rgb, jobs[i].config, jobs[i].caption,
                           Path(jobs[i].name) if jobs[i].name else None) for i in ready]
        for group in group_by_key(items, self.max_batch_size):
            t0 = time.perf_counter()
            results = self._run_group([items[g] for g in group], [jobs[ready[g]] for g in group])
            run_s = time.perf_counter() - t0
            steps = sum(items[g].config.num_steps for g in group)
            for g, result in zip(group, results):
                i = ready[g]
                if isinstance(result, RequestError):
                    outcomes[i] = Outcome(error=result)
                    continue
                try:
                    outcome = self._encode(jobs[i], result)
                except Exception as err:  # noqa: BLE001
                    outcomes[i] = Outcome(error=as_request_error(err))
                    continue
                outcome.queue_s = max(0.0, started - jobs[i].accepted_at)
                outcome.run_s, outcome.batch_size = run_s, len(group)
                outcome.steps_per_s = steps / run_s if run_s > 0 else 0.0
                outcomes[i] = outcome
        return [o if o is not None else Outcome(error=RequestError(500, "server", "not run", "internal"))
                for o in outcomes]

    def check(self, job: Job) -> None:
        """The per-request checks that need the runtime (processing size, noise device)."""
        try:
            self.restorer._check_size(job.image, job.config, Path(job.name) if job.name else None)
        except ImageError as err:
            raise RequestError(413, "upscale", str(err), "too_large") from None
        if job.config.noise_device.startswith("cuda") and not self.device.startswith("cuda"):
            raise RequestError(422, "noise_device", f"noise_device={job.config.noise_device!r}: this server runs on "
                               f"{self.device}; use cpu", "invalid_setting")

    def _run_group(self, items: Sequence[BatchItem], jobs: Sequence[Job]) -> list[RestoreResult | RequestError]:
        """Compatible requests through the shared sampler loop; a request cancelled or past its deadline is
        not started. The shared loop has no step callback: it stops its requests only between batches,
        a request alone stops between two sampler steps."""
        results: list[RestoreResult | RequestError | None] = [None] * len(items)
        live = []
        for i, job in enumerate(jobs):
            try:
                job.check_alive()
                live.append(i)
            except RequestError as err:
                results[i] = err
        if len(live) > 1:
            try:
                batch = run_batch(self.restorer.pipeline, [items[i] for i in live], captioner=self.restorer.captioner)
                for i, result in zip(live, batch):
                    results[i] = result
                live = []
            except Exception as err:  # noqa: BLE001 - isolate the request at fault by running each alone
                log.warning("batched restore of %d requests failed (%s); running them one by one", len(live), err)
        for i in live:
            results[i] = self._run_one(items[i], jobs[i])
        return results  # type: ignore[return-value]

    def _run_one(self, item: BatchItem, job: Job) -> RestoreResult | RequestError:
        try:
            job.check_alive()
            return self.restorer.pipeline.run(item.image, item.config, caption=item.caption,
                                              captioner=self.restorer.captioner, source=item.source,
                                              callback=lambda _step: job.check_alive())
        except Exception as err:  # noqa: BLE001 - this request alone fails
            return as_request_error(err)

    def _encode(self, job: Job, result: RestoreResult) -> Outcome:
        image = Image.fromarray(result.image, "RGB")
        if job.image.alpha is not None:
            image.putalpha(job.image.alpha.resize(image.size, Image.Resampling.BICUBIC))
        metadata = self.restorer.metadata(result, Path(job.name) if job.name else None)
        return Outcome(png=encode_png(image, metadata), metadata=metadata)

    def caption(self, image: LoadedImage, config: RestoreConfig) -> str:
        if self.restorer.captioner is None:
            raise RequestError(501, "captioner", "this server runs without a captioner; start it with "
                               "--captioner llava --llava-dir DIR", "no_captioner")
        return self.restorer.pipeline.caption(image.rgb, config, self.restorer.captioner, None)

    def close(self) -> None:
        self.restorer.close()


__all__ = ["Job", "Outcome", "RestoreWorker", "RuntimeOptions", "as_request_error", "build_restorer"]
