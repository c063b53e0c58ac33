"""`RestoreWorker`: one loaded `Restorer` that answers lists of requests, batching the compatible ones.

The same worker runs inside a Ray Serve replica, a Triton Python-backend model instance and a PyTriton
callable. It is not thread-safe (neither is `Restorer`): each server gives it one list at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supir_rt.api import Request, Restored, RestorePlan
from supir_rt.batching import group_by_key
from supir_rt.errors import SettingError, UserError
from supir_rt.images import ImageError, LoadedImage
from supir_rt.restore_config import RestoreConfig
from supir_rt.runtime import RuntimeOptions
from supir_rt.sampler import StepInfo
from supir_rt.serve.protocol import Limits, RequestError, encode_png, processing_pixels_limit
from supir_rt.stages import NonFiniteOutputError

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


def build_restorer(options: RuntimeOptions, limits: Limits) -> Any:
    """The `Restorer` for ``options`` with the server's image limits (`supir_rt.runtime.build_restorer`);
    the processing-size limit defaults by device (`processing_pixels_limit`)."""
    from supir_rt import cuda_runtime, runtime

    device = options.device or ("cuda" if cuda_runtime.is_available() else "cpu")
    return runtime.build_restorer(options, max_pixels=limits.max_image_pixels,
                                  max_processing_pixels=processing_pixels_limit(limits, device))


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

    def __init__(self, options: RuntimeOptions, limits: Limits = Limits(), *, max_batch_size: int = 4,
                 restorer: Any = None, on_step: Callable[[StepInfo], None] | None = None) -> None:
        """``restorer``: an already loaded `Restorer` to serve (default: load one from ``options``);
        ``on_step``: called after every sampler step of every batch (a liveness signal for the server)."""
        self.options, self.limits, self.max_batch_size = options, limits, max_batch_size
        self.restorer = restorer if restorer is not None else build_restorer(options, limits)
        self.on_step = on_step

    @property
    def device(self) -> str:
        return str(self.restorer.device)

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
        plans: dict[int, RestorePlan] = {}
        for i, job in enumerate(jobs):
            try:
                plans[i] = self.check(job)
                ready.append(i)
            except Exception as err:  # noqa: BLE001 - this request alone fails
                outcomes[i] = Outcome(error=as_request_error(err))
        items = [Request(jobs[i].image, jobs[i].config, jobs[i].caption, Path(jobs[i].name) if jobs[i].name else None)
                 for i in ready]
        for group in group_by_key(items, self.max_batch_size):
            t0 = time.perf_counter()
            results = self._run_group([items[g] for g in group], plans[ready[group[0]]],
                                      [jobs[ready[g]] for g in group])
            run_s = time.perf_counter() - t0
            steps = sum(items[g].config.num_steps for g in group)
            for g, result in zip(group, results):
                i = ready[g]
                if isinstance(result, RequestError):
                    outcomes[i] = Outcome(error=result)
                    continue
                try:
                    outcome = Outcome(png=encode_png(result.image, result.metadata), metadata=result.metadata)
                except Exception as err:  # noqa: BLE001
                    outcomes[i] = Outcome(error=as_request_error(err))
                    continue
                outcome.queue_s = max(0.0, started - jobs[i].accepted_at)
                outcome.run_s, outcome.batch_size = run_s, len(group)
                outcome.steps_per_s = steps / run_s if run_s > 0 else 0.0
                outcomes[i] = outcome
        return [o if o is not None else Outcome(error=RequestError(500, "server", "not run", "internal"))
                for o in outcomes]

    def check(self, job: Job) -> RestorePlan:
        """The per-request checks that need the runtime (processing size, tiling, noise device); returns
        the request's plan (sizes and tiling), which the restore then uses as it is."""
        try:
            plan = self.restorer.plan(job.image, job.config, source=Path(job.name) if job.name else None)
        except ImageError as err:
            raise RequestError(413, "upscale", str(err), "too_large") from None
        if job.config.noise_device.startswith("cuda") and not self.device.startswith("cuda"):
            raise RequestError(422, "noise_device", f"noise_device={job.config.noise_device!r}: this server runs on "
                               f"{self.device}; use cpu", "invalid_setting")
        return plan

    def _run_group(self, items: Sequence[Request], plan: RestorePlan,
                   jobs: Sequence[Job]) -> list[Restored | RequestError]:
        """Compatible requests through one sampler loop; a request cancelled or past its deadline is not
        started. The shared loop stops between two steps once none of its requests is alive any more; a
        request alone stops between two steps as soon as it is dead."""
        results: list[Restored | RequestError | None] = [None] * len(items)
        live = []
        for i, job in enumerate(jobs):
            try:
                job.check_alive()
                live.append(i)
            except RequestError as err:
                results[i] = err
        if len(live) > 1:
            try:
                batch = self.restorer.restore_many([items[i] for i in live], plan=plan,
                                                   callback=self._step_hook([jobs[i] for i in live]))
                for i, result in zip(live, batch):
                    results[i] = result
                live = []
            except Exception as err:  # noqa: BLE001 - isolate the request at fault by running each alone
                log.warning("batched restore of %d requests failed (%s); running them one by one", len(live), err)
        for i in live:
            results[i] = self._run_one(items[i], plan, jobs[i])
        return results  # type: ignore[return-value]

    def _step_hook(self, jobs: Sequence[Job]) -> Callable[[StepInfo], None]:
        """The sampler callback of a group: the server's liveness signal, then stop when no job is alive."""
        def on_step(info: StepInfo) -> None:
            if self.on_step is not None:
                self.on_step(info)
            errors = []
            for job in jobs:
                try:
                    job.check_alive()
                    return
                except RequestError as err:
                    errors.append(err)
            raise errors[0]

        return on_step

    def _run_one(self, item: Request, plan: RestorePlan, job: Job) -> Restored | RequestError:
        try:
            job.check_alive()
            return self.restorer.restore_many([item], plan=plan, callback=self._step_hook([job]))[0]
        except Exception as err:  # noqa: BLE001 - this request alone fails
            return as_request_error(err)

    def caption(self, image: LoadedImage, config: RestoreConfig) -> str:
        if self.restorer.captioner is None:
            raise RequestError(501, "captioner", "this server runs without a captioner; start it with "
                               "--captioner llava --llava-dir DIR", "no_captioner")
        return self.restorer.caption(image, config)

    def close(self) -> None:
        self.restorer.close()


__all__ = ["Job", "Outcome", "RestoreWorker", "RuntimeOptions", "as_request_error", "build_restorer"]
