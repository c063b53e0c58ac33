"""The Ray Serve application: a FastAPI ingress in front of a `Restorer` deployment.

Two deployments:

* ``SupirRestorer``: one `RestoreWorker` per replica (engines loaded once, in the constructor; one GPU
  per replica where there are GPUs, CPU or fractional otherwise). Compatible requests are collected by
  ``serve.batch`` (``max_batch_size``, a ``batch_wait_s`` wait) and share one ``unet_adaptor`` call per
  sampler step. ``max_ongoing_requests`` bounds the requests inside one replica, ``max_queued_requests``
  the requests waiting for a replica; above that the ingress answers 503 with ``Retry-After``.
* ``SupirAPI``: the HTTP API (``/v1/restore``, ``/v1/caption``, ``/v1/health``, ``/v1/info``). It checks
  the body size, the image and the settings before any model time is spent, applies the per-request
  timeout, retries a request once when the replica running it dies (restores are deterministic), and
  records the metrics.

`build_app(args)` is the application builder: ``supir-rt serve`` calls it, and a Ray Serve config file
names it (``import_path: supir_rt.serve.ray_app:build_app``) with the same ``args``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from supir_rt.serve.app_config import APP_NAME, AppConfig
from supir_rt.serve.lifecycle import API_CPUS, replica_cpus
from supir_rt.serve.protocol import Limits, RequestError, decode_image, parse_settings
from supir_rt.serve.worker import Job, Outcome, RestoreWorker, RuntimeOptions

log = logging.getLogger("supir_rt.serve")

LATENCY_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]


# --------------------------------------------------------------------------------------------------
# the model deployment
# --------------------------------------------------------------------------------------------------


@serve.deployment(name="SupirRestorer", health_check_period_s=10)
class RestorerDeployment:
    """One `RestoreWorker` per replica; requests arrive one by one and leave ``serve.batch`` in lists."""

    def __init__(self, runtime: dict[str, Any], limits: dict[str, Any], max_batch_size: int, batch_wait_s: float) -> None:
        from ray.serve import metrics

        self.worker = RestoreWorker(RuntimeOptions(**runtime), Limits(**limits), max_batch_size=max_batch_size)
        self.restore_batch.set_max_batch_size(max_batch_size)
        self.restore_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.lock = threading.Lock()  # the worker runs one list at a time (captions share it)
        self.queue_time = metrics.Histogram("supir_queue_seconds", description="from acceptance to the start of "
                                            "the engine work", boundaries=LATENCY_BUCKETS)
        self.run_time = metrics.Histogram("supir_run_seconds", description="engine time of one batch",
                                          boundaries=LATENCY_BUCKETS, tag_keys=("batch_size",))
        self.steps_rate = metrics.Gauge("supir_steps_per_second", description="sampler steps per second of the "
                                        "last batch (all its requests)")
        self.batch_size = metrics.Histogram("supir_batch_size", description="requests per engine batch",
                                            boundaries=[1, 2, 3, 4, 6, 8, 12, 16])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def restore_batch(self, jobs: list[Job]) -> list[Outcome]:
        return await asyncio.to_thread(self._run, jobs)

    def _run(self, jobs: list[Job]) -> list[Outcome]:
        with self.lock:
            outcomes = self.worker.run(jobs)
        done = [o for o in outcomes if o.error is None]
        for o in done:
            self.queue_time.observe(o.queue_s)
        if done:
            self.run_time.observe(done[0].run_s, tags={"batch_size": str(done[0].batch_size)})
            self.steps_rate.set(done[0].steps_per_s)
            self.batch_size.observe(len(done))
        return outcomes

    async def restore(self, job: Job) -> Outcome:
        try:
            return await self.restore_batch(job)
        except asyncio.CancelledError:  # the client left or the API's timeout passed: stop at the next step
            job.cancelled = True
            raise

    async def caption(self, job: Job) -> str | RequestError:
        def run() -> str | RequestError:
            with self.lock:
                try:
                    return self.worker.caption(job.image, job.config)
                except RequestError as err:
                    return err
        return await asyncio.to_thread(run)

    def info(self) -> dict[str, Any]:
        return self.worker.info()

    def check_health(self) -> None:
        if self.worker.restorer is None:  # pragma: no cover - the constructor either loads or raises
            raise RuntimeError("engines not loaded")


# --------------------------------------------------------------------------------------------------
# the HTTP ingress
# --------------------------------------------------------------------------------------------------

api = FastAPI(title="supir-rt", description="SUPIR image restoration (see docs/serving.md)")


def _error(err: RequestError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.as_json(), status_code=err.status, headers=dict(headers or {}))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own answers (unknown route, wrong method) as the same JSON errors as ours."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return _error(RequestError(exc.status_code, "route", f"{request.method} {request.url.path}: {exc.detail}; the "
                               "routes are POST /v1/restore, POST /v1/caption, GET /v1/health, GET /v1/info", kind))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed", exc_info=exc)
    return _error(RequestError(500, "server", f"internal error ({type(exc).__name__}); see the server log", "internal"))


def _names_not_paths(args: Mapping[str, Any]) -> dict[str, Any]:
    """Deployment args for clients: the file and folder settings as names (a client has no use for, and
    should not learn, the server's paths)."""
    from pathlib import PurePath

    paths = ("sdxl", "supir", "engines_dir", "llava_dir", "caption_model")
    return {k: (PurePath(v).name if k in paths and v else v) for k, v in args.items()}


@serve.deployment(name="SupirAPI", max_ongoing_requests=256)
@serve.ingress(api)
class ApiDeployment:
    """HTTP front: validation, limits, timeout, retry on replica death, metrics."""

    def __init__(self, restorer: DeploymentHandle, config: dict[str, Any]) -> None:
        from ray.serve import metrics

        self.restorer = restorer
        self.config = AppConfig.from_args(config)
        self.limits = self.config.limits
        self.latency = metrics.Histogram("supir_request_seconds", description="request latency at the API",
                                         boundaries=LATENCY_BUCKETS, tag_keys=("route", "status"))
        self.errors = metrics.Counter("supir_errors_total", description="rejected or failed requests",
                                      tag_keys=("route", "kind"))
        self.requests = metrics.Counter("supir_requests_total", description="requests answered",
                                        tag_keys=("route", "status"))
        self.ready = False  # a model replica has answered once
        self.draining = False  # shutting down: new requests get 503, the ones in flight finish
        self.in_flight = 0

    # ------------------------------------------------------------------------------------ lifecycle

    def drain(self) -> int:
        """Stop taking requests (503 + Retry-After from now on); returns the requests still in flight."""
        self.draining = True
        return self.in_flight

    def pending(self) -> int:
        return self.in_flight

    # ---------------------------------------------------------------------------------------- routes

    @api.post("/v1/restore")
    async def restore(self, request: Request) -> Response:
        return await self._answer("restore", request, self._restore)

    @api.post("/v1/caption")
    async def caption(self, request: Request) -> Response:
        return await self._answer("caption", request, self._caption)

    @api.get("/v1/health")
    async def health(self) -> Response:
        retry = {"Retry-After": self._retry_after()}
        if self.draining:
            return JSONResponse({"status": "stopping"}, status_code=503, headers=retry)
        try:  # answers within a second: a replica busy with a batch still answers info() from its own thread
            await asyncio.wait_for(self.restorer.info.remote(), timeout=1 if not self.ready else 10)
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "loading" if not self.ready else "unavailable",
                                 "detail": type(err).__name__}, status_code=503, headers=retry)
        self.ready = True
        return JSONResponse({"status": "ready"})

    @api.get("/v1/info")
    async def info(self) -> Response:
        import ray
        import torch

        model = await self.restorer.info.remote()
        body = {
            "model": model, "versions": {"ray": ray.__version__, "torch": torch.__version__},
            "limits": dataclasses.asdict(self.limits),
            "deployment": _names_not_paths({k: v for k, v in self.config.as_args().items()
                                            if k not in {f.name for f in dataclasses.fields(Limits)}}),
        }
        return JSONResponse(body)

    # ------------------------------------------------------------------------------------- internals

    def _retry_after(self) -> str:
        return str(max(1, int(round(self.config.retry_after_s))))

    async def _answer(self, route: str, request: Request, handler: Any) -> Response:
        start = time.perf_counter()
        self.in_flight += 1
        try:
            if self.draining:
                raise RequestError(503, "server", "the server is shutting down; retry on another replica or after "
                                   "the Retry-After delay", "stopping")
            response = await asyncio.wait_for(handler(request), timeout=self.limits.request_timeout_s)
        except RequestError as err:
            response = _error(err, {"Retry-After": self._retry_after()} if err.status == 503 else None)
            self.errors.inc(tags={"route": route, "kind": err.kind})
        except asyncio.TimeoutError:
            err = RequestError(504, "request_timeout_s", f"the request took longer than this server's limit of "
                               f"{self.limits.request_timeout_s:g} s", "timeout")
            response = _error(err)
            self.errors.inc(tags={"route": route, "kind": err.kind})
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is one JSON 500, never a traceback
            log.exception("request failed")
            err = RequestError(500, "server", f"internal error ({type(exc).__name__}); see the server log", "internal")
            response = _error(err)
            self.errors.inc(tags={"route": route, "kind": err.kind})
        finally:
            self.in_flight -= 1
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        self.latency.observe(time.perf_counter() - start, tags={"route": route, "status": str(response.status_code)})
        return response

    async def _read_form(self, request: Request) -> tuple[Job, bool]:
        """The multipart body (size-capped while reading) -> a `Job`; True when JSON output is asked."""
        cap = self.limits.max_body_bytes
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise RequestError(400, "body", f"the body is {kind or 'without a Content-Type'}; send multipart/form-data "
                               "with the image file in the field 'image' (curl -F image=@photo.png)", "bad_request")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise RequestError(413, "body", f"the request body is {int(declared):,} bytes; this server accepts up "
                               f"to {cap:,}", "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(413, "body", f"the request body is over this server's limit of {cap:,} bytes",
                                   "too_large")
            chunks.append(chunk)
        body = b"".join(chunks)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - a malformed multipart body
            raise RequestError(400, "body", f"expected a multipart/form-data body with fields 'image' and "
                               f"'settings' ({err})", "bad_request") from None
        unknown = sorted(set(form.keys()) - {"image", "settings", "caption"})
        if unknown:
            raise RequestError(422, unknown[0], f"unknown form field {unknown[0]!r}; send image, settings, caption",
                               "bad_request")
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "image", "the form has no file field 'image'; send the image as "
                               "-F image=@photo.png", "bad_image")
        data = await upload.read()
        settings = form.get("settings")
        if settings is not None and not isinstance(settings, str):
            settings = (await settings.read()).decode("utf-8", "replace")
        config = parse_settings(settings, self.limits, tiny=self.config.runtime.tiny_random)
        image = await asyncio.to_thread(decode_image, data, self.limits)
        caption = form.get("caption")
        want_json = (request.query_params.get("format") == "json"
                     or "application/json" in request.headers.get("accept", ""))
        return Job(image=image, config=config, caption=caption if isinstance(caption, str) else None,
                   name=upload.filename or None, deadline=time.time() + self.limits.request_timeout_s), want_json

    async def _call(self, method: str, job: Job) -> Any:
        """The model call; back-pressure -> 503 + Retry-After, a dead replica -> one retry, then 503."""
        from ray import exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError

        died = (ray_errors.RayActorError, ray_errors.ActorUnavailableError)
        for attempt in (1, 2):
            try:
                return await getattr(self.restorer, method).remote(job)
            except BackPressureError:
                raise RequestError(503, "queue", "all replicas are busy and the queue is full; retry after the "
                                   "Retry-After delay", "overloaded") from None
            except died as err:
                if attempt == 2:
                    raise RequestError(503, "replica", f"the replica serving this request stopped ({type(err).__name__});"
                                       " retry", "replica_failed") from None
                log.warning("replica died during a request (%s); retrying it once", type(err).__name__)
        raise AssertionError("unreachable")

    async def _restore(self, request: Request) -> Response:
        job, want_json = await self._read_form(request)
        outcome: Outcome = await self._call("restore", job)
        if outcome.error is not None:
            raise outcome.error
        headers = {"X-Supir-Seed": str(outcome.metadata["settings"]["seed"]),
                   "X-Supir-Queue-Seconds": f"{outcome.queue_s:.3f}",
                   "X-Supir-Batch-Size": str(outcome.batch_size)}
        if want_json:
            return JSONResponse({"image_base64": base64.b64encode(outcome.png).decode("ascii"),
                                 "media_type": "image/png", "metadata": outcome.metadata}, headers=headers)
        return Response(outcome.png, media_type="image/png", headers=headers)

    async def _caption(self, request: Request) -> Response:
        job, _ = await self._read_form(request)
        result = await self._call("caption", job)
        if isinstance(result, RequestError):
            raise result
        return JSONResponse({"caption": result})


