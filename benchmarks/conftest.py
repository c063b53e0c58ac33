"""Fixtures and options for `pytest benchmarks/` (issue 6): parity first, then time, then record.

Every case (one network or one end-to-end restore, on one backend, precision and shape) asserts
parity with the PyTorch eager fp32 output on the same feed, times with `benchmark.pedantic`, records
peak memory (RSS on CPU, `max_memory_allocated` on CUDA) and lands in one JSON per run
(`--results-dir`), with every knob as a field. The Markdown table of the run is printed last.

Memory: the `full` architecture is ~4.8 B parameters (19 GB in fp32). Parts of the model
(`first_stage_model`, `model`, `conditioner`) are therefore materialised on demand, with seeded
random weights, and on CPU only one part is resident at a time; cases that cannot fit in the memory
available right now are skipped with the numbers in the reason, never run into swap or the OOM killer.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import importlib.util
import json
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from supir_rt.backends.modules import NETWORK_MODULES
from supir_rt.backends.specs import NETWORKS, network_specs
from supir_rt.config import ModelConfig
from supir_rt.model import supir as supir_model

log = logging.getLogger("supir_rt.benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "torch-opt", "onnxruntime", "tensorrt")
REFERENCE = ("torch", "fp32")  # the case every other one is compared with (parity and speed)
# Parity: max |out - ref| / max |ref| over each output. fp32 backends reorder sums (compile, ORT
# fusions): measured 1e-7..5e-6 on tiny and full networks, so 1e-4 leaves 20x room. Half precisions
# are bounded by their rounding (fp16 eps 9.8e-4, bf16 eps 7.8e-3) accumulated through ~100 layers:
# about 20x eps, as for fp32.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1.5e-1}
# The part of SUPIRModel each network's positional module runs (NETWORK_MODULES wrap these).
OWNERS = {"dr_encoder": "first_stage_model", "vae_encoder": "first_stage_model", "vae_decoder": "first_stage_model",
          "unet_adaptor": "model", "text_encoders": "conditioner"}
_OWNER_SEEDS = {"first_stage_model": 1, "model": 2, "conditioner": 3}


class CaseSkipped(Exception):
    """A case cannot run here; the message is the true reason (recorded, then pytest.skip)."""


# --------------------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("supir-rt benchmarks (benchmarks/README.md)")
    g.addoption("--model-size", choices=("tiny", "full"), default="tiny",
                help="tiny preset (seconds) or the official architecture with random weights")
    g.addoption("--latent", default=None,
                help="latent sizes HxW, comma-separated (image = 8x); default tiny 16x16, full 16x16 "
                     "on CPU and 128x128 (1024 px) on CUDA")
    g.addoption("--batch", type=int, default=1, help="images per request B (the UNet runs 2B)")
    g.addoption("--backends", default=",".join(BACKENDS),
                help=f"comma-separated subset of {','.join(BACKENDS)}; torch fp32 (the reference) always runs")
    g.addoption("--precisions", default=None, help="comma-separated fp32,fp16,bf16; default fp32 on CPU, all on CUDA")
    g.addoption("--steps", type=int, default=None, help="sampling steps of the end-to-end restore (default tiny 4, full 2)")
    g.addoption("--networks", default=",".join(NETWORKS), help="comma-separated networks to benchmark")
    g.addoption("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    g.addoption("--torch-opt", default="auto",
                help="what backend torch-opt applies: 'compile', 'channels-last' or 'compile+channels-last'; "
                     "auto = compile+channels-last on CUDA, channels-last on CPU (inductor needs minutes per "
                     "network on a 2-core CPU)")
    g.addoption("--rounds", type=int, default=None, help="timed rounds per case (default tiny 5, full 3)")
    g.addoption("--warmup", type=int, default=1, help="untimed warm-up rounds per case")
    g.addoption("--results-dir", default=str(BENCH_DIR / "results"), help="where the run's JSON is written")
    g.addoption("--artifact-dir", default=None,
                help="ONNX artifacts folder, kept and reused (checked by weights hash); default a temporary folder")
    g.addoption("--engines-dir", default=None, help="TensorRT plans built by export/build_trt.py (tensorrt backend)")
    g.addoption("--sdxl-checkpoint", default=None, help="real weights: the SDXL base .safetensors")
    g.addoption("--supir-checkpoint", default=None, help="real weights: SUPIR-v0Q/v0F .ckpt")
    g.addoption("--seed", type=int, default=0, help="seed of the random weights and feeds")


def _parse_latent(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise pytest.UsageError(f"--latent {text!r}: write HxW, e.g. 32x32") from None
    if h < 8 or w < 8:
        raise pytest.UsageError(f"--latent {text!r}: latents start at 8x8 (64 px)")
    return h, w


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


@dataclass(frozen=True)
class BenchOptions:
    model_size: str
    config: ModelConfig
    device: torch.device
    latents: tuple[tuple[int, int], ...]
    batch: int
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    networks: tuple[str, ...]
    steps: int
    torch_opt: str
    rounds: int
    warmup: int
    results_dir: Path
    artifact_dir: Path | None
    engines_dir: Path | None
    checkpoints: tuple[str, str] | None
    seed: int

    @property
    def low_memory(self) -> bool:
        """One model part resident at a time: the full architecture on CPU without real weights."""
        return self.model_size == "full" and self.device.type == "cpu" and self.checkpoints is None

    def knobs(self) -> dict[str, Any]:
        return {"model_size": self.model_size, "device": str(self.device), "latents": [list(x) for x in self.latents],
                "batch": self.batch, "backends": list(self.backends), "precisions": list(self.precisions),
                "networks": list(self.networks), "steps": self.steps, "torch_opt": self.torch_opt,
                "rounds": self.rounds, "warmup_rounds": self.warmup, "seed": self.seed,
                "weights": "checkpoints" if self.checkpoints else "random",
                "checkpoints": list(self.checkpoints) if self.checkpoints else None}


def read_options(config: pytest.Config) -> BenchOptions:
    get = config.getoption
    size = get("--model-size")
    dev_opt = get("--device")
    device = torch.device("cuda" if dev_opt == "auto" and torch.cuda.is_available() else
                          ("cpu" if dev_opt == "auto" else dev_opt))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device here")
    default_latent = {"tiny": "16x16", "full": "128x128" if device.type == "cuda" else "16x16"}[size]
    backends = tuple(_split(get("--backends")))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise pytest.UsageError(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    if "torch" not in backends:
        backends = ("torch", *backends)  # the reference case is always measured in the same run
    precisions = tuple(_split(get("--precisions") or ("fp32" if device.type == "cpu" else "fp32,fp16,bf16")))
    if bad := [p for p in precisions if p not in PRECISIONS]:
        raise pytest.UsageError(f"--precisions: unknown {bad}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in precisions:
        precisions = ("fp32", *precisions)
    networks = tuple(_split(get("--networks")))
    if bad := [n for n in networks if n not in NETWORKS]:
        raise pytest.UsageError(f"--networks: unknown {bad}; choose from {', '.join(NETWORKS)}")
    opt = get("--torch-opt")
    if opt == "auto":
        opt = "compile+channels-last" if device.type == "cuda" else "channels-last"
    if not set(opt.split("+")) <= {"compile", "channels-last"}:
        raise pytest.UsageError(f"--torch-opt {opt!r}: use compile, channels-last or compile+channels-last")
    ckpts = (get("--sdxl-checkpoint"), get("--supir-checkpoint"))
    if any(ckpts) and not all(ckpts):
        raise pytest.UsageError("real weights need both --sdxl-checkpoint and --supir-checkpoint")
    if all(ckpts) and size != "full":
        raise pytest.UsageError("checkpoints hold the official architecture: add --model-size full")
    art = get("--artifact-dir")
    eng = get("--engines-dir")
    return BenchOptions(
        model_size=size, config=ModelConfig.tiny() if size == "tiny" else ModelConfig.official(), device=device,
        latents=tuple(_parse_latent(x) for x in _split(get("--latent") or default_latent)),
        batch=get("--batch"), backends=backends, precisions=precisions, networks=networks,
        steps=get("--steps") or (4 if size == "tiny" else 2), torch_opt=opt,
        rounds=get("--rounds") or (5 if size == "tiny" else 3), warmup=get("--warmup"),
        results_dir=Path(get("--results-dir")), artifact_dir=Path(art) if art else None,
        engines_dir=Path(eng) if eng else None, checkpoints=ckpts if all(ckpts) else None, seed=get("--seed"),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over the command-line choices (backend, precision, latent); networks come from the test."""
    opts = read_options(metafunc.config)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", opts.backends)
    if "precision" in metafunc.fixturenames:
        metafunc.parametrize("precision", opts.precisions)
    if "network" in metafunc.fixturenames:
        # (network, latent) pairs; the text encoders do not depend on the latent: first one only.
        pairs = [(n, lat) for n in opts.networks for lat in opts.latents
                 if n != "text_encoders" or lat == opts.latents[0]]
        metafunc.parametrize(("network", "latent"), pairs,
                             ids=[n if n == "text_encoders" else f"{n}-{h}x{w}" for n, (h, w) in pairs])
    elif "latent" in metafunc.fixturenames:
        metafunc.parametrize("latent", opts.latents, ids=[f"{h}x{w}" for h, w in opts.latents])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order: network, backend (reference first), precision, latent: one network's weights, copies
    and sessions are built once and released before the next network (matters for `full` on CPU)."""
    def key(item: pytest.Item) -> tuple:
        p = getattr(item, "callspec", None)
        p = p.params if p else {}
        return (str(item.path), NETWORKS.index(p["network"]) if "network" in p else -1,
                BACKENDS.index(p["backend"]) if "backend" in p else -1,
                list(PRECISIONS).index(p["precision"]) if "precision" in p else -1, p.get("latent", (0, 0)))

    bench = [i for i in items if BENCH_DIR in Path(str(i.path)).parents]
    rest = [i for i in items if i not in bench]
    items[:] = rest + sorted(bench, key=key)


@pytest.fixture(scope="session")
def opts(pytestconfig: pytest.Config) -> BenchOptions:
    return read_options(pytestconfig)


# ---------------------------------------------------------------------------------------- memory


def mem_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 60  # not Linux: no guard


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def memory_probe(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory of the block: process RSS (all backends) and, on CUDA, torch's allocator peak.

    `peak_rss_bytes` is the whole process (weights of every resident part included);
    `peak_rss_delta_bytes` is the growth over the RSS when the block started (activations, buffers).
    """
    out: dict[str, Any] = {}
    gc.collect()
    exact = _reset_peak_rss()
    before = _rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    yield out
    peak = _peak_rss()
    out.update(rss_before_bytes=before, peak_rss_bytes=peak, peak_rss_delta_bytes=max(0, peak - before),
               peak_rss_scope="block" if exact else "process lifetime (clear_refs not writable)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out.update(peak_cuda_bytes=torch.cuda.max_memory_allocated(device),
                   cuda_before_bytes=cuda_before)


