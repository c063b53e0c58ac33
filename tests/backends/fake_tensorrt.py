"""A versioned stand-in for TensorRT 10.x, TensorRT 11.x and TensorRT-RTX 1.x, for CPU tests only.

Injected as ``sys.modules["tensorrt"]`` (or ``["tensorrt_rtx"]``) by the `fake` fixture of
tests/backends/test_tensorrt.py; its own name is ``fake_tensorrt``, so nothing outside the tests
can import it as TensorRT. `reset(version, cc, flavour)` picks the API surface:

* **10.x** (``reset("10.16.1.11")``; ``"10.0.1"`` for the oldest): the weakly/strongly typed
  builder (BuilderFlag FP16 = 0 ... REFIT_IDENTICAL = 20, STRONGLY_TYPED = 1), V1 memory and
  weight-streaming calls (deprecated from 10.1, with DeprecationWarning), V2 calls from 10.1;
* **11.x** (``reset("11.4.0.106")``): strongly typed only, precision flags gone and the rest
  renumbered (STRIP_PLAN 18, REFIT_IDENTICAL 19, WEIGHT_STREAMING 20; STRONGLY_TYPED = 0, ignored),
  V1 memory / budget calls, ``create_execution_context_without_device_memory`` and
  ``OnnxParser.supports_model`` removed;
* **TensorRT-RTX 1.x** (``reset("1.7.1.116", flavour="tensorrt-rtx")``): the 11.x surface plus
  ``ComputeCapability`` / ``set_compute_capability``, ``create_runtime_config``, runtime caches
  and just-in-time compilation at ``create_execution_context(runtime_config)``.

What a version lacks raises AttributeError, like the real module. Failures are reported the way
TensorRT reports them (None, False, -1, RuntimeError; message through the logger). Plans hold the
ONNX graph (and its weights unless stripped) and execute through ONNX Runtime, so results are real;
"GPU" memory is CPU memory read and written with ctypes, and execution scribbles over the whole
arena it was given. `FakeCuda` stands in for the backend's CUDA seam and counts host syncs.

Refusals **confirmed by NVIDIA's documents** (source in brackets; NVIDIA/TensorRT at v10.x/v11.1
unless said): None from build_serialized_network / deserialize_cuda_engine and False from
set_input_shape / set_tensor_address (unknown name) / execute_async_v3 / refit_cuda_engine / parse
(NvInferRuntime.h, NvInfer.h); -1 from add_optimization_profile and RuntimeError from
IOptimizationProfile.set_shape, set_optimization_profile_async, infer_shapes (pyCore.cpp);
STRONGLY_TYPED + FP16 fails the build (NVIDIA/TensorRT#4253); a plan loads only on the version and
compute capability that built it (docs.nvidia.com TensorRT "Version Compatibility"); the 11.x
removals and renumbering (NvInfer.h v11.1; docs.nvidia.com "Migrating from TensorRT 10.x to 11.x");
V1/V2 memory calls by version (pyCore.cpp v10.0.0, v10.1.0, v11.0); weight_streaming_budget_v2
"cannot be modified while there are active IExecutionContexts" (NvInferRuntime.h; the Python
setter drops the False, so the stand-in logs an error and keeps the old budget); REFIT_IDENTICAL
refitted with other weights is undefined (NvInfer.h); TensorRT-RTX runtime config / cache calls
(NVIDIA/TensorRT-RTX samples/apiUsage/python/api_usage.py; docs.nvidia.com TensorRT-RTX "Working
with Runtime Cache").

Refusals that are **ours** (stricter than anything documented, so that a runtime defect shows):
a refittable build with more than one optimisation profile fails (NvInfer.h says
addOptimizationProfile "may be called at most once when building a refittable engine"; whether the
real builder refuses is unconfirmed); set_tensor_address / set_device_memory refuse addresses not
256-byte aligned (documented as a requirement, the refusal is not); an enqueue on a USER_MANAGED
context without enough device memory fails; a stripped plan run before its refit fails; writes to
output buffers are bounded by the shapes `context.get_tensor_shape` reported (an overflow is an
AssertionError, never memory corruption); a CUDA graph replayed after the context's input shapes
changed, or device memory used after the backend retired it (`FakeCuda.retire`), is an
AssertionError; a TensorRT plan given to TensorRT-RTX (or the reverse) fails to deserialise
(real plans differ in format; the exact message is not documented); TensorRT-RTX weight streaming
and V2 memory calls behave as TensorRT 11's (unconfirmed).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import enum
import hashlib
import json
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

MAGIC = b"FAKETRT-PLAN\n"
CACHE_MAGIC = b"FAKETRT-CACHE\n"
__version__ = "10.7.0"
__name_as_imported__ = "tensorrt"


@dataclass
class State:
    """Module-wide knobs and records; `reset` gives each test a fresh one."""

    version: str = "10.7.0"
    cc: tuple[int, int] = (8, 9)
    flavour: str = "tensorrt"
    retired: list = field(default_factory=list)  # (ptr, nbytes) the backend freed
    jit_compiles: int = 0
    fail_build: bool = False
    fail_context: bool = False
    calls: list = field(default_factory=list)
    default_stream_enqueues: int = 0
    executions: int = 0
    replays: int = 0
    host_syncs: int = 0
    capturing: int | None = None
    captured: list = field(default_factory=list)
    contexts: list = field(default_factory=list)


STATE = State()


def reset(version: str = "10.7.0", cc: tuple[int, int] = (8, 9), flavour: str = "tensorrt") -> State:
    """A fresh state and the API surface of `flavour` `version` (see the module docstring)."""
    global STATE, __version__, __name_as_imported__, BuilderFlag, NetworkDefinitionCreationFlag
    STATE = State(version=version, cc=cc, flavour=flavour)
    __version__ = version
    __name_as_imported__ = "tensorrt_rtx" if flavour == "tensorrt-rtx" else "tensorrt"
    eleven = _strong_only()
    BuilderFlag = BuilderFlag11 if eleven else BuilderFlag10
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag11 if eleven else NetworkDefinitionCreationFlag10
    module = globals()
    if _rtx():
        module["ComputeCapability"] = _ComputeCapability
    else:
        module.pop("ComputeCapability", None)
    return STATE


def _rtx() -> bool:
    return STATE.flavour == "tensorrt-rtx"


def _v() -> tuple[int, int]:
    major, minor = STATE.version.split(".")[:2]
    return int(major), int(minor)


def _strong_only() -> bool:
    """TensorRT 11.x and TensorRT-RTX: strongly typed networks only, the 11.x flag numbering."""
    return _rtx() or _v() >= (11, 0)


def _missing(what: str) -> AttributeError:
    return AttributeError(f"'{__name_as_imported__}' {STATE.version} has no attribute {what!r}")


def _since(version: tuple[int, int], what: str) -> None:
    if not _rtx() and _v() < version:
        raise _missing(what)


def _until(version: tuple[int, int], what: str) -> None:
    """Removed in `version` (and absent in TensorRT-RTX)."""
    if _rtx() or _v() >= version:
        raise _missing(what)


def _rtx_only(what: str) -> None:
    if not _rtx():
        raise _missing(what)


def _deprecated(since: tuple[int, int], instead: str) -> None:
    if _v() >= since:
        warnings.warn(f"Use {instead} instead.", DeprecationWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------- enums

class BuilderFlag10(enum.IntEnum):
    """TensorRT 10.x (NvInfer.h v10.16)."""

    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10
    DIRECT_IO = 11
    VERSION_COMPATIBLE = 13
    EXCLUDE_LEAN_RUNTIME = 14
    FP8 = 15
    ERROR_ON_TIMING_CACHE_MISS = 16
    BF16 = 17
    DISABLE_COMPILATION_CACHE = 18
    STRIP_PLAN = 19
    WEIGHTLESS = 19
    REFIT_IDENTICAL = 20
    WEIGHT_STREAMING = 21
    INT4 = 22
    REFIT_INDIVIDUAL = 23
    FP4 = 26


class BuilderFlag11(enum.IntEnum):
    """TensorRT 11.x (NvInfer.h v11.1) and TensorRT-RTX: no precision flags, renumbered."""

    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    DIRECT_IO = 11
    VERSION_COMPATIBLE = 12
    EXCLUDE_LEAN_RUNTIME = 13
    ERROR_ON_TIMING_CACHE_MISS = 15
    DISABLE_COMPILATION_CACHE = 17
    STRIP_PLAN = 18
    REFIT_IDENTICAL = 19
    WEIGHT_STREAMING = 20
    REFIT_INDIVIDUAL = 22
    STRICT_NANS = 23
    MONITOR_MEMORY = 24
    EDITABLE_TIMING_CACHE = 26
    DISTRIBUTIVE_INDEPENDENCE = 27


class NetworkDefinitionCreationFlag10(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class NetworkDefinitionCreationFlag11(enum.IntEnum):
    STRONGLY_TYPED = 0  # deprecated and ignored: every network is strongly typed
    PREFER_JIT_PYTHON_PLUGINS = 1
    PREFER_AOT_PYTHON_PLUGINS = 2


class _ComputeCapability(enum.IntEnum):
    """TensorRT-RTX build targets (api_usage.py: CURRENT, SM75, SM89, SM120)."""

    NONE = 0
    CURRENT = 1
    SM75 = 75
    SM80 = 80
    SM86 = 86
    SM89 = 89
    SM120 = 120


BuilderFlag = BuilderFlag10
NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag10


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64, DataType.INT32: np.int32,
       DataType.INT8: np.int8, DataType.UINT8: np.uint8, DataType.BOOL: np.bool_}
_ONNX_TYPES = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
               onnx.TensorProto.INT64: DataType.INT64, onnx.TensorProto.INT32: DataType.INT32,
               onnx.TensorProto.BFLOAT16: DataType.BF16, onnx.TensorProto.BOOL: DataType.BOOL}


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity, msg: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = ILogger.Severity

    def __init__(self, min_severity=ILogger.Severity.WARNING) -> None:
        super().__init__()
        self.min_severity, self.messages = min_severity, []

    def log(self, severity, msg: str) -> None:
        self.messages.append((severity, msg))


def _error(logger, msg: str) -> None:
    logger.log(ILogger.Severity.ERROR, msg)


class Dims(tuple):
    pass


class HostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


# ------------------------------------------------------------------------------- builder and parser

@dataclass
class _Tensor:
    name: str
    dtype: DataType
    shape: tuple[int, ...]


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.strongly_typed = _strong_only() or bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.model: onnx.ModelProto | None = None

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> _Tensor:
        return self.outputs[i]


class ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 with name: and operator: () ERROR: {self._desc}"


def _value_info(v) -> _Tensor:
    t = v.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return _Tensor(v.name, _ONNX_TYPES[t.elem_type], shape)


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger) -> None:
        self.network, self.logger, self.errors = network, logger, []

    def parse_from_file(self, model: str) -> bool:
        STATE.calls.append(("parse_from_file", model))
        try:
            m = onnx.load(model)  # external data resolved beside the file, like TensorRT
        except Exception as err:  # noqa: BLE001
            self.errors.append(ParserError(f"could not read {model}: {err}"))
            return False
        inits = {i.name for i in m.graph.initializer}
        self.network.inputs = [_value_info(v) for v in m.graph.input if v.name not in inits]
        self.network.outputs = [_value_info(v) for v in m.graph.output]
        self.network.model = m
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]

    def supports_model(self, model: bytes, path: str | None = None):
        _until((11, 0), "supports_model")  # deprecated 10.1, removed 11.0
        _deprecated((10, 1), "supports_model_v2")
        return True, []


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 - the real parameter names
        lo, mid, hi = tuple(min), tuple(opt), tuple(max)
        if not (len(lo) == len(mid) == len(hi)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        if any(not 0 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        self.shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str):  # noqa: A002
        return [Dims(s) for s in self.shapes.get(input, ())]

    def __bool__(self) -> bool:
        return bool(self.shapes)


class ITimingCache:
    def __init__(self, cc, version, entries) -> None:
        self.cc, self.version, self.entries = tuple(cc), version, dict(entries)

    def serialize(self) -> HostMemory:
        return HostMemory(CACHE_MAGIC + json.dumps({"cc": self.cc, "version": self.version,
                                                    "entries": self.entries}).encode())


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags = 1 << int(BuilderFlag.TF32)  # "Enabled by default"
        self._targets: dict[int, int] = {}
        self.pools: dict = {}
        self.builder_optimization_level = 3
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    @property
    def num_compute_capabilities(self) -> int:
        _rtx_only("num_compute_capabilities")
        return len(self._targets)

    @num_compute_capabilities.setter
    def num_compute_capabilities(self, n: int) -> None:
        _rtx_only("num_compute_capabilities")
        self._targets = {i: self._targets.get(i, 0) for i in range(n)}

    def set_compute_capability(self, cc, index: int) -> bool:
        _rtx_only("set_compute_capability")
        if index not in self._targets:
            return False
        self._targets[index] = int(cc)
        return True

    def set_flag(self, flag) -> None:
        if not isinstance(flag, BuilderFlag):  # a flag of another version's enum
            raise TypeError(f"set_flag(): incompatible function arguments: {flag!r}")
        self.flags |= 1 << int(flag)

    def clear_flag(self, flag) -> None:
        self.flags &= ~(1 << int(flag))

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        if pool_size < 0:
            return  # TensorRT records an error and changes nothing
        self.pools[pool] = pool_size

    def get_memory_pool_limit(self, pool) -> int:
        return self.pools.get(pool, 80 << 30)  # default: the device's memory

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(STATE.cc, STATE.version, {})
        if not data.startswith(CACHE_MAGIC):
            return None
        d = json.loads(data[len(CACHE_MAGIC):])
        return ITimingCache(d["cc"], d["version"], d["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not ignore_mismatch and (cache.cc != tuple(STATE.cc) or cache.version != STATE.version):
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


def _strip(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        init.ClearField("raw_data")
        for f in ("float_data", "int64_data", "int32_data", "double_data"):
            init.ClearField(f)
    return m


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _nbytes(init) -> int:
    return int(np.prod(init.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


class Builder:
    def __init__(self, logger) -> None:
        self.logger = logger
        STATE.calls.append(("Builder",))

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> HostMemory | None:
        STATE.calls.append(("build", [i.name for i in network.inputs], config.flags))
        problem = self._problem(network, config)
        if problem:
            _error(self.logger, f"IBuilder::buildSerializedNetwork: Error Code 3: API Usage Error ({problem})")
            return None
        if config.timing_cache is not None:
            config.timing_cache.entries[network.model.graph.name or "graph"] = len(network.model.graph.node)
        refit = ("full" if config.get_flag(BuilderFlag.REFIT) else
                 "identical" if config.get_flag(BuilderFlag.REFIT_IDENTICAL) or config.get_flag(BuilderFlag.STRIP_PLAN)
                 else "none")
        stripped = config.get_flag(BuilderFlag.STRIP_PLAN)
        plan = {
            "version": STATE.version, "cc": list(STATE.cc), "flavour": STATE.flavour,
            "flags": sorted(f.name for f in BuilderFlag if config.get_flag(f)),
            "inputs": [[t.name, int(t.dtype), list(t.shape)] for t in network.inputs],
            "outputs": [[t.name, int(t.dtype), list(t.shape)] for t in network.outputs],
            "profiles": [{n: [list(s) for s in p.shapes[n]] for n in p.shapes} for p in config.profiles],
            "refit": refit, "stripped": stripped,
            "streaming": config.get_flag(BuilderFlag.WEIGHT_STREAMING),
            "built_weights": {k: _digest(v) for k, v in _weights(network.model).items()},
            "model_digest": hashlib.sha256(_strip(network.model).SerializeToString()).hexdigest()[:16],
            "model": base64.b64encode((_strip(network.model) if stripped else network.model)
                                      .SerializeToString()).decode(),
        }
        return HostMemory(MAGIC + json.dumps(plan).encode())

    @staticmethod
    def _problem(network: INetworkDefinition, config: IBuilderConfig) -> str | None:
        if STATE.fail_build:
            return "out of memory while building (forced by the test)"
        if network.model is None:
            return "the network is empty"
        precision = [getattr(BuilderFlag, n) for n in ("FP16", "BF16", "INT8") if hasattr(BuilderFlag, n)]
        if network.strongly_typed and any(config.get_flag(f) for f in precision):
            return "Parameter check failed, condition: !config.getFlag(BuilderFlag::kFP16)"
        refittable = any(config.get_flag(f) for f in (BuilderFlag.REFIT, BuilderFlag.REFIT_IDENTICAL,
                                                      BuilderFlag.STRIP_PLAN))
        if refittable and len(config.profiles) > 1:
            return ("(stand-in) more than one optimization profile in a refittable engine (NvInfer.h: "
                    "addOptimizationProfile may be called at most once when building a refittable engine)")
        if config.get_flag(BuilderFlag.WEIGHT_STREAMING) and not network.strongly_typed:
            return "weight streaming needs a strongly typed network"
        if config.get_flag(BuilderFlag.REFIT_INDIVIDUAL) and config.get_flag(BuilderFlag.REFIT):
            return "REFIT_INDIVIDUAL cannot be combined with REFIT"
        dynamic = [t for t in network.inputs if -1 in t.shape]
        if dynamic and not config.profiles:
            return "Network has dynamic or shape inputs, but no optimization profile has been defined."
        for i, p in enumerate(config.profiles):
            for t in network.inputs:
                if t.name not in p.shapes:
                    if -1 in t.shape:
                        return f"optimization profile {i} is missing values for dynamic input {t.name}"
                    continue
                for s in p.shapes[t.name]:
                    if len(s) != len(t.shape) or any(d not in (-1, v) for d, v in zip(t.shape, s)):
                        return f"profile {i}: {t.name} shape {s} does not match the network's {t.shape}"
        return None


# --------------------------------------------------------------------------------- runtime, engine

class Runtime:
    def __init__(self, logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                "assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        try:
            plan = json.loads(data[len(MAGIC):])
        except ValueError:
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (truncated plan)")
            return None
        if plan.get("flavour", "tensorrt") != STATE.flavour:
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                "assertion plan flavour failed: a plan of another TensorRT flavour)")
            return None
        if plan["version"] != STATE.version:
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                "assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match.)")
            return None
        if tuple(plan["cc"]) != tuple(STATE.cc):
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 6: The engine plan file is generated on "
                                f"an incompatible device, expecting compute {STATE.cc[0]}.{STATE.cc[1]} got compute "
                                f"{plan['cc'][0]}.{plan['cc'][1]}, please rebuild.")
            return None
        return ICudaEngine(plan, self.logger)


class ICudaEngine:
    def __init__(self, plan: dict, logger) -> None:
        self.plan, self.logger = plan, logger
        self.model = onnx.load_from_string(base64.b64decode(plan["model"]))
        self.missing = {i.name for i in self.model.graph.initializer} if plan["stripped"] else set()
        self.io = {n: (TensorIOMode.INPUT, DataType(d), tuple(s)) for n, d, s in plan["inputs"]}
        self.io.update({n: (TensorIOMode.OUTPUT, DataType(d), tuple(s)) for n, d, s in plan["outputs"]})
        self.names = [n for n, _, _ in plan["inputs"]] + [n for n, _, _ in plan["outputs"]]
        self.streamable = sum(_nbytes(i) for i in self.model.graph.initializer) if plan["streaming"] else 0
        self._budget = self.streamable
        self._session = None
        self._contexts: weakref.WeakSet = weakref.WeakSet()
        self._output_shapes: dict[tuple, dict[str, tuple]] = {}

    # I/O by name
    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: max(1, len(self.plan["profiles"])))
    refittable = property(lambda self: self.plan["refit"] != "none")

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def __getitem__(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io.get(name, (TensorIOMode.NONE,))[0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][1] if name in self.io else DataType.FLOAT  # silently FLOAT, like TensorRT

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self.io[name][2]) if name in self.io else Dims()

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        try:
            return [Dims(s) for s in self.plan["profiles"][profile_index][name]]
        except (IndexError, KeyError):
            return [Dims((-1,))] * 3

    # device memory: activations grow with the profile's largest shapes (a stand-in formula)
    def _profile_bytes(self, index: int) -> int:
        shapes = self.plan["profiles"][index]
        n = sum(int(np.prod(shapes[t][2])) * np.dtype(_NP[self.io[t][1]]).itemsize for t in shapes)
        scratch = (1 << 16) if self.streamable and self._budget < self.streamable else 0
        return -(-(8 * n + 4096 + scratch) // 256) * 256

    @property
    def device_memory_size(self) -> int:
        _until((11, 0), "device_memory_size")
        _deprecated((10, 1), "device_memory_size_v2")
        return max(self._profile_bytes(i) for i in range(len(self.plan["profiles"])))

    @property
    def device_memory_size_v2(self) -> int:
        _since((10, 1), "device_memory_size_v2")
        return max(self._profile_bytes(i) for i in range(len(self.plan["profiles"])))

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        _until((11, 0), "get_device_memory_size_for_profile")
        _deprecated((10, 1), "get_device_memory_size_for_profile_v2")
        return self._profile_bytes(profile_index)

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        _since((10, 1), "get_device_memory_size_for_profile_v2")
        return self._profile_bytes(profile_index)

    # weight streaming
    @property
    def streamable_weights_size(self) -> int:
        _since((10, 1), "streamable_weights_size")
        return self.streamable

    @property
    def weight_streaming_budget_v2(self) -> int:
        _since((10, 1), "weight_streaming_budget_v2")
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value: int) -> None:
        _since((10, 1), "weight_streaming_budget_v2")
        if not self.plan["streaming"]:
            _error(self.logger, "ICudaEngine::setWeightStreamingBudgetV2: engine was not built with kWEIGHT_STREAMING")
        elif value < 0:
            _error(self.logger, "ICudaEngine::setWeightStreamingBudgetV2: budget must be >= 0")
        elif len(self._contexts):
            _error(self.logger, "ICudaEngine::setWeightStreamingBudgetV2: the weights streaming budget cannot be "
                                "modified while there are active IExecutionContexts")
        else:
            self._budget = min(int(value), self.streamable)

    def create_runtime_config(self) -> IRuntimeConfig:
        _since((10, 11), "create_runtime_config")
        return IRuntimeConfig()

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> IExecutionContext | None:
        config = strategy if isinstance(strategy, IRuntimeConfig) else None
        if config is not None:
            strategy = config.strategy
        elif _rtx():
            strategy = ExecutionContextAllocationStrategy(strategy)  # pybind overload; JIT without a cache
        STATE.calls.append(("create_execution_context", ExecutionContextAllocationStrategy(strategy).name))
        if STATE.fail_context:
            _error(self.logger, "IExecutionContext creation failed: Cuda Runtime (out of memory)")
            return None
        if _rtx():  # just-in-time compilation for this GPU, reusing what the runtime cache holds
            cache = config.cache if config is not None else None
            key = f"{self.plan['model_digest']}@sm{STATE.cc[0]}{STATE.cc[1]}"
            if cache is None or key not in cache.kernels:
                STATE.jit_compiles += 1
                if cache is not None:
                    cache.kernels.add(key)
        ctx = IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))
        STATE.contexts.append(ctx)
        self._contexts.add(ctx)
        return ctx

    def create_execution_context_without_device_memory(self) -> IExecutionContext | None:
        _until((11, 0), "create_execution_context_without_device_memory")
        _deprecated((10, 0), "create_execution_context")
        return self.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)

    def serialize(self) -> HostMemory:
        plan = dict(self.plan, model=base64.b64encode(self.model.SerializeToString()).decode())
        return HostMemory(MAGIC + json.dumps(plan).encode())

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            self._session = ort.InferenceSession(self.model.SerializeToString(), so,
                                                 providers=["CPUExecutionProvider"])
        return self._session.run(None, feeds)


# ------------------------------------------------------------------------- runtime config (RTX, 10.11+)

class IRuntimeCache:
    """TensorRT-RTX's cache of just-in-time kernels: serialises to bytes tagged with the version and
    GPU; `deserialize` refuses a cache of another GPU or of a newer version (NVIDIA's checks)."""

    def __init__(self) -> None:
        self.kernels: set[str] = set()

    def serialize(self) -> HostMemory:
        return HostMemory(CACHE_MAGIC + json.dumps({"version": STATE.version, "cc": list(STATE.cc),
                                                    "kernels": sorted(self.kernels)}).encode())

    def deserialize(self, blob) -> bool:
        data = bytes(blob)
        if not data.startswith(CACHE_MAGIC):
            return False
        try:
            d = json.loads(data[len(CACHE_MAGIC):])
        except ValueError:
            return False
        newer = tuple(int(x) for x in d["version"].split(".")[:3]) > tuple(int(x) for x in STATE.version.split(".")[:3])
        if tuple(d["cc"]) != tuple(STATE.cc) or newer:
            return False
        self.kernels = set(d["kernels"])
        return True

    def reset(self) -> bool:
        self.kernels.clear()
        return True


class IRuntimeConfig:
    def __init__(self) -> None:
        self.strategy = ExecutionContextAllocationStrategy.STATIC
        self.cache: IRuntimeCache | None = None

    def set_execution_context_allocation_strategy(self, strategy) -> None:
        self.strategy = ExecutionContextAllocationStrategy(strategy)

    def get_execution_context_allocation_strategy(self):
        return self.strategy

    def create_runtime_cache(self) -> IRuntimeCache:
        _rtx_only("create_runtime_cache")
        return IRuntimeCache()

    def set_runtime_cache(self, cache: IRuntimeCache) -> bool:
        _rtx_only("set_runtime_cache")
        self.cache = cache
        return True

    def get_runtime_cache(self) -> IRuntimeCache | None:
        _rtx_only("get_runtime_cache")
        return self.cache


# ----------------------------------------------------------------------------------------- refit

class Refitter:
    def __init__(self, engine: ICudaEngine, logger) -> None:
        self.engine, self.logger = engine, logger
        self.staged: dict[str, np.ndarray] = {}

    def get_all_weights(self) -> list[str]:
        return [i.name for i in self.engine.model.graph.initializer]

    def set_named_weights(self, name: str, weights) -> bool:
        arr = np.asarray(weights)
        proto = self.engine.model.graph.initializer
        dims = {i.name: (tuple(i.dims), i.data_type) for i in proto}
        if name not in dims:
            _error(self.logger, f"IRefitter::setNamedWeights: {name} is not a refittable weight")
            return False
        if tuple(arr.shape) != dims[name][0] or onnx.helper.np_dtype_to_tensor_dtype(arr.dtype) != dims[name][1]:
            _error(self.logger, f"IRefitter::setNamedWeights: {name} has a different size or type than the prototype")
            return False
        self.staged[name] = arr
        return True

    def get_missing_weights(self) -> list[str]:
        return sorted(self.engine.missing - set(self.staged))

    def refit_cuda_engine(self) -> bool:
        e = self.engine
        if not e.refittable:
            _error(self.logger, "IRefitter::refitCudaEngine: the engine is not refittable")
            return False
        if self.get_missing_weights():
            _error(self.logger, f"IRefitter::refitCudaEngine: missing weights {self.get_missing_weights()[:3]}")
            return False
        if e.plan["refit"] == "identical":
            changed = [n for n, a in self.staged.items() if _digest(a) != e.plan["built_weights"][n]]
            if changed:
                _error(self.logger, f"(stand-in) refitting a REFIT_IDENTICAL engine with other weights "
                                    f"({changed[:3]}) is undefined behaviour in TensorRT")
                return False
        for init in e.model.graph.initializer:
            if init.name in self.staged:
                init.CopyFrom(numpy_helper.from_array(self.staged[init.name], init.name))
        e.missing -= set(self.staged)
        e._session = None
        STATE.calls.append(("refit", len(self.staged)))
        return True


class OnnxParserRefitter:
    def __init__(self, refitter: Refitter, logger) -> None:
        self.refitter, self.logger, self.errors = refitter, logger, []

    def refit_from_file(self, model: str) -> bool:
        try:
            weights = _weights(onnx.load(model))
        except Exception as err:  # noqa: BLE001
            self.errors.append(ParserError(f"could not read {model}: {err}"))
            return False
        ok = True
        for name in self.refitter.get_all_weights():
            if name not in weights or not self.refitter.set_named_weights(name, weights[name]):
                self.errors.append(ParserError(f"weight {name} missing or of another shape in {model}"))
                ok = False
        return ok

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]


