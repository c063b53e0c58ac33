"""TensorRT execution contexts over one shared activation arena: the `TrtEngine` that `infer` runs.

How the engines opened together run (the serving design of NVIDIA's diffusion demo):

* **One activation arena.** Contexts are created with USER_MANAGED device memory; one buffer, grown
  to the largest requirement of the (engine, profile) pairs actually used, is given to every
  context. They run one at a time on one stream, so peak VRAM is weights + the largest activation
  set, not the sum over networks. When it grows, the old buffer is retired and every engine re-binds
  it (and drops its CUDA graphs) before its next run.
* **Own stream, no host sync.** Work is enqueued on a stream the engines own; it waits for the
  caller's current stream before and the caller's stream waits for it after (stream-to-stream).
* **Engine-owned buffers.** Outputs go to 256-byte-aligned buffers the engine owns, one set per input
  shape, with stable addresses (valid until the next `infer` with that shape), checked once per shape
  against the shapes TensorRT infers (`context.get_tensor_shape`). Inputs are bound in place when
  TensorRT can read them as they are; otherwise they are copied into an engine-owned buffer.
* **Profiles** come from the manifest; each request runs on the tightest profile containing it.
* Every TensorRT call that reports failure by its return value is checked.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from supir_rt.backends import EngineBase
from supir_rt.backends.specs import select_profile
from supir_rt.backends.trt_graphs import GRAPH_NETWORKS, Slot, TorchCuda, drop_graphs, run_slot
from supir_rt.backends.trt_plans import LoadedPlan, ProfileError, TensorRTError, make_logger
from supir_rt.backends.trt_api import TrtApi

log = logging.getLogger(__name__)

ALIGNMENT = 256  # TensorRT: every tensor address and the device memory must be 256-byte aligned
MAX_SHAPES = 8  # per engine: buffer sets (and graphs) kept for this many input shapes


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


class DeviceArena:
    """One activation buffer for every engine opened together; grown on demand to the largest
    (engine, profile) requirement actually used. `generation` changes whenever it moves."""

    def __init__(self, device: torch.device, cuda: TorchCuda) -> None:
        self.device, self.cuda, self.buffer, self.size, self.generation = device, cuda, None, 0, 0

    @property
    def ptr(self) -> int:
        return self.buffer.data_ptr()

    def ensure(self, nbytes: int, what: str) -> None:
        if nbytes <= self.size and self.buffer is not None:
            return
        nbytes = max(nbytes, ALIGNMENT)
        if self.buffer is not None:
            self.cuda.retire(self.ptr, self.size)
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


class Shared:
    """What the engines opened together share: TensorRT runtime and logger, stream, arena."""

    def __init__(self, trt, cuda: TorchCuda, flavour: str = "tensorrt") -> None:
        self.trt, self.cuda, self.api = trt, cuda, TrtApi(trt, flavour)
        self.device = cuda.device()
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.stream = cuda.new_stream(self.device)
        self.arena = DeviceArena(self.device, cuda)


class TrtEngine(EngineBase):
    backend = "tensorrt"

    def __init__(self, plan: LoadedPlan, shared: Shared, *, validate: bool = True, cuda_graphs: bool = False) -> None:
        super().__init__(plan.spec, shared.device, validate=validate)
        self.backend = shared.api.flavour
        self.plan, self._shared = plan, shared
        self.path, self.manifest, self.profiles, self._rebuild = plan.path, plan.manifest, plan.profiles, plan.rebuild
        self.engine = plan.engine
        self.streaming = plan.streaming
        self.context = plan.create_context()  # after the weight budget: TensorRT refuses it once contexts exist
        self.memory = [shared.api.profile_memory(self.engine, i) for i in range(len(self.profiles))]
        self.cuda_graphs = cuda_graphs and self.spec.name in GRAPH_NETWORKS and not self.streaming
        self._profile: int | None = None
        self._shapes: tuple | None = None
        self._last_key: tuple | None = None  # input shapes of the previous run on this context
        self._arena_generation = -1
        self._addresses: dict[str, int] = {}
        self._slots: OrderedDict[tuple, Slot] = OrderedDict()

    # -------------------------------------------------------------------------------------- slots

    def _slot(self, feed: Mapping[str, torch.Tensor]) -> Slot:
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
        slot = self._slots[key] = Slot(key, index, outputs)
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

    # -------------------------------------------------------------------------------- the context

    def _activate(self, slot: Slot, stream_handle: int) -> None:
        """Arena memory, profile and input shapes on the context, for this slot."""
        shared, ctx = self._shared, self.context
        need = self.memory[slot.profile]
        if need > shared.arena.size or shared.arena.buffer is None:
            with shared.cuda.use_stream(shared.stream):  # freed/reused in the engine stream's order
                shared.arena.ensure(need, f"{self.spec.name} profile {self.profiles[slot.profile].name}")
        if self._arena_generation != shared.arena.generation:
            shared.api.set_device_memory(ctx, shared.arena.ptr, shared.arena.size)
            self._arena_generation = shared.arena.generation
            drop_graphs(self._slots.values())  # they recorded the old arena address
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
        if not slot.checked:
            self._check_output_shapes(slot)

    def _check_output_shapes(self, slot: Slot) -> None:
        """Once per shape: TensorRT's own output shapes must be the buffers' (the spec's formula)."""
        try:
            unresolved = list(self.context.infer_shapes())
        except RuntimeError as err:  # the Python binding raises on errors other than missing shapes
            unresolved = [str(err)]
        if unresolved:
            raise TensorRTError(f"{self.path.name}: TensorRT cannot infer shapes, {unresolved} insufficiently "
                                f"specified{self._shared.logger.last_error()}; rebuild with: {self._rebuild}")
        for name, buf in slot.outputs.items():
            got = tuple(self.context.get_tensor_shape(name))
            if got != tuple(buf.shape):
                raise TensorRTError(f"{self.path.name}: TensorRT computes {name} as {got} for inputs {slot.key}, the "
                                    f"{self.spec.name} spec as {tuple(buf.shape)}: plan and spec disagree; rebuild "
                                    f"with: {self._rebuild}")
        slot.checked = True

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        if self._addresses.get(name) == tensor.data_ptr():
            return
        if tensor.data_ptr() % ALIGNMENT:
            raise TensorRTError(f"{name}: address {tensor.data_ptr():#x} is not {ALIGNMENT}-byte aligned")
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise TensorRTError(f"{self.path.name}: TensorRT refused the address of {name}"
                                f"{self._shared.logger.last_error()}")
        self._addresses[name] = tensor.data_ptr()

    def _stage(self, slot: Slot, feed: Mapping[str, torch.Tensor], copy_all: bool, stream) -> None:
        try:
            self._stage_inputs(slot, feed, copy_all, stream)
        except torch.cuda.OutOfMemoryError:
            raise TensorRTError(f"{self.spec.name}: not enough GPU memory to stage the inputs; use a smaller image or "
                                "free GPU memory") from None

    def _stage_inputs(self, slot: Slot, feed: Mapping[str, torch.Tensor], copy_all: bool, stream) -> None:
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

        def restage() -> None:
            self._addresses.clear()
            self._stage(slot, feed, copy_all=False, stream=stream)

        run_slot(slot, graphs=graphs, warm=slot.runs >= 1 and self._last_key == slot.key,
                 enqueue=lambda: self._enqueue(stream.cuda_stream), restage=restage, cuda=shared.cuda,
                 stream=stream, name=self.spec.name)
        self._last_key = slot.key
        caller.wait_stream(stream)  # the caller's later work sees the outputs
        return slot.outputs

    def close(self) -> None:
        if self.plan is not None and self.plan.runtime_cache is not None:
            self.plan.runtime_cache.save()  # kernels specialised since open
        self._slots.clear()
        self.context = self.engine = self.plan = None
        super().close()


__all__ = ["TrtEngine", "DeviceArena", "Shared", "aligned_empty", "ALIGNMENT", "MAX_SHAPES"]