def require_memory(need: int, what: str, device: torch.device) -> None:
    """Skip (with the numbers) what would not fit in host memory now, or in GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise CaseSkipped(f"{what} needs ~{need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")
        return
    avail = mem_available()
    if need > avail:
        raise CaseSkipped(f"{what} needs ~{need / 2**30:.1f} GiB of RAM, {avail / 2**30:.1f} GiB available now")


def param_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ the model


class ModelHost:
    """The SUPIR model for the benchmarks, each part materialised with seeded random weights on first
    use (or every part loaded from real checkpoints). `low_memory`: one part resident at a time."""

    def __init__(self, opts: BenchOptions) -> None:
        self.opts = opts
        self.config = opts.config
        self.device = opts.device
        self.specs = network_specs(self.config)
        self.resident: set[str] = set()
        # Materialising a part releases the others (and closes their engines): `full` on CPU.
        self.exclusive = opts.low_memory
        self.on_release: list[Any] = []  # callbacks(owner) dropping engines built on a part
        if opts.checkpoints:
            from supir_rt.weights import load_checkpoints

            self.model = supir_model.build_model(self.config, device=self.device, init=False)
            load_checkpoints(self.model, sdxl=opts.checkpoints[0], supir=opts.checkpoints[1])
            self.resident = set(_OWNER_SEEDS)
        else:
            self.model = supir_model.build_model(self.config, device="meta")

    def part(self, owner: str) -> nn.Module:
        return getattr(self.model, owner)

    def materialise(self, owner: str) -> None:
        if owner in self.resident:
            return
        if self.exclusive:
            for other in list(self.resident):
                self.release(other)
        part = self.part(owner)
        # headroom: activations, and the other processes on a shared machine (a 15.8 GB UNet process
        # that passed a 1.1x + 1 GiB check was OOM-killed when a neighbour grew)
        require_memory(int(param_bytes(part) * 1.25) + (2 << 30), f"{owner} in fp32", self.device)
        part.to_empty(device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.opts.seed * 10 + _OWNER_SEEDS[owner])
            supir_model.initialise_random(part)  # the model's own random init (build_model's), per part
        self.resident.add(owner)

    def release(self, owner: str) -> None:
        if owner not in self.resident or self.opts.checkpoints:
            return
        for cb in self.on_release:
            cb(owner)
        self.part(owner).to_empty(device="meta")
        self.resident.discard(owner)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def materialise_all(self) -> None:
        """Every part at once (end to end); skips when the fp32 weights would not fit now."""
        missing = [o for o in _OWNER_SEEDS if o not in self.resident]
        need = sum(param_bytes(self.part(o), torch.float32) for o in missing)
        require_memory(int(need * 1.25) + (2 << 30), "the whole model in fp32", self.device)
        self.exclusive = False
        for owner in missing:
            self.materialise(owner)

    def module(self, network: str) -> nn.Module:
        """The fp32 positional module of `network` (materialising its part)."""
        self.materialise(OWNERS[network])
        return NETWORK_MODULES[network](self.model).eval()

    def sample_feed(self, network: str, latent: tuple[int, int]) -> dict[str, torch.Tensor]:
        dims = {"B": self.opts.batch, "h": latent[0], "w": latent[1]}
        g = torch.Generator().manual_seed(self.opts.seed * 1000 + NETWORKS.index(network))
        return self.specs[network].sample_inputs(dims, generator=g, device=self.device)


@pytest.fixture(scope="session")
def host(opts: BenchOptions) -> ModelHost:
    return ModelHost(opts)


@pytest.fixture(scope="session")
def meta_model(opts: BenchOptions) -> nn.Module:
    """A weightless copy, for counting FLOPs."""
    return supir_model.build_model(opts.config, device="meta")


def count_flops(meta_model: nn.Module, network: str, feed: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of one call (2 x MAC of conv/matmul/attention; elementwise ops not counted), on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    module = NETWORK_MODULES[network](meta_model)
    spec = network_specs(meta_model.config)[network]
    args = [feed[n].to("meta") for n in spec.input_names]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(*args)
    return int(counter.get_total_flops())


# -------------------------------------------------------------------------------------- engines


class EngineCache:
    """Engines per (backend, precision, network), built on first use, dropped with their part."""

    def __init__(self, host: ModelHost, opts: BenchOptions, artifact_dir: Path) -> None:
        self.host, self.opts, self.artifact_dir = host, opts, artifact_dir
        self.engines: dict[tuple[str, str, str], Any] = {}
        self.details: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.failures: dict[tuple[str, str, str], str] = {}
        # callbacks(network) run before a part is released to make room for a session: the test
        # modules register their reference caches here so they compute what they still need first.
        self.before_release: list[Callable[[str], None]] = []
        host.on_release.append(self.drop_part)

    def get(self, backend: str, precision: str, network: str) -> tuple[Any, dict[str, Any]]:
        key = (backend, precision, network)
        if key in self.failures:
            raise CaseSkipped(self.failures[key])
        if key not in self.engines:
            try:
                self.engines[key], self.details[key] = self._open(backend, precision, network)
            except CaseSkipped as skip:
                self.failures[key] = str(skip)
                raise
        return self.engines[key], self.details[key]

    def drop_part(self, owner: str) -> None:
        for key in [k for k in self.engines if OWNERS[k[2]] == owner]:
            self.close(key)

    def close(self, key: tuple[str, str, str]) -> None:
        engine = self.engines.pop(key, None)
        if engine is not None:
            engine.close()
        gc.collect()

    def close_all(self) -> None:
        for key in list(self.engines):
            self.close(key)

    def _open(self, backend: str, precision: str, network: str) -> tuple[Any, dict[str, Any]]:
        from supir_rt.backends import available_backends

        status = available_backends()
        registry = {"torch": "torch", "torch-opt": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
        reason = status.get(registry[backend], f"backend {registry[backend]!r} is not registered")
        if reason is not None:
            raise CaseSkipped(f"{backend}: {reason}")
        dtype = PRECISIONS[precision]
        if self.host.device.type == "cpu" and dtype != torch.float32 and backend.startswith("torch"):
            log.warning("%s on CPU: PyTorch half precision is emulated (~70x slower than fp32)", precision)
        if backend == "torch":
            return self._torch(network, dtype), {"compute_dtype": precision, "optimisations": "none (eager, SDPA)"}
        if backend == "torch-opt":
            return self._torch_opt(network, dtype), {"compute_dtype": precision, "optimisations": self.opts.torch_opt}
        if backend == "onnxruntime":
            return self._onnxruntime(network, precision)
        return self._tensorrt(network, precision)

    def _torch(self, network: str, dtype: torch.dtype):
        from supir_rt.backends.torch_backend import TorchEngine

        module = self.host.module(network)
        if dtype != torch.float32:
            require_memory(param_bytes(module, dtype) + (1 << 30), f"a {dtype} copy of {network}", self.host.device)
            module = copy.deepcopy(module).to(dtype)
        return TorchEngine(module, self.host.specs[network], self.host.device, dtype)

    def _torch_opt(self, network: str, dtype: torch.dtype):
        from supir_rt.backends.torch_backend import TorchEngine

        module = self.host.module(network)
        # A copy, so that the eager reference keeps its layout and precision.
        require_memory(param_bytes(module, dtype) + (1 << 30), f"an optimised {dtype} copy of {network}",
                       self.host.device)
        module = copy.deepcopy(module).to(dtype)
        if "channels-last" in self.opts.torch_opt:
            module = module.to(memory_format=torch.channels_last)
        if "compile" in self.opts.torch_opt:
            module = torch.compile(module)
        return TorchEngine(module, self.host.specs[network], self.host.device, dtype)

    def _onnxruntime(self, network: str, precision: str):
        try:
            from supir_rt.backends.onnx_export import compute_dtype, export_all
        except ImportError as err:
            raise CaseSkipped(f"onnxruntime: the ONNX exporter is not importable ({err})") from None
        from supir_rt.backends import open_engines

        module = self.host.module(network)
        # Export: the exporter holds the traced graph and its weights once more.
        require_memory(2 * param_bytes(module) + (1 << 30), f"exporting {network} to ONNX", torch.device("cpu"))
        t0 = time.perf_counter()
        export_all(self.host.model, self.artifact_dir, precision=precision, networks=[network], progress=False,
                   reuse=True)
        export_s = time.perf_counter() - t0
        cdt = str(compute_dtype(network, precision)).removeprefix("torch.")
        if self.host.exclusive:
            # The torch part goes (its reference outputs are cached first) so the session fits beside nothing.
            for hook in self.before_release:
                hook(network)
            self.host.release(OWNERS[network])
        require_memory(int(1.2 * param_bytes(module)) + (1 << 30), f"an ONNX Runtime session of {network}",
                       torch.device("cpu"))
        engine = open_engines("onnxruntime", config=self.host.config, artifact_dir=self.artifact_dir,
                              precision=precision, networks=[network])[network]
        providers = engine.session.get_providers()
        return engine, {"compute_dtype": {"float32": "fp32", "float16": "fp16"}.get(cdt, cdt),
                        "optimisations": f"ORT graph optimisations ALL, {providers[0]}",
                        "export_s": round(export_s, 1)}

    def _tensorrt(self, network: str, precision: str):
        from supir_rt.backends import open_engines

        if self.opts.engines_dir is None:
            raise CaseSkipped("tensorrt: pass --engines-dir with plans built by export/build_trt.py")
        try:
            engine = open_engines("tensorrt", config=self.host.config, artifact_dir=self.opts.engines_dir,
                                  precision=precision, networks=[network])[network]
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise CaseSkipped(f"tensorrt: no usable plan for {network} {precision} ({err})") from None
        return engine, {"compute_dtype": precision, "optimisations": "TensorRT plan"}


@pytest.fixture(scope="session")
def artifact_dir(opts: BenchOptions) -> Iterator[Path]:
    if opts.artifact_dir is not None:
        opts.artifact_dir.mkdir(parents=True, exist_ok=True)
        yield opts.artifact_dir
        return
    tmp = Path(tempfile.mkdtemp(prefix="supir-rt-bench-onnx-"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def engines(host: ModelHost, opts: BenchOptions, artifact_dir: Path) -> Iterator[EngineCache]:
    cache = EngineCache(host, opts, artifact_dir)
    yield cache
    cache.close_all()


# ---------------------------------------------------------------------------------------- parity


def parity(outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], precision: str) -> dict[str, Any]:
    """Worst output's max |out - ref| and the same relative to max |ref|, against the tolerance."""
    worst: dict[str, Any] = {"max_abs_err": 0.0, "rel_err": 0.0, "tolerance": TOLERANCES[precision],
                             "metric": "max|out-ref| / max|ref| (worst output)"}
    for name, ref in reference.items():
        out = outputs[name].detach().float().to(ref.device)
        if out.shape != ref.shape:
            raise AssertionError(f"{name}: shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            worst.update(max_abs_err=float("inf"), rel_err=float("inf"), worst_output=name)
            continue
        err = float((out - ref).abs().max())
        rel = err / max(float(ref.abs().max()), 1e-12)
        if rel >= worst["rel_err"]:
            worst.update(max_abs_err=err, rel_err=rel, worst_output=name)
    worst["passed"] = worst["rel_err"] <= worst["tolerance"]
    return worst


# ------------------------------------------------------------------------------------- recording


def _load_report_module():
    spec = importlib.util.spec_from_file_location("supir_rt_bench_report", BENCH_DIR / "report.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for name in ("numpy", "onnx", "onnxruntime", "tensorrt", "pytest_benchmark"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
            out[name] = None if isinstance(err, ImportError) else f"unusable: {err}"
    try:
        out["supir_rt_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["supir_rt_commit"] = None
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = None
    m = {"hostname": socket.gethostname(), "cpu": cpu, "cpu_cores": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "ram_bytes": total, "os": platform.platform(),
         "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=p.name, gpu_memory_bytes=p.total_memory, compute_capability=f"{p.major}.{p.minor}",
                 tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return m


@dataclass
class Recorder:
    """One JSON per run: the knobs, machine and versions once, then every case (rewritten after each)."""

    opts: BenchOptions
    path: Path
    run: dict[str, Any] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: dict[str, Any]) -> None:
        if hasattr(os, "getloadavg"):  # other processes on the cores distort CPU timings: keep the evidence
            case["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        self.cases.append(case)
        self.save()

    def save(self) -> None:
        report = _load_report_module()
        report.add_reference_ratios(self.cases)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ignore = self.path.parent / ".gitignore"  # runs are outputs: figures go to RESULTS.md
        if not ignore.exists():
            ignore.write_text("*\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.run, "cases": self.cases}, indent=1, default=str))
        tmp.replace(self.path)


def pytest_configure(config: pytest.Config) -> None:
    config._supir_recorder = None  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def recorder(opts: BenchOptions, pytestconfig: pytest.Config) -> Recorder:
    stamp = _dt.datetime.now(_dt.timezone.utc)
    name = f"run-{stamp:%Y%m%dT%H%M%SZ}-{opts.model_size}-{opts.device.type}.json"
    rec = Recorder(opts, opts.results_dir / name)
    rec.run = {"schema": 1, "date_utc": stamp.isoformat(timespec="seconds"),
               "command": "pytest " + " ".join(sys.argv[1:]) if "pytest" in sys.argv[0] else " ".join(sys.argv),
               "benchmark_disabled": bool(pytestconfig.getoption("benchmark_disable", False)),
               "options": opts.knobs(), "machine": _machine(opts.device), "versions": _versions()}
    pytestconfig._supir_recorder = rec  # type: ignore[attr-defined]
    return rec


def timing_of(benchmark: Any) -> dict[str, Any] | None:
    """pytest-benchmark's statistics in seconds; None when timing is disabled (--benchmark-disable)."""
    meta = getattr(benchmark, "stats", None)
    if meta is None or getattr(benchmark, "disabled", False):
        return None
    s = meta.stats
    return {"median_s": s.median, "mean_s": s.mean, "min_s": s.min, "max_s": s.max, "stddev_s": s.stddev,
            "rounds": s.rounds}


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rec = getattr(config, "_supir_recorder", None)
    if rec is None or not rec.cases:
        return
    rec.save()
    report = _load_report_module()
    terminalreporter.write_sep("=", "supir-rt benchmarks")
    terminalreporter.write_line(report.markdown_run(json.loads(rec.path.read_text())))
    terminalreporter.write_line(f"run saved to {rec.path}")


class FallbackBenchmark:
    """Stand-in for pytest-benchmark's fixture where the plugin is not installed (e.g. a GPU box that
    installs nothing): the same `pedantic` / `stats` / `extra_info` / `disabled` surface, timed with
    perf_counter, nothing else."""

    def __init__(self) -> None:
        self.disabled, self.group, self.extra_info, self.stats = False, None, {}, None

    def pedantic(self, target: Callable[[], Any], *, rounds: int = 1, warmup_rounds: int = 0,
                 iterations: int = 1) -> None:
        import statistics
        from types import SimpleNamespace

        for _ in range(warmup_rounds):
            target()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iterations):
                target()
            times.append((time.perf_counter() - t0) / iterations)
        self.stats = SimpleNamespace(stats=SimpleNamespace(
            median=statistics.median(times), mean=statistics.fmean(times), min=min(times), max=max(times),
            stddev=statistics.stdev(times) if len(times) > 1 else 0.0, rounds=len(times)))


if importlib.util.find_spec("pytest_benchmark") is None:

    @pytest.fixture
    def benchmark() -> FallbackBenchmark:
        return FallbackBenchmark()


class Kit:
    """The helpers test modules use, handed out as a fixture (conftest is not imported by name:
    `tests/` has a conftest too, and the module name would be ambiguous)."""

    CaseSkipped = CaseSkipped
    REFERENCE = REFERENCE
    TOLERANCES = TOLERANCES
    count_flops = staticmethod(count_flops)
    memory_probe = staticmethod(memory_probe)
    parity = staticmethod(parity)
    require_memory = staticmethod(require_memory)
    param_bytes = staticmethod(param_bytes)
    sync = staticmethod(sync)
    timing_of = staticmethod(timing_of)


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    return Kit