# -------------------------------------------------------------------------------- execution context

def _read(ptr: int, shape: tuple, dtype: DataType) -> np.ndarray:
    np_dtype = np.dtype(_NP[dtype])
    n = int(np.prod(shape)) * np_dtype.itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=np_dtype).reshape(shape).copy()


def _write(ptr: int, value: np.ndarray, declared: tuple, name: str) -> None:
    """Write an output, never past what `get_tensor_shape` declared (the runtime sized its buffer
    from that): a larger result is an AssertionError here, not memory corruption."""
    value = np.ascontiguousarray(value)
    assert tuple(value.shape) == tuple(declared), (
        f"stand-in: output {name} is {tuple(value.shape)}, but get_tensor_shape declared {tuple(declared)}")
    ctypes.memmove(ptr, value.ctypes.data, value.nbytes)


def _revive(ptr: int, nbytes: int) -> None:
    """Memory handed to a context again is live (the allocator may reuse a retired address)."""
    STATE.retired = [(old, size) for old, size in STATE.retired if not (ptr < old + size and old < ptr + nbytes)]


def _assert_live(ptr: int, nbytes: int, what: str) -> None:
    for old, size in STATE.retired:
        assert not (ptr < old + size and old < ptr + nbytes), (
            f"stand-in: {what} uses device memory {ptr:#x} that the backend freed (retired {old:#x}+{size})")


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.active_optimization_profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.calls: list = []

    def _err(self, msg: str) -> None:
        _error(self.engine.logger, msg)

    @property
    def device_memory(self):
        raise AttributeError("unreadable attribute")  # write-only in TensorRT

    @device_memory.setter
    def device_memory(self, ptr: int) -> None:
        self.calls.append(("device_memory", ptr))
        self.memory = (ptr, None)
        _revive(ptr, 1)

    def set_device_memory(self, memory: int, size: int) -> None:
        _since((10, 1), "set_device_memory")
        self.calls.append(("set_device_memory", memory, size))
        if memory % 256:
            self._err("IExecutionContext::setDeviceMemoryV2: memory must be 256-byte aligned")
            return
        self.memory = (memory, size)
        _revive(memory, size)

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self.calls.append(("set_optimization_profile_async", profile_index))
        if not 0 <= profile_index < len(self.engine.plan["profiles"]):
            raise RuntimeError("Error in set optimization profile async.")
        self.active_optimization_profile = profile_index
        self.shapes.clear()
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        self.calls.append(("set_input_shape", name, shape))
        io = self.engine.io.get(name)
        if io is None or io[0] != TensorIOMode.INPUT:
            self._err(f"IExecutionContext::setInputShape: Error Code 3: {name} is not an input")
            return False
        lo, _, hi = self.engine.plan["profiles"][self.active_optimization_profile][name]
        if (len(shape) != len(io[2]) or any(d not in (-1, v) for d, v in zip(io[2], shape))
                or any(not a <= v <= b for a, v, b in zip(lo, shape, hi))):
            self._err(f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter check failed, "
                      f"{name} shape {shape} is outside profile {self.active_optimization_profile} [{lo}, {hi}])")
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls.append(("set_tensor_address", name, memory))
        if name not in self.engine.io:
            self._err(f"IExecutionContext::setTensorAddress: {name} is not an I/O tensor")
            return False
        if memory % 256:
            self._err(f"IExecutionContext::setTensorAddress: address of {name} must have 256-byte alignment")
            return False
        self.addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def infer_shapes(self) -> list[str]:
        """Names of inputs whose shapes are still unknown ([] when every output shape is known)."""
        return [n for n, (m, _, _) in self.engine.io.items() if m == TensorIOMode.INPUT and n not in self.shapes]

    def get_tensor_shape(self, name: str) -> Dims:
        """Inputs: as set. Outputs: resolved from the input shapes (by a run of the graph on zeros, once
        per input shape); -1 dims until every input shape is set."""
        e = self.engine
        if name not in e.io:
            return Dims((-1,))
        if e.io[name][0] == TensorIOMode.INPUT:
            return Dims(self.shapes.get(name, e.io[name][2]))
        if self.infer_shapes():
            return Dims(e.io[name][2])
        return Dims(self._output_shapes(dict(self.shapes))[name])

    def _output_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        e = self.engine
        key = tuple(sorted(shapes.items()))
        if key not in e._output_shapes:
            zeros = {n: np.zeros(s, dtype=_NP[e.io[n][1]]) for n, s in shapes.items()}
            outs = e.run(zeros)
            e._output_shapes[key] = {n: tuple(v.shape) for (n, _, _), v in zip(e.plan["outputs"], outs)}
        return e._output_shapes[key]

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute_async_v3", stream_handle))
        e = self.engine
        if stream_handle == 0:
            STATE.default_stream_enqueues += 1
            e.logger.log(ILogger.Severity.WARNING, "Using default stream in enqueueV3() may lead to performance "
                                                   "issues due to additional calls to cudaStreamSynchronize()")
        if e.missing:
            self._err("IExecutionContext::enqueueV3: the engine's weights were stripped and not refitted")
            return False
        need = e._profile_bytes(self.active_optimization_profile)
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED:
            if self.memory is None:
                self._err("IExecutionContext::enqueueV3: no device memory was set (USER_MANAGED)")
                return False
            if self.memory[1] is not None and self.memory[1] < need:
                self._err(f"IExecutionContext::enqueueV3: device memory {self.memory[1]} < required {need}")
                return False
        inputs = [n for n, (m, _, _) in e.io.items() if m == TensorIOMode.INPUT]
        unset = [n for n in inputs if n not in self.shapes] + [n for n in e.io if n not in self.addresses]
        if unset:
            self._err(f"IExecutionContext::enqueueV3: shapes or addresses not set for {unset}")
            return False
        snapshot = (dict(self.shapes), dict(self.addresses), self.memory, need)
        if STATE.capturing == stream_handle:
            if e.plan["streaming"] and e._budget < e.streamable:
                self._err("enqueueV3 is synchronous while weights stream and cannot be captured")
                return False
            STATE.captured.append(lambda: self._replay(*snapshot))
            return True
        self._compute(*snapshot)
        return True

    def _replay(self, shapes, addresses, memory, need) -> None:
        assert dict(self.shapes) == shapes, (
            f"stand-in: a CUDA graph captured with input shapes {shapes} replayed while the context has "
            f"{dict(self.shapes)}")
        self._compute(shapes, addresses, memory, need)

    def _compute(self, shapes, addresses, memory, need) -> None:
        e = self.engine
        declared = self._output_shapes(shapes)
        feeds = {n: _read(addresses[n], shapes[n], e.io[n][1]) for n in shapes}
        if memory is not None:  # activations overwrite the whole arena
            _assert_live(memory[0], need, "the context's activation memory")
            ctypes.memset(memory[0], 0x5A, need)
        outs = e.run(feeds)
        for (name, _, _), value in zip(e.plan["outputs"], outs):
            _write(addresses[name], value.astype(_NP[e.io[name][1]]), declared[name], name)
        STATE.executions += 1


