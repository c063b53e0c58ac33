"""The TensorRT backend: Engines over serialized TensorRT 10.x plans, torch CUDA tensors as bindings.

Plans are built by ``python export/build_engines.py --trt`` (export/build_trt.py) and found by name,
``<network>_<precision>_sm<cc>_trt<version>.plan``; the manifest beside each records its profiles and
what it was built from, and must match this GPU, this TensorRT and the ONNX files in the folder
(`manifest.check_plan`). `tensorrt` is imported lazily: without it (or without a GPU, or with a
TensorRT outside 10.x) the backend is registered but unavailable, with the reason.

How the engines opened together run (the serving design of NVIDIA's diffusion demo):

* **One activation arena.** Contexts are created with USER_MANAGED device memory; one buffer, grown
  to the largest requirement of the (engine, profile) pairs actually used, is given to every
  context. They run one at a time on one stream, so peak VRAM is weights + the largest activation
  set, not the sum over networks.
* **Own stream, no host sync.** Work is enqueued on a stream the engines own; it waits for the
  caller's current stream before and the caller's stream waits for it after (stream-to-stream, no
  host synchronisation). Callers synchronise only when they read values on the host.
* **Engine-owned buffers.** Outputs go to 256-byte-aligned buffers the engine owns, one set per input
  shape, with stable addresses (valid until the next `infer` with that shape). Inputs are bound in
  place when they are contiguous, of the spec's dtype, on the device and 256-byte aligned; otherwise
  they are copied into an engine-owned buffer.
* **Profiles** come from the manifest; each request runs on the tightest profile containing it; a
  request outside all of them gets one error naming the profiles and the build flag that adds one.
* **CUDA graphs** (optional, `cuda_graphs=True`, `unet_adaptor` only): per input shape, after one
  plain warm-up run the next run is captured and later runs replay it; if capture fails the engine
  keeps running without a graph. Not used while weights stream (TensorRT enqueues synchronously then).
* Every TensorRT call that reports failure by its return value is checked.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from supir_rt.backends import EngineBase, register_backend
from supir_rt.backends.manifest import ArtifactError, GpuTarget, Manifest, check_plan, plan_name, rebuild_command
from supir_rt.backends.specs import NETWORKS, NetworkSpec, Profile, network_specs, select_profile
from supir_rt.config import ModelConfig
from supir_rt.errors import UserError

log = logging.getLogger(__name__)

ALIGNMENT = 256  # TensorRT: every tensor address and the device memory must be 256-byte aligned
GRAPH_NETWORKS = ("unet_adaptor",)  # the per-step call; the others run once per image
MAX_SHAPES = 8  # per engine: buffer sets (and graphs) kept for this many input shapes
SUPPORTED = "TensorRT 10.x (pip install 'tensorrt-cu12>=10.1,<11')"


class TensorRTError(ArtifactError):
    """TensorRT refused a plan or a call (or the GPU ran out of memory); the message says what and how
    to fix it. An ArtifactError, so the API and the command line report it as one clear line."""


class ProfileError(UserError):
    """A request outside every optimisation profile of a plan (a `UserError`, hence a `ValueError`:
    the message says which sizes the plans cover)."""


# ------------------------------------------------------------------------------ version and import

def trt_version(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise TensorRTError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1)), int(m.group(2))


def require_tensorrt():
    """The `tensorrt` module if it is a supported version, else ImportError saying what to install.
    11.x changes the builder API (strong typing only, renumbered flags) and its plans cannot be read
    by 10.x: this runtime is validated on 10.x only."""
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError(f"TensorRT is not importable ({err}); install {SUPPORTED} with its libraries on a "
                          "machine with an NVIDIA GPU") from err
    major, _ = trt_version(tensorrt.__version__)
    if major != 10:
        raise ImportError(f"TensorRT {tensorrt.__version__} is installed; supir-rt needs {SUPPORTED}"
                          + (" (11.x is not supported yet: its plans and builder flags differ)" if major > 10 else ""))
    return tensorrt


# --------------------------------------------------------------------------------------- CUDA seam

class TorchCuda:
    """The CUDA calls the backend makes, in one place, so tests can run the backend on a stand-in."""

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def target(self, trt_version_str: str) -> GpuTarget:
        cc = torch.cuda.get_device_capability()
        return GpuTarget(torch.cuda.get_device_name(), (cc[0], cc[1]), trt_version_str)

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def capture(self, run: Callable[[], None], stream) -> Callable[[], None]:
        """Record `run` (which enqueues on `stream`) into a CUDA graph; returns its replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        return graph.replay


