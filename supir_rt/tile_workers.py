"""Tile-parallel sampling: the tiles of each tiled step spread over N Ray actors.

The tiles of one tiled sampler step are independent until the blend, so the batches of tiles can go to
N engines at once: N local GPUs, or N GPUs on N machines. Ray is the distributed engine (actors, object
transfer, failure detection); the only socket opened here is a bounded probe of a Ray address.

Pieces:

* `WorkerRecipe`: how a worker builds its ``unet_adaptor`` engine: the same `Restorer` constructor and
  options the driver used (``tiny_random`` with its seed, ``from_weights``, ``from_engines``), so a
  worker runs exactly the driver's network, on its own device and backend;
* `TileWorker`: the actor. It holds one engine; `setup` receives the text conditioning (positive and
  negative), the guidance schedules and the σ table **once per restore**; `denoise` then receives per
  batch only that batch's tiles (x tiles, σ̂, σ; the control-latent crops by reference, transferred
  once per node and restore) and returns the guided denoised tiles ``D`` (CFG applied on the worker:
  half the bytes of returning the ``2B`` eps);
* `TilePool`: the driver's handle on N workers. Before the first step it compares every worker's
  `engine_identity` (weights hash, runtime version, backend, dtype) with the driver's and refuses a
  mismatch with one clear error; a Ray address that does not answer is one clear error too;
* `ShardedTileDenoiser`: a `TileDenoiser` (``(x_tiles, σ̂, σ, lq_tiles) -> D``) whose `iter_tiles`
  takes all the tile batches of a step, deals them round-robin to the workers, and returns the D's in
  the order it was given them (the window order), so the driver blends exactly as a single process
  does (float64 weights, window order). Restoration guidance (x_center) and the Euler/DPM++ update are
  elementwise and stay on the driver: x_center crops never travel.

Failure: an actor that dies mid-restore (its process or machine is gone) has its batches of the
current step re-run on the surviving workers, and it receives nothing more; the result is the same
(each batch is a pure function of its inputs). When no worker is left the restore fails with one
`TileWorkerError` and nothing is written. A worker that raises (e.g. runs out of memory) is not
retried: its error is the restore's error.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from supir_rt.backends import Engine
from supir_rt.denoiser import ControlScale, EpsDenoiser, LinearCFG
from supir_rt.errors import UserError

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


class TileWorker:
    """One tile worker: a ``unet_adaptor`` engine and, per restore, the guided tile denoiser over it.
    Used as a Ray actor (`TilePool` wraps it); a plain object in single-process tests."""

    def __init__(self, recipe: WorkerRecipe) -> None:
        self.restorer, self.engine = recipe.open_unet()
        self._identity: dict[str, str] | None = None
        self._setups: dict[int, Any] = {}

    def identity(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = engine_identity(self.engine)
        return self._identity

    def setup(self, key: int, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], cfg: LinearCFG,
              control: ControlScale, table: torch.Tensor) -> None:
        """The once-per-restore part: text conditioning, guidance schedules, the σ table."""
        from supir_rt.pipeline import engine_network
        from supir_rt.tiling import TileGuidedDenoiser

        device = torch.device(getattr(self.engine, "device", "cpu"))
        move = {k: v.to(device) for k, v in cond.items()}, {k: v.to(device) for k, v in uncond.items()}
        network = EpsDenoiser(engine_network(self.engine), table.to(device))
        self._setups = {k: v for k, v in self._setups.items() if k > key - 4}  # a few restores at once at most
        self._setups[key] = TileGuidedDenoiser(network, *move, cfg, control)

    @torch.no_grad()
    def denoise(self, key: int, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor,
                lq: torch.Tensor) -> torch.Tensor:
        denoise = self._setups[key]
        device = torch.device(getattr(self.engine, "device", "cpu"))
        out = denoise(x.to(device), sigma_hat.to(device), sigma.to(device), lq.to(device))
        return out.cpu() if out.device.type != "cpu" else out.clone()


# --------------------------------------------------------------------------------------------------
# the driver side
# --------------------------------------------------------------------------------------------------


TileBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One batch of tiles as the tiled samplers call the network: (x_tiles, σ̂, σ, lq_tiles)."""


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
    ``timeout_s`` bounds the workers' start-up (building the engine, hashing its weights).
    """

    def __init__(self, recipe: WorkerRecipe, workers: int, *, expected: Mapping[str, str] | None = None,
                 num_gpus: float = 0, num_cpus: float = 1, timeout_s: float = 600) -> None:
        import ray

        if workers < 1:
            raise TileWorkerError(f"--tile-workers {workers}: give at least 1")
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
                                  "weights/engines at the same paths and the same supir-rt installed") from None
        reference = dict(expected) if expected is not None else identities[0]
        for i, ident in enumerate(identities):
            diff = {k: (reference.get(k), ident.get(k)) for k in reference if reference.get(k) != ident.get(k)}
            if diff:
                self.close()
                what = "; ".join(f"{k}: driver {str(a)[:16]} vs worker {str(b)[:16]}" for k, (a, b) in diff.items())
                raise TileWorkerError(f"tile worker {i} runs a different unet_adaptor than the driver ({what}); "
                                      "give every node the same weights/engines and supir-rt version")
        self.identity = reference

    def denoiser(self, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], cfg: LinearCFG,
                 control: ControlScale, table: torch.Tensor) -> ShardedTileDenoiser:
        """The tile denoiser of one restore: sends the text conditioning to every worker once."""
        import ray

        key = next(self._keys)
        text = ({k: v.cpu() for k, v in cond.items() if k != "control"},
                {k: v.cpu() for k, v in uncond.items() if k != "control"})
        refs = [ray.put(t) for t in text]
        for i in self.alive:
            self.actors[i].setup.remote(key, *refs, cfg, control, table.cpu())
        return ShardedTileDenoiser(self, key, cfg, control)

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


class ShardedTileDenoiser:
    """A `TileDenoiser` over a `TilePool`: `iter_tiles` deals a step's tile batches to the workers."""

    def __init__(self, pool: TilePool, key: int, cfg: LinearCFG, control: ControlScale) -> None:
        self.pool, self.key, self.cfg, self.control = pool, key, cfg, control
        self.batches_sent: list[int] = [0] * len(pool.actors)  # per worker, for tests and the benchmark
        self.retried = 0
        self._lq_refs: list[Any] = []

    def scales(self, sigma_hat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cfg(sigma_hat), self.control(sigma)

    def __call__(self, x: torch.Tensor, sigma_hat: torch.Tensor, sigma: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return next(iter(self.iter_tiles([(x, sigma_hat, sigma, lq)])))

    def run_tiles(self, batches: Sequence[TileBatch]) -> list[torch.Tensor]:
        return list(self.iter_tiles(batches))

    def iter_tiles(self, batches: Sequence[TileBatch]) -> Iterator[torch.Tensor]:
        """D of every batch, yielded in the order given. Batch j goes to the j-th live worker round-robin;
        all are submitted before the first result is awaited. When a worker turns out dead, every batch it
        still owes is re-submitted round-robin to the live ones."""
        import ray
        from ray.exceptions import RayActorError

        if not batches:
            return
        device = batches[0][0].device
        # the control-latent crops of batch j are the same every step: put in Ray's object store once and
        # passed by reference (a node fetches an object once and keeps it while it is referenced)
        if len(self._lq_refs) != len(batches):
            self._lq_refs = [ray.put(b[3].cpu()) for b in batches]
        cpu = [(*(t.cpu() for t in b[:3]), ref) for b, ref in zip(batches, self._lq_refs)]
        owner: dict[int, tuple[int, Any]] = {}

        def submit(indices: Sequence[int]) -> None:
            alive = list(self.pool.alive)
            if not alive:
                raise TileWorkerError(f"all {len(self.pool.actors)} tile workers died during the restore; nothing "
                                      "was written. Check the workers' nodes (memory, GPU errors) and run it again")
            for n, j in enumerate(indices):
                w = alive[n % len(alive)]
                owner[j] = (w, self.pool.actors[w].denoise.remote(self.key, *cpu[j]))
                self.batches_sent[w] += 1

        submit(range(len(batches)))
        for j in range(len(batches)):
            while True:
                w, ref = owner[j]
                try:
                    out = ray.get(ref)
                    break
                except RayActorError:
                    if w in self.pool.alive:
                        self.pool.alive.remove(w)
                        log.warning("tile worker %d died; its tiles run on the %d others", w, len(self.pool.alive))
                    owed = [i for i in range(j, len(batches)) if owner[i][0] not in self.pool.alive]
                    self.retried += len(owed)
                    submit(owed)
            yield out.to(device)


def iter_tiles(denoise: Callable[..., torch.Tensor], batches: Sequence[TileBatch]) -> Iterator[torch.Tensor]:
    """D of every tile batch, in order: the denoiser's own `iter_tiles` when it shards them (all batches of
    a step submitted at once), else one call per batch as the results are consumed (so a single process
    runs and blends batch by batch, as before)."""
    many = getattr(denoise, "iter_tiles", None)
    if many is not None:
        yield from many(batches)
        return
    for b in batches:
        yield denoise(*b)


__all__ = ["ShardedTileDenoiser", "TileBatch", "TilePool", "TileWorker", "TileWorkerError", "WorkerRecipe",
           "connect_ray", "engine_identity", "iter_tiles"]
