"""Which TensorRT is installed, and every call whose spelling depends on it (the only place that branches).

Two flavours share one runtime: **TensorRT** 10.x and 11.x (``import tensorrt``) and **TensorRT-RTX**
1.x (``import tensorrt_rtx``, GeForce/RTX workstation GPUs). What differs between them, each fact
with its source (docs/engines.md has the table):

* network flags: 10.x needs ``STRONGLY_TYPED`` for a strongly typed network; 11.x makes every network
  strongly typed and keeps that flag only as an ignored, deprecated value (NVIDIA "Migrating from
  TensorRT 10.x to 11.x"); TensorRT-RTX is strongly typed only and its sample still passes the flag
  "to avoid warning" (NVIDIA/TensorRT-RTX samples/apiUsage/python/api_usage.py). No precision flag is
  ever set: precision comes from the ONNX file (11.x removed FP16/BF16/INT8/... flags);
* activation memory: 10.0 has only the V1 calls (``get_device_memory_size_for_profile``, the
  ``device_memory`` setter); 10.1+ adds the V2 calls, which 11.x keeps while removing V1
  (NVIDIA/TensorRT python/src/infer/pyCore.cpp at v10.0.0, v10.1.0, v11.0);
* weight streaming: V1 budget in 10.0 only, ``weight_streaming_budget_v2`` from 10.1;
* contexts: TensorRT-RTX compiles kernels just in time at ``create_execution_context(runtime_config)``
  and keeps them in a runtime cache (``create_runtime_config``, ``create_runtime_cache``,
  ``set_runtime_cache``; docs.nvidia.com TensorRT-RTX "Working with Runtime Cache" and api_usage.py);
* targets: TensorRT-RTX builds for the GPU named by ``set_compute_capability`` (CURRENT here); it
  ignores the timing cache (docs.nvidia.com TensorRT-RTX), so none is kept for it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from typing import Any, Literal

log = logging.getLogger(__name__)

Flavour = Literal["tensorrt", "tensorrt-rtx"]
FLAVOURS: tuple[Flavour, ...] = ("tensorrt", "tensorrt-rtx")


@dataclasses.dataclass(frozen=True)
class FlavourInfo:
    module: str  # what `import` loads
    title: str  # how messages name it
    supported: tuple[tuple[int, int], tuple[int, int]]  # [lowest, highest) (major, minor)
    install: str  # the pip line (README and docs/engines.md say the same)
    plan_tag: str  # file-name tag before the version: <network>_<precision>_sm<cc>_<tag><version>.plan
    build_flag: str  # what export/build_engines.py needs besides --trt-only to build for it


INFO: dict[str, FlavourInfo] = {
    "tensorrt": FlavourInfo("tensorrt", "TensorRT", ((10, 0), (12, 0)),
                            "pip install 'tensorrt>=10,<12'", "trt", ""),
    "tensorrt-rtx": FlavourInfo("tensorrt_rtx", "TensorRT-RTX", ((1, 0), (2, 0)),
                                "pip install tensorrt-rtx", "rtx", " --trt-rtx"),
}


class TensorRTImportError(ImportError):
    """The TensorRT flavour asked for is not installed, or not a supported version."""


def parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise TensorRTImportError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1)), int(m.group(2))


def require(flavour: Flavour = "tensorrt"):
    """The module of `flavour` if its version is supported, else ImportError saying what to install."""
    info = INFO[flavour]
    try:
        trt = importlib.import_module(info.module)
    except ImportError as err:
        raise TensorRTImportError(f"{info.title} is not importable ({err}); install it with {info.install} on a "
                                  "machine with an NVIDIA GPU") from err
    version = parse_version(trt.__version__)
    lo, hi = info.supported
    if not lo <= version < hi:
        raise TensorRTImportError(f"{info.title} {trt.__version__} is installed; supir-rt needs {info.title} "
                                  f"{lo[0]}.x-{hi[0] - 1}.x: {info.install}")
    return trt


class TrtApi:
    """The calls whose spelling depends on the flavour and version; nothing else branches on them."""

    def __init__(self, trt, flavour: Flavour = "tensorrt") -> None:
        self.trt, self.flavour = trt, flavour
        self.version = parse_version(trt.__version__)
        self.rtx = flavour == "tensorrt-rtx"
        self.v2 = self.rtx or self.version >= (10, 1)  # V2 memory and weight-streaming calls
        self.strong_only = self.rtx or self.version >= (11, 0)

    # ------------------------------------------------------------------------------------- build

    def network_flags(self) -> int:
        """Creation flags of a strongly typed network (the only kind we build)."""
        if self.rtx or not self.strong_only:
            return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0  # 11.x: always strongly typed; the flag is deprecated and ignored

    def uses_timing_cache(self) -> bool:
        return not self.rtx

    def set_build_target(self, config) -> None:
        """TensorRT-RTX: compile ahead of time for the GPU present (the plan records its compute
        capability); TensorRT always builds for the GPU present."""
        if self.rtx:
            config.num_compute_capabilities = 1
            config.set_compute_capability(self.trt.ComputeCapability.CURRENT, 0)

    # ----------------------------------------------------------------------------------- runtime

    def profile_memory(self, engine, index: int) -> int:
        if self.v2:
            return int(engine.get_device_memory_size_for_profile_v2(index))
        return int(engine.get_device_memory_size_for_profile(index))

    def set_device_memory(self, context, ptr: int, size: int) -> None:
        if self.v2:
            context.set_device_memory(ptr, size)
        else:
            context.device_memory = ptr

    def set_weight_budget(self, engine, nbytes: int) -> int:
        """Set the weight-streaming budget (only while no context exists); returns what the engine
        reports back."""
        if self.v2:
            engine.weight_streaming_budget_v2 = nbytes
            return int(engine.weight_streaming_budget_v2)
        engine.weight_streaming_budget = nbytes
        return int(engine.weight_streaming_budget)

    def create_context(self, engine, runtime_cache: Any = None):
        """A USER_MANAGED context (its activations live in the shared arena). TensorRT-RTX compiles
        here, with `runtime_cache` (from `new_runtime_cache`) holding what it compiled."""
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if not self.rtx:
            return engine.create_execution_context(strategy)
        runtime_config = engine.create_runtime_config()
        if not runtime_config:
            return None
        runtime_config.set_execution_context_allocation_strategy(strategy)
        if runtime_cache is not None and not runtime_config.set_runtime_cache(runtime_cache):
            log.warning("TensorRT-RTX did not take the runtime cache; compiling without it")
        return engine.create_execution_context(runtime_config)

    def new_runtime_cache(self, engine, data: bytes):
        """A runtime cache holding `data` (a saved cache), or an empty one if `data` is empty or
        unusable (another TensorRT-RTX version or GPU: NVIDIA's compatibility checks)."""
        cache = engine.create_runtime_config().create_runtime_cache()
        if data and not cache.deserialize(data):
            log.warning("the TensorRT-RTX runtime cache does not fit this GPU or version; compiling anew")
            cache = engine.create_runtime_config().create_runtime_cache()
        return cache


__all__ = ["Flavour", "FLAVOURS", "INFO", "TrtApi", "TensorRTImportError", "parse_version", "require"]