def default_cuda() -> TorchCuda:
    return TorchCuda()


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor whose address is a multiple of ALIGNMENT (torch's CUDA allocator already
    gives 512-byte blocks; the CPU stand-in path needs the offset)."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(tuple(shape))


def _torch_dtypes(trt) -> dict[torch.dtype, Any]:
    return {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16,
            torch.int64: trt.DataType.INT64, torch.int32: trt.DataType.INT32, torch.int8: trt.DataType.INT8,
            torch.uint8: trt.DataType.UINT8, torch.bool: trt.DataType.BOOL}


def _name(value: Any) -> str:
    return getattr(value, "name", str(value))


def make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps the recent errors, so that a failed call
    can be reported with TensorRT's own reason."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors = [*self.errors[-9:], msg]
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def last_error(self) -> str:
            return f" (TensorRT: {self.errors[-1]})" if self.errors else ""

    return Logger()


class TrtApi:
    """The calls whose name depends on the 10.x minor version (V2 memory calls are 10.1+)."""

    def __init__(self, trt) -> None:
        self.trt = trt
        self.v2 = trt_version(trt.__version__) >= (10, 1)

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
        """Set the weight-streaming budget; returns what the engine reports back."""
        if self.v2:
            engine.weight_streaming_budget_v2 = nbytes
            return int(engine.weight_streaming_budget_v2)
        engine.weight_streaming_budget = nbytes
        return int(engine.weight_streaming_budget)


# ------------------------------------------------------------------------------------------ shared

