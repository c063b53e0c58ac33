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
from supir_rt.errors import SettingError
from supir_rt.images import ImageError, LoadedImage
from supir_rt.restore_config import RestoreConfig
from supir_rt.runtime import RuntimeOptions
from supir_rt.sampler import StepInfo
from supir_rt.serve.protocol import Limits, RequestError, encode_png
from supir_rt.stages import NonFiniteOutputError

log = logging.getLogger(__name__)


def build_restorer(options: RuntimeOptions, limits: Limits) -> Any:
    """The `Restorer` for ``options`` with the server's image limits (`supir_rt.runtime.build_restorer`)."""
    from supir_rt import runtime

    return runtime.build_restorer(options, max_pixels=limits.max_image_pixels,
                                  max_processing_pixels=limits.max_processing_pixels)


@dataclass
class Job:
    """One accepted request: decoded image, settings, optional caption, when it was accepted."""

    image: LoadedImage
    config: RestoreConfig
    caption: str | None = None
    name: str | None = None
    accepted_at: float = field(default_factory=time.time)


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
        """One `Outcome` per job, in order. A failing request never fails the others."""
        started = time.time()
        outcomes: list[Outcome | None] = [None] * len(jobs)
        ready: list[int] = []
        plans: dict[int, RestorePlan] = {}
        for i, job in enumerate(jobs):
            try:
                plans[i] = self.check(job)
                ready.append(i)
            except RequestError as err:
                outcomes[i] = Outcome(error=err)
        items = [Request(jobs[i].image, jobs[i].config, jobs[i].caption, Path(jobs[i].name) if jobs[i].name else None)
                 for i in ready]
        for group in group_by_key(items, self.max_batch_size):
            t0 = time.perf_counter()
            results = self._run_group([items[g] for g in group], plans[ready[group[0]]])
            run_s = time.perf_counter() - t0
            steps = sum(items[g].config.num_steps for g in group)
            for g, result in zip(group, results):
                i = ready[g]
                if isinstance(result, RequestError):
                    outcomes[i] = Outcome(error=result)
                    continue
                outcome = Outcome(png=encode_png(result.image, result.metadata), metadata=result.metadata)
                outcome.queue_s = max(0.0, started - jobs[i].accepted_at)
                outcome.run_s, outcome.batch_size = run_s, len(group)
                outcome.steps_per_s = steps / run_s if run_s > 0 else 0.0
                outcomes[i] = outcome
        return [o if o is not None else Outcome(error=RequestError(500, "image", "not run", "internal"))
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

    def _run_group(self, items: Sequence[Request], plan: RestorePlan) -> list[Restored | RequestError]:
        if len(items) > 1:
            try:
                return list(self.restorer.restore_many(items, plan=plan, callback=self.on_step))
            except Exception as err:  # noqa: BLE001 - isolate the request at fault by running each alone
                log.warning("batched restore of %d requests failed (%s); running them one by one", len(items), err)
        return [self._run_one(item, plan) for item in items]

    def _run_one(self, item: Request, plan: RestorePlan) -> Restored | RequestError:
        try:
            return self.restorer.restore_many([item], plan=plan, callback=self.on_step)[0]
        except NonFiniteOutputError as err:
            return RequestError(500, "dtype", str(err), "non_finite")
        except SettingError as err:
            return RequestError(422, err.field, str(err), "invalid_setting")
        except ValueError as err:
            return RequestError(422, "settings", str(err), "invalid_setting")

    def caption(self, image: LoadedImage, config: RestoreConfig) -> str:
        if self.restorer.captioner is None:
            raise RequestError(501, "captioner", "this server runs without a captioner; start it with "
                               "--captioner llava --llava-dir DIR", "no_captioner")
        return self.restorer.caption(image, config)

    def close(self) -> None:
        self.restorer.close()


__all__ = ["Job", "Outcome", "RestoreWorker", "RuntimeOptions", "build_restorer"]