# --------------------------------------------------------------------------------------------------
# the application builder
# --------------------------------------------------------------------------------------------------


def _gpus(config: AppConfig) -> float:
    if config.gpus_per_replica is not None:
        return config.gpus_per_replica
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _cpus(config: AppConfig, gpus: float) -> float:
    """`replica_cpus` for the Ray instance this process is connected to, less the CPUs each replica's
    tile workers reserve (``tile_workers`` × ``tile_worker_cpus``)."""
    import ray

    cluster = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    replicas = config.min_replicas if config.min_replicas is not None else config.replicas
    workers = max(1, replicas) * config.runtime.tile_workers * config.runtime.tile_worker_cpus
    if cluster is not None and workers and gpus == 0:
        if cluster - workers <= API_CPUS:
            raise ValueError(f"{max(1, replicas)} replicas x --tile-workers {config.runtime.tile_workers} x "
                             f"--tile-worker-cpus {config.runtime.tile_worker_cpus:g} leave no CPU of Ray's "
                             f"{cluster:g} for the replicas: lower --tile-worker-cpus (e.g. 0.1), --tile-workers, "
                             "--replicas, or raise --num-cpus")
        cluster -= workers
    return replica_cpus(config.cpus_per_replica, replicas=replicas, cluster_cpus=cluster, gpus_per_replica=gpus)


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Ray Serve application for ``args`` (see `AppConfig`); ``serve.run(build_app({...}))``."""
    config = AppConfig.from_args(dict(args or {}))
    gpus = _gpus(config)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": _cpus(config, gpus), "num_gpus": gpus},
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": config.retry_after_s},
    }
    if config.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.replicas
    model = RestorerDeployment.options(**options).bind(
        dataclasses.asdict(config.runtime), dataclasses.asdict(config.limits), config.max_batch_size,
        config.batch_wait_s)
    api_queue = 4 * (config.max_replicas or config.replicas) * (config.max_ongoing_requests + config.max_queued_requests)
    return ApiDeployment.options(
        ray_actor_options={"num_cpus": API_CPUS}, max_queued_requests=api_queue,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry_after_s},
    ).bind(model, config.as_args())


__all__ = ["APP_NAME", "AppConfig", "ApiDeployment", "RestorerDeployment", "build_app"]