class DeviceArena:
    """One activation buffer for every engine opened together; grown on demand to the largest
    (engine, profile) requirement actually used. `generation` changes whenever it moves."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.buffer, self.size, self.generation = device, None, 0, 0

    @property
    def ptr(self) -> int:
        return self.buffer.data_ptr()

    def ensure(self, nbytes: int, what: str) -> None:
        if nbytes <= self.size and self.buffer is not None:
            return
        nbytes = max(nbytes, ALIGNMENT)
        self.buffer = None  # free the old one first
        try:
            self.buffer = aligned_empty((nbytes,), torch.uint8, self.device)
        except torch.cuda.OutOfMemoryError:
            raise TensorRTError(
                f"not enough GPU memory for the TensorRT activation arena ({nbytes / 2**30:.2f} GiB, needed by "
                f"{what}); free GPU memory, use a smaller image or build the plan with a smaller profile "
                "(--latent / --no-static-profile), or stream weights (--trt-weight-budget)") from None
        self.size = nbytes
        self.generation += 1
        log.info("TensorRT activation arena: %.1f MiB (for %s)", nbytes / 2**20, what)


class _Shared:
    """What the engines opened together share: TensorRT runtime and logger, stream, arena."""

    def __init__(self, trt, cuda: TorchCuda) -> None:
        self.trt, self.cuda, self.api = trt, cuda, TrtApi(trt)
        self.device = cuda.device()
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.stream = cuda.new_stream(self.device)
        self.arena = DeviceArena(self.device)


class _Slot:
    """Buffers (and graph) for one input shape: outputs, staging inputs, chosen profile."""

    def __init__(self, key: tuple, profile: int, outputs: dict[str, torch.Tensor]) -> None:
        self.key, self.profile, self.outputs = key, profile, outputs
        self.inputs: dict[str, torch.Tensor] = {}
        self.runs = 0
        self.replay: Callable[[], None] | None = None
        self.graph_failed = False


# ------------------------------------------------------------------------------------------ engine

class TrtEngine(EngineBase):
    backend = "tensorrt"

    def __init__(self, plan: Path, spec: NetworkSpec, manifest: Manifest, shared: _Shared, *, validate: bool = True,
                 cuda_graphs: bool = False, weight_budget: int | None = None, rebuild: str = "") -> None:
        super().__init__(spec, shared.device, validate=validate)
        trt = shared.trt
        self.path, self.manifest, self._shared, self._rebuild = Path(plan), manifest, shared, rebuild
        self.profiles = tuple(Profile.from_json(p) for p in manifest.build["profiles"])
        self.engine = shared.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"TensorRT could not deserialize {self.path}{shared.logger.last_error()}; the plan is "
                                f"corrupt or from another TensorRT/GPU: rebuild with: {rebuild}")
        self._check_io(trt)
        self._check_profiles()
        if manifest.build.get("stripped"):
            self._refill_weights(trt)
        self.streaming = bool(manifest.build.get("weight_streaming"))
        budget = weight_budget if weight_budget is not None else manifest.build.get("runtime", {}).get("weight_budget")
        if self.streaming and budget is not None:
            self._set_weight_budget(int(budget))
        elif budget is not None and weight_budget is not None:
            raise TensorRTError(f"{self.path.name} was not built for weight streaming; rebuild it with "
                                f"--trt-weight-budget: {rebuild} --trt-weight-budget {budget}")
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if not self.context:
            raise TensorRTError(f"TensorRT could not create an execution context for {self.path.name}"
                                f"{shared.logger.last_error()}; out of GPU memory? Free memory or stream weights "
                                "(--trt-weight-budget)")
        self.memory = [shared.api.profile_memory(self.engine, i) for i in range(len(self.profiles))]
        self.cuda_graphs = cuda_graphs and spec.name in GRAPH_NETWORKS and not self.streaming
        self._profile: int | None = None
        self._shapes: tuple | None = None
        self._arena_generation = -1
        self._addresses: dict[str, int] = {}
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()

    # -------------------------------------------------------------------------------- open checks

    def _check_io(self, trt) -> None:
        e, dtypes = self.engine, _torch_dtypes(trt)
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        want = self.spec.input_names + self.spec.output_names
        problems = [f"tensors {sorted(names)}, spec {sorted(want)}"] if sorted(names) != sorted(want) else []
        for mode, specs in ((trt.TensorIOMode.INPUT, self.spec.inputs), (trt.TensorIOMode.OUTPUT, self.spec.outputs)):
            for s in specs:
                if s.name not in names:
                    continue
                if e.get_tensor_mode(s.name) != mode:
                    problems.append(f"{s.name} is {_name(e.get_tensor_mode(s.name))}, the spec says {_name(mode)}")
                if e.get_tensor_dtype(s.name) != dtypes[s.dtype]:
                    problems.append(f"{s.name} is {_name(e.get_tensor_dtype(s.name))}, the spec says {s.dtype}")
                shape = tuple(e.get_tensor_shape(s.name))
                if len(shape) != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, shape)):
                    problems.append(f"{s.name} has shape {shape}, the spec says {s.shape}")
        if problems:
            raise TensorRTError(f"{self.path.name}: the plan's I/O differs from the {self.spec.name} spec: "
                                + "; ".join(problems) + f"; rebuild with: {self._rebuild}")

    def _check_profiles(self) -> None:
        e = self.engine
        if e.num_optimization_profiles != len(self.profiles):
            raise TensorRTError(f"{self.path.name} has {e.num_optimization_profiles} profiles, its manifest lists "
                                f"{len(self.profiles)}; rebuild with: {self._rebuild}")
        dynamic = {s.name for s in self.spec.inputs if s.symbols()}  # static inputs need no profile shapes
        for i, p in enumerate(self.profiles):
            for name, shapes in self.spec.profile(p.range_map).items():
                if name not in dynamic:
                    continue
                got = tuple(tuple(d) for d in e.get_tensor_profile_shape(name, i))
                if got != tuple(shapes):
                    raise TensorRTError(f"{self.path.name}: profile {i} ({p.name}) of {name} is {got} in the plan, "
                                        f"{tuple(shapes)} in the manifest; rebuild with: {self._rebuild}")

    def _refill_weights(self, trt) -> None:
        """A weight-stripped plan gets its weights from the ONNX file it was built (or refitted) from."""
        onnx = self.path.parent / self.manifest.build["onnx"]
        if not onnx.is_file():
            raise ArtifactError(f"{self.path.name} was built without weights (stripped); they are loaded from {onnx}, "
                                f"which is missing: put the ONNX files beside the plans or rebuild with: {self._rebuild}")
        refitter = trt.Refitter(self.engine, self._shared.logger)
        parser = trt.OnnxParserRefitter(refitter, self._shared.logger)
        if not parser.refit_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"could not read the weights of {onnx} for {self.path.name}: {errors}")
        if not refitter.refit_cuda_engine():
            raise TensorRTError(f"TensorRT could not refit {self.path.name} from {onnx}: missing weights "
                                f"{list(refitter.get_missing_weights())[:5]}{self._shared.logger.last_error()}")

    def _set_weight_budget(self, budget: int) -> None:
        api = self._shared.api
        got = api.set_weight_budget(self.engine, budget)
        everything = api.v2 and budget >= self.engine.streamable_weights_size == got  # no streaming needed
        if got != budget and not everything:
            raise TensorRTError(f"{self.path.name}: TensorRT did not accept the weight-streaming budget {budget} "
                                f"bytes (it reports {got}){self._shared.logger.last_error()}")
        log.info("%s streams weights: %.2f GiB kept on the GPU", self.path.name, budget / 2**30)

    # -------------------------------------------------------------------------------------- running

    def _slot(self, feed: Mapping[str, torch.Tensor]) -> _Slot:
        key = tuple(tuple(feed[n].shape) for n in self.spec.input_names)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        dims = self.spec.infer_dims(feed)
        index = select_profile(self.profiles, dims)
        if index is None:
            raise ProfileError(self._out_of_profile(dims))
        try:
            with self._shared.cuda.use_stream(self._shared.stream):
                outputs = {name: aligned_empty(shape, self.spec.output(name).dtype, self.device)
                           for name, shape in self.spec.output_shapes(dims).items()}
        except torch.cuda.OutOfMemoryError:
            raise TensorRTError(f"{self.spec.name}: not enough GPU memory for the outputs of a request with {dims}; "
                                "use a smaller image or fewer images per request, or free GPU memory") from None
        slot = self._slots[key] = _Slot(key, index, outputs)
        while len(self._slots) > MAX_SHAPES:
            _, old = self._slots.popitem(last=False)
            caller = self._shared.cuda.current_stream(self.device)
            for t in (*old.outputs.values(), *old.inputs.values()):  # the caller may still read them
                self._shared.cuda.record_stream(t, caller)
        return slot

    def _out_of_profile(self, dims: Mapping[str, int]) -> str:
        asked = ", ".join(f"{k} {v}" for k, v in sorted(dims.items()))
        sides = [dims[k] for k in ("h", "w") if k in dims]
        hint = f" --latent {min(8, *sides)} {max(sides)} {max(256, *sides)}" if sides else ""
        if dims.get("B", 1) > 4:
            hint += f" --batch 1 1 {dims['B']}"
        return (f"{self.spec.name}: a request with {asked} is outside every optimisation profile of {self.path.name}: "
                + "; ".join(p.describe() for p in self.profiles)
                + f". Use a size inside one of them, or rebuild the plan with a profile that covers it: "
                  f"{self._rebuild}{hint}")

    def _activate(self, slot: _Slot, stream_handle: int) -> None:
        """Arena memory, profile and input shapes on the context, for this slot."""
        shared, ctx = self._shared, self.context
        need = self.memory[slot.profile]
        if need > shared.arena.size or shared.arena.buffer is None:
            with shared.cuda.use_stream(shared.stream):  # freed/reused in the engine stream's order
                shared.arena.ensure(need, f"{self.spec.name} profile {self.profiles[slot.profile].name}")
        if self._arena_generation != shared.arena.generation:
            shared.api.set_device_memory(ctx, shared.arena.ptr, shared.arena.size)
            self._arena_generation = shared.arena.generation
            for s in self._slots.values():  # graphs recorded the old arena address
                s.replay, s.runs = None, 0
        if self._profile != slot.profile:
            try:
                ctx.set_optimization_profile_async(slot.profile, stream_handle)
            except RuntimeError as err:
                raise TensorRTError(f"{self.path.name}: TensorRT refused profile {slot.profile} ({err})") from None
            self._profile, self._shapes = slot.profile, None
        if self._shapes != slot.key:
            for name, shape in zip(self.spec.input_names, slot.key):
                if not ctx.set_input_shape(name, shape):
                    raise TensorRTError(f"{self.path.name}: TensorRT refused input shape {name}={shape} on profile "
                                        f"{self.profiles[slot.profile].describe()}{shared.logger.last_error()}")
            self._shapes = slot.key

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        if self._addresses.get(name) == tensor.data_ptr():
            return
        if tensor.data_ptr() % ALIGNMENT:
            raise TensorRTError(f"{name}: address {tensor.data_ptr():#x} is not {ALIGNMENT}-byte aligned")
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise TensorRTError(f"{self.path.name}: TensorRT refused the address of {name}"
                                f"{self._shared.logger.last_error()}")
        self._addresses[name] = tensor.data_ptr()

    def _stage(self, slot: _Slot, feed: Mapping[str, torch.Tensor], copy_all: bool, stream) -> None:
        try:
            self._stage_inputs(slot, feed, copy_all, stream)
        except torch.cuda.OutOfMemoryError:
            raise TensorRTError(f"{self.spec.name}: not enough GPU memory to stage the inputs; use a smaller image or "
                                "free GPU memory") from None

    def _stage_inputs(self, slot: _Slot, feed: Mapping[str, torch.Tensor], copy_all: bool, stream) -> None:
        """Bind each input in place when TensorRT can read it as it is, else copy it into the slot's
        own buffer (on the engine stream, so the copy is ordered with the run)."""
        cuda = self._shared.cuda
        for s, shape in zip(self.spec.inputs, slot.key):
            t = feed[s.name]
            direct = (not copy_all and t.dtype == s.dtype and t.device == self.device and t.is_contiguous()
                      and t.data_ptr() % ALIGNMENT == 0)
            if direct:
                cuda.record_stream(t, stream)  # the caller's allocator must not reuse it before the run ends
            else:
                with cuda.use_stream(stream):
                    buf = slot.inputs.get(s.name)
                    if buf is None:
                        buf = slot.inputs[s.name] = aligned_empty(shape, s.dtype, self.device)
                    buf.copy_(t)
                t = buf
            self._bind(s.name, t)
        for name, buf in slot.outputs.items():
            self._bind(name, buf)

    def _enqueue(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise TensorRTError(f"TensorRT execution of {self.path.name} failed{self._shared.logger.last_error()}")

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shared = self._shared
        slot = self._slot(feed)
        stream, caller = shared.stream, shared.cuda.current_stream(self.device)
        stream.wait_stream(caller)  # inputs written on the caller's stream are ready
        self._activate(slot, stream.cuda_stream)
        graphs = self.cuda_graphs and not slot.graph_failed
        self._stage(slot, feed, copy_all=graphs, stream=stream)  # graphs replay fixed addresses
        if slot.replay is not None:
            slot.replay()
        elif graphs and slot.runs >= 1:  # warmed up: capture this run, replay it from now on
            try:
                slot.replay = shared.cuda.capture(lambda: self._enqueue(stream.cuda_stream), stream)
                slot.replay()
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to plain runs
                log.warning("%s: CUDA graph capture failed for shapes %s (%s); running without a graph",
                            self.spec.name, slot.key, err)
                slot.graph_failed, slot.replay = True, None
                self._addresses.clear()
                self._stage(slot, feed, copy_all=False, stream=stream)
                self._enqueue(stream.cuda_stream)
        else:
            self._enqueue(stream.cuda_stream)
        slot.runs += 1
        caller.wait_stream(stream)  # the caller's later work sees the outputs
        return slot.outputs

    def close(self) -> None:
        self._slots.clear()
        self.context = self.engine = None
        super().close()


# ----------------------------------------------------------------------------------------- opening

def _plan_for(artifact_dir: Path, network: str, precision: str, target: GpuTarget) -> Path:
    return Path(artifact_dir) / plan_name(network, precision, target.compute_capability, target.tensorrt)


def open_tensorrt_engines(*, config: ModelConfig, artifact_dir: str | Path, precision: str = "fp16",
                          validate: bool = True, networks: Sequence[str] | None = None, verify_hash: bool = True,
                          cuda_graphs: bool = False, weight_budget: int | None = None, cuda: TorchCuda | None = None,
                          **_: object) -> dict[str, TrtEngine]:
    """Engines for `networks` (default all) from the plans in `artifact_dir` built for this GPU and
    TensorRT; they share one stream and one activation arena. `weight_budget` (bytes) overrides the
    weight-streaming budget recorded at build time for plans built with weight streaming."""
    trt = require_tensorrt()
    cuda = cuda or default_cuda()
    if not cuda.is_available():
        raise TensorRTError("the tensorrt backend needs an NVIDIA GPU; torch sees none")
    specs = network_specs(config)
    shared = _Shared(trt, cuda)
    target = cuda.target(trt.__version__)
    engines: dict[str, TrtEngine] = {}
    try:
        for name in networks or NETWORKS:
            plan = _plan_for(Path(artifact_dir), name, precision, target)
            rebuild = rebuild_command(config, precision, trt=True, artifact_dir=Path(artifact_dir))
            man = check_plan(plan, spec=specs[name], config=config, precision=precision, target=target,
                             verify_hash=verify_hash)
            engines[name] = TrtEngine(plan, specs[name], man, shared, validate=validate, cuda_graphs=cuda_graphs,
                                      weight_budget=weight_budget if name == "unet_adaptor" else None,
                                      rebuild=rebuild)
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return engines


def tensorrt_unavailable(cuda: TorchCuda | None = None) -> str | None:
    try:
        require_tensorrt()
    except ImportError as err:
        return str(err)
    if not (cuda or default_cuda()).is_available():
        return "no CUDA device"
    return None


def tensorrt_artifacts_reason(*, artifact_dir: str | Path, config: ModelConfig, precision: str,
                              cuda: TorchCuda | None = None) -> str | None:
    """Why `artifact_dir` holds no usable plan set for this GPU (None: it does). Cheap: manifests
    only, no hashing and no deserialising."""
    trt = require_tensorrt()
    target = (cuda or default_cuda()).target(trt.__version__)
    specs = network_specs(config)
    for name in NETWORKS:
        plan = _plan_for(Path(artifact_dir), name, precision, target)
        try:
            check_plan(plan, spec=specs[name], config=config, precision=precision, target=target, verify_hash=False)
        except (ArtifactError, OSError, ValueError) as err:
            return str(err).split("; rebuild with")[0]
    return None


def _unavailable() -> str | None:
    return tensorrt_unavailable()


register_backend("tensorrt", _unavailable, open_tensorrt_engines, artifacts_reason=tensorrt_artifacts_reason)

__all__ = ["TrtEngine", "TensorRTError", "ProfileError", "open_tensorrt_engines", "require_tensorrt", "TorchCuda",
           "DeviceArena", "aligned_empty", "tensorrt_unavailable", "tensorrt_artifacts_reason"]