# ------------------------------------------------------------------------------------- CUDA seam

class FakeStream:
    _next = 0x1000

    def __init__(self, handle: int | None = None) -> None:
        if handle is None:
            FakeStream._next += 0x100
            handle = FakeStream._next
        self.cuda_stream = handle
        self.waited_on: list[int] = []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_on.append(other.cuda_stream)

    def synchronize(self) -> None:
        STATE.host_syncs += 1


class FakeCuda:
    """The backend's CUDA seam on the CPU: the caller's stream is the legacy default stream (handle 0),
    engine streams get non-zero handles, graph capture records the enqueued work for replay."""

    def __init__(self, name: str = "NVIDIA Fake GPU", capture_fails: bool = False) -> None:
        self.name, self.capture_fails = name, capture_fails
        self.caller = FakeStream(0)
        self.streams: list[FakeStream] = []
        self.captures = 0

    def is_available(self) -> bool:
        return True

    def device(self) -> torch.device:
        return torch.device("cpu")

    def target(self, trt_version: str, flavour: str = "tensorrt"):
        from supir_rt.backends.manifest import GpuTarget

        return GpuTarget(self.name, tuple(STATE.cc), trt_version, flavour)

    def retire(self, ptr: int, nbytes: int) -> None:
        STATE.retired.append((ptr, nbytes))

    def new_stream(self, device) -> FakeStream:
        s = FakeStream()
        self.streams.append(s)
        return s

    def current_stream(self, device) -> FakeStream:
        return self.caller

    def use_stream(self, stream):
        return contextlib.nullcontext()

    def record_stream(self, tensor, stream) -> None:
        pass

    def capture(self, run, stream):
        self.captures += 1
        STATE.capturing, STATE.captured = stream.cuda_stream, []
        try:
            if self.capture_fails:
                raise RuntimeError("operation not permitted when stream is capturing")
            run()
        finally:
            STATE.capturing = None
        recorded = list(STATE.captured)
        if not recorded:
            raise RuntimeError("empty graph")

        def replay() -> None:
            STATE.replays += 1
            for work in recorded:
                work()

        return replay
