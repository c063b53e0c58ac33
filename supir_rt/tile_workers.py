"""Tile-parallel sampling: the tiles of each tiled step spread over N Ray actors.

The tiles of one tiled sampler step are independent until the blend, so the batches of tiles can go to
N engines at once: N local GPUs, or N GPUs on N machines. Ray is the distributed engine (actors, object
transfer, failure detection); the only socket opened here is a bounded probe of a Ray address.

Pieces:

* `WorkerRecipe`: how a worker builds its ``unet_adaptor`` engine: the same `Restorer` constructor and
  options the driver used (``tiny_random`` with its seed, ``from_weights``, ``from_engines``), so a
  worker runs exactly the driver's network, on its own device and backend;
* `TileWorker`: the actor. It holds one engine; `setup` receives one restore's `TiledDenoiser` state
  **once** (the per-batch text conditioning and control-latent tiles, through Ray's object store: each
  node fetches them once; the guidance schedules; the σ table); `denoise` then receives per batch only
  that batch's x tiles and the step's σ̂, σ, and returns the guided denoised tiles ``D`` computed by
  `TiledDenoiser.denoise_batch` itself (CFG applied on the worker: half the bytes of the ``2B`` eps);
* `TilePool`: the driver's handle on N workers. Before the first step it compares every worker's
  `engine_identity` (weights hash, runtime version, backend, dtype) with the driver's and refuses a
  mismatch with one clear error; a Ray address that does not answer is one clear error too. It is the
  `TiledDenoiser`'s ``runner``: `bind` sends a restore's state, and `ShardedTiles.iter_tiles` takes all
  the tile batches of a step, deals them round-robin to the workers, and yields the D's in window
  order, so the driver blends exactly as a single process does (float64 weights, window order).
  Restoration guidance (x_center) and the sampler update are elementwise and stay on the driver:
  x_center crops never travel.

Failure: an actor that dies mid-restore (its process or machine is gone) has its batches of the
current step re-run on the surviving workers, and it receives nothing more; the result is the same
(each batch is a pure function of its inputs). When no worker is left the restore fails with one
`TileWorkerError` and nothing is written. A worker that raises (e.g. runs out of memory) is not
retried: its error is the restore's error.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from supir_rt.backends import Engine
from supir_rt.denoiser import ControlScale, EpsDenoiser, LinearCFG
from supir_rt.errors import UserError
from supir_rt.tiling.denoiser import TiledDenoiser

log = logging.getLogger(__name__)

CONSTRUCTORS = ("tiny_random", "from_weights", "from_engines")


class TileWorkerError(UserError, RuntimeError):
    """Tile workers cannot be used: Ray does not answer, the workers differ from the driver, or all of
    them died mid-restore. The message names the cause and the fix; nothing is written."""


@dataclass(frozen=True)
class WorkerRecipe:
    """The `Restorer` constructor (``tiny_random`` / ``from_weights`` / ``from_engines``) and its keyword
    arguments: a worker builds the same restorer and keeps its ``unet_adaptor`` engine. ``device``
    overrides the device argument (a worker's GPU is ``cuda`` as Ray assigns it)."""

    constructor: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.constructor not in CONSTRUCTORS:
            raise ValueError(f"worker recipe constructor {self.constructor!r}: choose one of {CONSTRUCTORS}")

    def open_unet(self) -> tuple[Any, Engine]:
        """(restorer, its unet_adaptor engine). The restorer is kept alive with the engine."""
        from supir_rt.api import Restorer

        restorer = getattr(Restorer, self.constructor)(**dict(self.kwargs))
        return restorer, restorer.engines["unet_adaptor"]


def engine_identity(engine: Engine) -> dict[str, str]:
    """What must agree between the driver's ``unet_adaptor`` and every worker's: the weights hash (the
    state dict's for the torch backend, the manifest's ``weights_sha256`` for exported engines), the
    runtime version, the backend and the compute dtype."""
    import supir_rt
    from supir_rt.backends.manifest import Manifest, manifest_path, tensors_sha256

    engine = getattr(engine, "engines", (engine,))[0]  # CFG-parallel: its engines hold the same weights
    module = getattr(engine, "module", None)
    if isinstance(module, torch.nn.Module):
        weights = tensors_sha256(module.state_dict().items())
    elif getattr(engine, "manifest", None) is not None:
        weights = engine.manifest.weights_sha256
    elif getattr(engine, "path", None) is not None:
        weights = Manifest.read(manifest_path(engine.path)).weights_sha256
    else:
        raise TileWorkerError(f"cannot identify the weights of a {type(engine).__name__} unet_adaptor engine; "
                              "tile workers need a torch, onnxruntime or tensorrt engine")
    dtype = getattr(engine, "dtype", None) or getattr(engine, "float_dtype", None) or torch.float32
    return {"weights_sha256": weights, "supir_rt": supir_rt.__version__, "backend": str(engine.backend),
            "dtype": str(dtype).removeprefix("torch.")}


class _WorkerTiles:
    """A worker's copy of the driver's `TiledDenoiser` state for one restore (per-batch text conditioning
    and control-latent tiles, schedules) over the worker's own network; `denoise_batch` is the driver's
    own method, so a batch is computed by the same code on both sides."""

    def __init__(self, model: Any, batches: Sequence[Sequence[Any]], text: Sequence[Mapping[str, torch.Tensor]],
                 lq_tiles: Sequence[torch.Tensor], cfg: LinearCFG, control: ControlScale) -> None:
        self.model, self.batches, self.text, self.lq_tiles, self.cfg, self.control = (
            model, batches, text, lq_tiles, cfg, control)

    def scales(self, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cfg(sigma_hat), self.control(sigma)

    denoise_batch = TiledDenoiser.denoise_batch


class TileWorker:
    """One tile worker: a ``unet_adaptor`` engine and, per restore, the tile batches' conditioning.
    Used as a Ray actor (`TilePool` wraps it)."""

    def __init__(self, recipe: WorkerRecipe) -> None:
        self.restorer, self.engine = recipe.open_unet()
        self._identity: dict[str, str] | None = None
        self._setups: dict[int, _WorkerTiles] = {}

    def identity(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = engine_identity(self.engine)
        return self._identity

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.engine, "device", "cpu"))

    def setup(self, key: int, batches: Sequence[Sequence[Any]], text: Sequence[Mapping[str, torch.Tensor]],
              lq_tiles: Sequence[torch.Tensor], cfg: LinearCFG, control: ControlScale, table: torch.Tensor) -> None:
        """The once-per-restore part: per-batch text conditioning and control-latent tiles, schedules."""
        from supir_rt.stages import engine_network

        dev = self.device
        text = [{k: v.to(dev) for k, v in t.items()} for t in text]
        lq_tiles = [t.to(dev) for t in lq_tiles]
        network = EpsDenoiser(engine_network(self.engine), table.to(dev))
        self._setups = {k: v for k, v in self._setups.items() if k > key - 4}  # a few restores at once at most
        self._setups[key] = _WorkerTiles(network, batches, text, lq_tiles, cfg, control)

    @torch.no_grad()
    def denoise(self, key: int, j: int, xt: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dev = self.device
        out = self._setups[key].denoise_batch(j, xt.to(dev), sigma_hat.to(dev), sigma.to(dev))
        return out.cpu() if out.device.type != "cpu" else out


# --------------------------------------------------------------------------------------------------
# the driver side
# --------------------------------------------------------------------------------------------------


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://host:port``, ``host:port``), or start a
    local one when None; a no-op when this process is already connected. An address that does not
    answer is one `TileWorkerError`."""
    import ray

    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        _probe(address)
    try:
        if address is None:
            # a Ray of this machine only, reachable on 127.0.0.1 only
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, timeouts
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TileWorkerError(f"--ray-address {address}: cannot join the Ray cluster ({first}); start it with "
                              "`ray start --head` or fix the address (auto, ray://HOST:10001, HOST:6379)") from None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to ``host:port`` (Ray itself retries an unanswering address for minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise TileWorkerError(f"--ray-address {address}: expected auto, ray://HOST:PORT or HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise TileWorkerError(f"--ray-address {address}: nothing answers there ({err.strerror or err}); start the "
                              "cluster with `ray start --head` or fix the address") from None


class TilePool:
    """N `TileWorker` actors built from one `WorkerRecipe`, checked against the driver's engine.

    ``expected``: the driver's `engine_identity` (None: only the workers are compared with each other).
    ``num_gpus`` / ``num_cpus``: Ray resources per worker (one GPU per worker on a GPU cluster).
    ``min_pixels``: the smallest processing size (width × height) whose tiled restores use the pool
    (`takes`); smaller ones run on the driver's own engine (0: every tiled restore).
    ``timeout_s`` bounds the workers' start-up (building the engine, hashing its weights).
    """

    def __init__(self, recipe: WorkerRecipe, workers: int, *, expected: Mapping[str, str] | None = None,
                 num_gpus: float = 0, num_cpus: float = 1, min_pixels: int = 0, timeout_s: float = 600) -> None:
        import ray

        if workers < 1:
            raise TileWorkerError(f"--tile-workers {workers}: give at least 1")
        self.min_pixels = min_pixels
        if not ray.is_initialized():
            connect_ray(None)
        actor = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0)(TileWorker)
        self.actors = [actor.remote(recipe) for _ in range(workers)]
        self.alive = list(range(workers))
        self._keys = itertools.count()
        try:
            identities = ray.get([a.identity.remote() for a in self.actors], timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the recipe failed on a worker, or it timed out
            self.close()
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
            raise TileWorkerError(f"the tile workers did not start ({first}); check that every node has the "
                                  "weights/engines at the same paths and the same supir-rt installed, and that the "
                                  f"cluster has {num_cpus:g} CPU and {num_gpus:g} GPU free per worker "
                                  "(--tile-worker-cpus)") from None
        reference = dict(expected) if expected is not None else identities[0]
        for i, ident in enumerate(identities):
            diff = {k: (reference.get(k), ident.get(k)) for k in reference if reference.get(k) != ident.get(k)}
            if diff:
                self.close()
                what = "; ".join(f"{k}: driver {str(a)[:16]} vs worker {str(b)[:16]}" for k, (a, b) in diff.items())
                raise TileWorkerError(f"tile worker {i} runs a different unet_adaptor than the driver ({what}); "
                                      "give every node the same weights/engines and supir-rt version")
        self.identity = reference

    def takes(self, pixels: int) -> bool:
        """Whether a tiled restore of ``pixels`` processing pixels runs on the workers (`min_pixels`)."""
        return bool(self.alive) and pixels >= self.min_pixels

    def bind(self, denoiser: Any) -> ShardedTiles:
        """Give the workers one restore's `TiledDenoiser` state (its per-batch text conditioning and
        control-latent tiles, via Ray's object store: each node fetches them once) and return the
        runner its steps call (`ShardedTiles.iter_tiles`)."""
        import ray

        key = next(self._keys)
        refs = (ray.put([{k: v.cpu() for k, v in t.items()} for t in denoiser.text]),
                ray.put([t.cpu() for t in denoiser.lq_tiles]))
        table = denoiser.model.sigmas.cpu()
        for i in self.alive:
            self.actors[i].setup.remote(key, denoiser.batches, *refs, denoiser.cfg, denoiser.control, table)
        return ShardedTiles(self, key)

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self.alive = [], []

    def __enter__(self) -> TilePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedTiles:
    """The tile batches of one restore's steps on a `TilePool`'s workers."""

    def __init__(self, pool: TilePool, key: int) -> None:
        self.pool, self.key = pool, key
        self.batches_sent: list[int] = [0] * len(pool.actors)  # per worker, for tests and the benchmark
        self.retried = 0

    def run_tiles(self, x_tiles: Sequence[torch.Tensor], sigma_hat: torch.Tensor,
                  sigma: torch.Tensor) -> list[torch.Tensor]:
        return list(self.iter_tiles(x_tiles, sigma_hat, sigma))

    def iter_tiles(self, x_tiles: Sequence[torch.Tensor], sigma_hat: torch.Tensor,
                   sigma: torch.Tensor) -> Iterator[torch.Tensor]:
        """D of batch j (``x_tiles[j]``), yielded in order. Batch j goes to the j-th live worker
        round-robin; all are submitted before the first result is awaited. When a worker turns out dead,
        every batch it still owes is re-submitted round-robin to the live ones."""
        import ray
        from ray.exceptions import RayActorError

        if not x_tiles:
            return
        device = x_tiles[0].device
        sigmas = sigma_hat.cpu(), sigma.cpu()
        cpu = [t.cpu() for t in x_tiles]
        owner: dict[int, tuple[int, Any]] = {}

        def submit(indices: Sequence[int]) -> None:
            alive = list(self.pool.alive)
            if not alive:
                raise TileWorkerError(f"all {len(self.pool.actors)} tile workers died during the restore; nothing "
                                      "was written. Check the workers' nodes (memory, GPU errors) and run it again")
            for n, j in enumerate(indices):
                w = alive[n % len(alive)]
                owner[j] = (w, self.pool.actors[w].denoise.remote(self.key, j, cpu[j], *sigmas))
                self.batches_sent[w] += 1

        submit(range(len(cpu)))
        for j in range(len(cpu)):
            while True:
                w, ref = owner[j]
                try:
                    out = ray.get(ref)
                    break
                except RayActorError:
                    if w in self.pool.alive:
                        self.pool.alive.remove(w)
                        log.warning("tile worker %d died; its tiles run on the %d others", w, len(self.pool.alive))
                    owed = [i for i in range(j, len(cpu)) if owner[i][0] not in self.pool.alive]
                    self.retried += len(owed)
                    submit(owed)
            yield out.to(device)


def attach_tile_workers(restorer: Any, recipe: WorkerRecipe, workers: int, ray_address: str | None = None, *,
                        min_pixels: int = 0, num_cpus: float = 1, gpu: bool | None = None) -> None:
    """Run ``restorer``'s tiled sampler steps on ``workers`` Ray actors built from ``recipe`` (the
    constructor and options the restorer was made with). Joins the Ray cluster at ``ray_address``
    (None: a local Ray; a no-op in a process already connected, e.g. a Ray Serve replica), starts the
    workers (``num_cpus`` each, and one GPU each when ``gpu``; None: when the recipe's device is CUDA) and checks them
    against the restorer's ``unet_adaptor`` before any restore. Untiled restores, and tiled ones under
    ``min_pixels`` processing pixels, stay local. The restorer's `close` closes the pool. On failure
    the restorer is closed and the `TileWorkerError` raised."""
    try:
        connect_ray(ray_address)
        if gpu is None:
            gpu = str(recipe.kwargs.get("device", "cpu")).startswith("cuda")
        restorer.pipeline.tile_pool = TilePool(recipe, workers, expected=engine_identity(restorer.engines["unet_adaptor"]),
                                               num_gpus=1 if gpu else 0, num_cpus=num_cpus, min_pixels=min_pixels)
    except BaseException:
        restorer.close()
        raise
    restorer.description.update({"tile_workers": workers, "ray_address": ray_address or "local",
                                 "tile_workers_above": min_pixels})


__all__ = ["ShardedTiles", "TilePool", "TileWorker", "TileWorkerError", "WorkerRecipe", "attach_tile_workers",
           "connect_ray", "engine_identity"]
