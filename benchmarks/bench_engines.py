"""The model the benchmarks run (parts materialised on demand) and the engines built over it."""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_memory import CaseSkipped, param_bytes, require_memory
from bench_options import PRECISIONS, BenchOptions
from supir_rt.backends.modules import NETWORK_MODULES, OWNER_MODULES
from supir_rt.backends.specs import NETWORKS, network_specs
from supir_rt.model import supir as supir_model

log = logging.getLogger("supir_rt.benchmarks")

# The part of SUPIRModel each network's positional module runs (NETWORK_MODULES wrap these).
OWNERS = OWNER_MODULES
_OWNER_SEEDS = {"first_stage_model": 1, "model": 2, "conditioner": 3}


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



def count_flops(meta_model: nn.Module, network: str, feed: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of one call (2 x MAC of conv/matmul/attention; elementwise ops not counted), on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    module = NETWORK_MODULES[network](meta_model)
    spec = network_specs(meta_model.config)[network]
    args = [feed[n].to("meta") for n in spec.input_names]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(*args)
    return int(counter.get_total_flops())



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
