"""The PyTorch backend: the reference modules behind the Engine protocol, plus the CUDA fast path.

Speed is applied from outside the reference model:
* precision and placement come from a `MemoryPlan` (`placement.py`): on CUDA the UNet + adaptor
  (fp16) stays on the GPU, the VAE (bf16) and the text encoders (fp16) visit it only while they run;
* attention is PyTorch SDPA (the model's own `attention_fn` seam), convolutions run channels-last on
  CUDA;
* `TorchOptions.compile` wraps each chosen network in ``torch.compile`` (a failure at compile time
  falls back to eager with one warning), and `TorchOptions.cuda_graphs` captures the ``unet_adaptor``
  call in a CUDA graph once its shapes have been seen ``graph_warmup`` times, then replays it
  (static input buffers: a constant input such as the conditioning is not copied again);
* float inputs are converted to the network's compute dtype by `TorchEngine.conform_inputs`, the
  engine's one input conversion, which converts an input it has already converted (the same tensor,
  unmodified) only once: the per-step feed re-casts only what changes per step.

Outputs come out of the network in the spec's dtype (the cast is part of the network, and thus of the
compiled graph / CUDA graph). They belong to the engine until its next `infer`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from supir_rt import cuda_runtime
from supir_rt.backends.base import EngineBase
from supir_rt.backends.registry import register_backend
from supir_rt.backends.modules import NETWORK_MODULES
from supir_rt.backends.placement import (
    NETWORK_PARTS, OOM_ADVICE, MemoryPlan, Offloader, offloaders, pin_host_memory, plan_from_model,
)
from supir_rt.backends.specs import NetworkSpec, network_specs
from supir_rt.errors import UserError

log = logging.getLogger(__name__)

PHASES = {"dr_encoder": "stage 1 (degradation-robust encoder)", "vae_encoder": "x_center encoding",
          "unet_adaptor": "sampling", "vae_decoder": "decoding", "text_encoders": "prompt encoding"}


class DeviceMemoryError(UserError, RuntimeError):
    """The GPU ran out of memory in one network; the message names the phase and what to lower (a
    `UserError`: the CLI prints it as one line)."""


@dataclass(frozen=True)
class TorchOptions:
    """How the torch backend runs its networks (all off / automatic by default).

    ``compile``: ``torch.compile`` the ``compile_networks`` (default the UNet + adaptor only: it is 97 % of
    a restore's FLOPs; the VAE networks run two to four times per image, at the image's shape, so their
    compile time is not repaid). ``compile_mode``: inductor's mode; "default" until measurement on a GPU
    says otherwise ("max-autotune" compiles for many minutes on this model). ``cuda_graphs``: capture
    the ``unet_adaptor`` call (None: on when compiling on CUDA). ``channels_last`` (None: on CUDA).
    ``compile_backend`` is for tests ("eager", "aot_eager") and debugging.
    """

    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str | Callable = "inductor"
    compile_networks: tuple[str, ...] = ("unet_adaptor",)
    cuda_graphs: bool | None = None
    graph_warmup: int = 2
    channels_last: bool | None = None


# --------------------------------------------------------------------------------------------------
# the network as a callable: contract I/O dtypes, compile with fallback, CUDA graph replay
# --------------------------------------------------------------------------------------------------


class ContractIO(nn.Module):
    """A network computing in ``dtype`` with the spec's I/O: float inputs cast in (a no-op when the
    engine already converted them), outputs cast to the spec's dtype (inside any compiled graph)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, out_dtypes: Sequence[torch.dtype]) -> None:
        super().__init__()
        self.inner, self.dtype, self.out_dtypes = inner, dtype, tuple(out_dtypes)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tuple(a.to(self.dtype) if a.is_floating_point() and a.dtype != self.dtype else a for a in args)
        out = self.inner(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(o if o.dtype == d else o.to(d) for o, d in zip(outs, self.out_dtypes))


class CompiledCall:
    """``torch.compile(fn)`` that falls back to ``fn`` for good, with one warning, if compiling fails
    (no C++ compiler or Triton, an unsupported op, ...). Out-of-memory errors are not compile failures, nor
    is an error while a CUDA graph is being captured (`CUDAGraphCall` handles that one)."""

    def __init__(self, fn: Callable, name: str, *, mode: str = "default", backend: str | Callable = "inductor") -> None:
        self.eager, self.name, self.failed = fn, name, False
        kwargs = {"mode": mode} if backend == "inductor" and mode != "default" else {}
        self.compiled = torch.compile(fn, backend=backend, dynamic=False, **kwargs)

    def __call__(self, *args: torch.Tensor):
        if not self.failed:
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
                if cuda_runtime.is_capturing():
                    raise  # inside a CUDA-graph capture: the capture is broken, an eager call would be captured too
                first = (str(err).strip().splitlines() or [""])[0][:300]
                log.warning("torch.compile failed for %s (%s: %s); running it without compilation",
                            self.name, type(err).__name__, first)
                self.failed = True
        return self.eager(*args)


class CUDAGraphCall:
    """Replays ``fn`` from a CUDA graph at static shapes (the CFG pair at one image size).

    The first ``warmup`` calls at a new input signature run ``fn`` directly (compilation, cuDNN and
    allocator warm-up; `__call__` returns None so the caller runs it); the next one copies the inputs
    into static buffers (in the compute dtype), captures one call, and from then on each call copies
    only the inputs that changed and replays. A new signature re-captures (one graph is kept: its
    memory pool holds the activations of one UNet call). A capture failure disables graphs for good,
    with one warning. ``graph_factory`` is for tests.
    """

    def __init__(self, fn: Callable, name: str, dtype: torch.dtype, *, warmup: int = 2,
                 channels_last: bool = False, graph_factory: Callable | None = None) -> None:
        self.fn, self.name, self.dtype, self.warmup, self.channels_last = fn, name, dtype, warmup, channels_last
        self.graph_factory = graph_factory or (lambda fn, static: cuda_runtime.capture_graph(fn, static))
        self.failed = False
        self.replays = 0
        self._reset(None)

    def _reset(self, signature: object) -> None:
        self._signature, self._seen, self._replay = signature, 0, None
        self._static: list[torch.Tensor] = []
        self._sources: list[tuple[weakref.ref | None, int]] = []
        self._out = None

    def __call__(self, args: Sequence[torch.Tensor]):
        if self.failed:
            return None
        signature = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if signature != self._signature:
            self._reset(signature)
        if self._replay is None:
            self._seen += 1
            if self._seen <= self.warmup:
                return None
            try:
                self._static = [self._buffer(a) for a in args]
                self._sources = [(None, -1)] * len(args)
                self._load(args)
                self._replay, self._out = self.graph_factory(self.fn, self._static)
            except Exception as err:  # noqa: BLE001 - capture is an optimisation: fall back
                log.warning("CUDA graph capture failed for %s (%s: %s); running it without graphs", self.name,
                            type(err).__name__, (str(err).strip().splitlines() or [""])[0][:300])
                self.failed = True
                self._reset(None)
                if cuda_runtime.is_available():
                    cuda_runtime.empty_cache()
                return None
        else:
            self._load(args)
        self._replay()
        self.replays += 1
        return self._out

    def _buffer(self, a: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and a.dim() == 4 else torch.contiguous_format
        return torch.empty_like(a, dtype=self.dtype if a.is_floating_point() else a.dtype, memory_format=fmt)

    def _load(self, args: Sequence[torch.Tensor]) -> None:
        """Copy each input into its static buffer unless it is the same, unmodified tensor as last time."""
        for i, a in enumerate(args):
            ref, version = self._sources[i]
            if ref is not None and _unchanged(a, ref, version):
                continue
            self._static[i].copy_(a)
            self._sources[i] = (None, -1) if a.is_inference() else (weakref.ref(a), a._version)


def _unchanged(t: torch.Tensor, ref: weakref.ref, version: int) -> bool:
    """Whether ``t`` is the very tensor seen before (still alive, so no other tensor can have its
    identity) and has not been modified in place since (its version counter has not moved)."""
    return ref() is t and not t.is_inference() and t._version == version


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------


class TorchEngine(EngineBase):
    """One network of the reference model on ``device``, computing in ``dtype``.

    ``offloader`` gives the weights the device for each call (`placement.Offloader`); ``call`` is the
    network callable (possibly compiled); ``graphs`` an optional `CUDAGraphCall` around it.
    """

    backend = "torch"

    def __init__(self, module: nn.Module, spec: NetworkSpec, device: str | torch.device, dtype: torch.dtype, *,
                 validate: bool = True, offloader: Offloader | None = None, call: Callable | None = None,
                 graphs: CUDAGraphCall | None = None, channels_last: bool = False) -> None:
        super().__init__(spec, device, validate=validate)
        self.dtype, self.channels_last = dtype, channels_last
        self.module = ContractIO(module, dtype, [s.dtype for s in spec.outputs])
        self.offloader, self.graphs = offloader, graphs
        self.call = call or self.module
        self._converted: dict[str, tuple[weakref.ref, int, torch.Tensor]] = {}
        self.conversions: dict[str, int] = {s.name: 0 for s in spec.inputs}  # converted copies made, per input

    def vae_modules(self) -> tuple[nn.Module, float] | None:
        """The `AutoencoderKL` and scale factor when this engine runs a VAE network (for the tiled VAE)."""
        inner = self.module.inner
        vae, scale = getattr(inner, "vae", None), getattr(inner, "scale", None)
        if vae is None or scale is None or not hasattr(vae, "denoise_encoder"):
            return None
        return vae, float(scale)

    def conform_inputs(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The engine's one input conversion: each input on the device, floats in the compute dtype
        (channels-last images on CUDA). A tensor that already conforms passes through; one converted
        before and not modified since (same object, same version) reuses its converted copy, so
        constant conditioning is converted once per restore, not once per step. (Writes PyTorch does
        not see, e.g. another runtime filling a tensor through its raw pointer, do not move the version
        counter: feed such buffers as fresh tensors or clones.)"""
        out = {}
        for s in self.spec.inputs:
            t = feed[s.name]
            dtype = self.dtype if t.is_floating_point() else s.dtype
            fmt = torch.channels_last if self.channels_last and t.dim() == 4 else torch.contiguous_format
            if t.dtype == dtype and t.device == self.device and t.is_contiguous(memory_format=fmt):
                out[s.name] = t
                continue
            cached = self._converted.get(s.name)
            if cached is not None and _unchanged(t, cached[0], cached[1]):
                out[s.name] = cached[2]
                continue
            c = t.to(device=self.device, dtype=dtype, memory_format=fmt)
            if not t.is_inference():  # inference tensors have no version counter: never cached
                self._converted[s.name] = (weakref.ref(t), t._version, c)
            self.conversions[s.name] += 1
            out[s.name] = c
        return out

    @torch.no_grad()  # not inference_mode: outputs keep version counters, so callers' reuse stays cacheable
    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feed[s.name] for s in self.spec.inputs]
        with _out_of_memory_as_error(self.spec.name, args, self.device), (self.offloader.on_device() if self.offloader
                                                             else contextlib.nullcontext()):
            outs = self.graphs(args) if self.graphs is not None else None
            if outs is None:
                outs = self.call(*self.conform_inputs(dict(zip(self.spec.input_names, args))).values())
        return dict(zip(self.spec.output_names, outs))

    def close(self) -> None:
        super().close()
        self._converted.clear()
        self.graphs = None


@contextlib.contextmanager
def _out_of_memory_as_error(network: str, args: Sequence[torch.Tensor], device: torch.device):
    try:
        yield
    except torch.OutOfMemoryError:
        shapes = ", ".join("x".join(map(str, a.shape)) for a in args if a.dim() >= 3)
        free = ""
        if device.type == "cuda" and cuda_runtime.is_available():
            cuda_runtime.empty_cache()
            got, total = cuda_runtime.mem_get_info(device)  # the engine's GPU, not the current one
            free = f" ({got / 2**30:.1f} of {total / 2**30:.1f} GiB free on {device} after the failure)"
        raise DeviceMemoryError(
            f"the GPU ran out of memory in {PHASES.get(network, network)} ({network}, inputs {shapes}){free}. "
            f"Nothing was written. To fit: {OOM_ADVICE.get(network, 'lower the processing size')}"
        ) from None


def open_torch_engines(*, model: nn.Module, plan: MemoryPlan | None = None, options: TorchOptions | None = None,
                       validate: bool = True, networks: Sequence[str] | None = None,
                       **_: object) -> dict[str, TorchEngine]:
    """Engines over an already-built (and loaded) reference model, placed as ``plan`` says (default: the
    placement the model already has, each network in its weights' dtype, nothing offloaded).

    The model must already be where the plan puts it (`placement.place_model` / `build_placed_model`).
    ``networks`` opens a subset (the parts of the others may then stay unallocated, on the meta device).
    """
    networks = tuple(networks or NETWORK_MODULES)
    plan = plan or plan_from_model(model)
    options = options or TorchOptions()
    _check_placement(model, plan, networks)
    cuda = plan.device.type == "cuda"
    channels_last = cuda if options.channels_last is None else options.channels_last
    if channels_last:
        for name in networks:
            for part in NETWORK_PARTS[name]:
                module = model.get_submodule(part).to(memory_format=torch.channels_last)
                if cuda and not plan.networks[name].resident:
                    pin_host_memory(module)  # the conversion made new (pageable) host tensors
    graphs_on = (options.compile and cuda) if options.cuda_graphs is None else options.cuda_graphs
    if options.compile_mode in ("reduce-overhead", "max-autotune"):
        graphs_on = False  # inductor captures its own CUDA graphs in these modes
    specs = network_specs(model.config)
    places = offloaders(model, plan)
    engines = {}
    for name in networks:
        cls, dtype = NETWORK_MODULES[name], plan.networks[name].dtype
        engine = TorchEngine(cls(model), specs[name], plan.device_of(name), dtype, validate=validate,
                             offloader=places[name], channels_last=channels_last)
        if options.compile and name in options.compile_networks:
            engine.call = CompiledCall(engine.module, name, mode=options.compile_mode, backend=options.compile_backend)
        if graphs_on and name == "unet_adaptor":
            if cuda and places[name].resident:
                engine.graphs = CUDAGraphCall(engine.call, name, dtype, warmup=options.graph_warmup,
                                              channels_last=channels_last)
            else:
                log.warning("CUDA graphs need the unet_adaptor resident on a CUDA device (it is on %s); "
                            "running without graphs", plan.device)
        engines[name] = engine
    return engines


def _check_placement(model: nn.Module, plan: MemoryPlan, networks: Sequence[str]) -> None:
    for name in networks:
        want_device, want_dtype = plan.home(name), plan.networks[name].dtype
        for part in NETWORK_PARTS[name]:
            for pname, p in model.get_submodule(part).named_parameters():
                if p.device != want_device or (p.dtype != want_dtype and p.dtype.itemsize > 1):
                    raise ValueError(
                        f"{part}.{pname} is {p.dtype} on {p.device} but the memory plan puts {name} in {want_dtype} "
                        f"on {want_device}; place the model first (supir_rt.backends.placement.place_model)"
                    )
                break  # one parameter per part is enough to tell


register_backend("torch", lambda: None, open_torch_engines)

__all__ = ["CUDAGraphCall", "CompiledCall", "ContractIO", "DeviceMemoryError", "TorchEngine", "TorchOptions",
           "open_torch_engines"]
