"""One Engine protocol for every backend; the pipeline only ever calls `infer`.

Contract (after Polygraphy's runner):
* `engine.spec` is the network's `NetworkSpec` (inputs, outputs, symbolic dims);
* `engine.infer(feed)` takes a mapping name -> torch.Tensor (on `engine.device`) and returns
  dict name -> torch.Tensor. **Returned tensors belong to the engine until the next `infer`** on
  it: copy them if you need them longer (backends may write into preallocated buffers);
* `engine.close()` frees it; engines are context managers.
Feeds are validated (names, dtypes, ranks, consistent dims) unless `validate=False` was asked for
the hot loop, then converted in ONE place, `EngineBase.conform_inputs` (device, contiguity and the dtype
the backend computes in); `_run` receives the conformed feed and trusts it. Outputs are
produced in the spec's dtype and callers never re-cast them. Backends register by name; `open_engines`
picks one (`auto` = fastest available).
"""

from __future__ import annotations

import abc
import logging

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from supir_rt.backends.specs import NETWORKS, NetworkSpec, TensorSpec, validate_feed

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineBase", "BACKENDS", "register_backend", "available_backends", "open_engines",
           "resolve_backend", "NETWORKS"]


@runtime_checkable
class Engine(Protocol):
    spec: NetworkSpec
    device: torch.device

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...


class EngineBase(abc.ABC):
    """Shared lifecycle, validation and input conversion; subclasses implement `_run(feed) -> dict`.

    `infer(feed)`: validate against the spec (unless ``validate=False``), conform with
    `conform_inputs`, then `_run`. Backends must not convert inputs again inside `_run`.
    """

    backend = "base"

    def __init__(self, spec: NetworkSpec, device: str | torch.device = "cpu", *, validate: bool = True,
                 float_dtype: torch.dtype | None = None) -> None:
        self.spec, self.device, self.validate = spec, torch.device(device), validate
        # dtype the floating-point inputs are converted to before `_run` (None: the spec's, fp32). A
        # backend that computes in another precision (a torch module in fp16) sets it; callers still
        # feed the spec's dtype.
        self.float_dtype = float_dtype
        self.closed = False
        self._out_buffers: dict[str, torch.Tensor] = {}

    def input_dtype(self, s: TensorSpec) -> torch.dtype:
        """The dtype input ``s`` has when it reaches `_run`."""
        return self.float_dtype if self.float_dtype is not None and s.dtype.is_floating_point else s.dtype

    def conform_inputs(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """THE input conversion of every backend: each spec input, in spec order, as a contiguous tensor
        on ``self.device`` in `input_dtype`. A tensor that already conforms is passed through as it is
        (no copy, no kernel); one that does not is copied once (a host->device copy when it lives on
        another device). The returned dict owns any converted copies: keep it alive until the backend
        has finished reading the inputs (`infer` does)."""
        out = {}
        for s in self.spec.inputs:
            t = feed[s.name]
            dtype = self.input_dtype(s)
            if t.dtype != dtype or t.device != self.device or not t.is_contiguous():
                t = t.to(device=self.device, dtype=dtype).contiguous()
            out[s.name] = t
        return out

    def _staged_inputs(self, feed: Mapping[str, torch.Tensor]) -> list[tuple[TensorSpec, torch.Tensor]]:
        """(spec, tensor) pairs in spec order of a feed `infer` has already conformed (no conversion)."""
        return [(s, feed[s.name]) for s in self.spec.inputs]

    def _output_buffers(self, dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Preallocated outputs for these symbol values, reused while the shapes stay the same (the
        reason returned tensors belong to the engine until its next `infer`)."""
        for s in self.spec.outputs:
            shape = s.resolve(dims)
            buf = self._out_buffers.get(s.name)
            if buf is None or tuple(buf.shape) != shape:
                self._out_buffers[s.name] = torch.empty(shape, dtype=s.dtype, device=self.device)
        return {s.name: self._out_buffers[s.name] for s in self.spec.outputs}

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.closed:
            raise RuntimeError(f"{self.backend} engine {self.spec.name!r} is closed")
        if self.validate:
            validate_feed(self.spec, feed)
        conformed = self.conform_inputs(feed)  # held here until _run returns: converted copies stay alive
        return self._run(conformed)

    @abc.abstractmethod
    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run a feed `conform_inputs` produced (trust it: no conversion here); outputs in the spec's
        dtype, possibly the engine's reused buffers."""

    def close(self) -> None:
        self._out_buffers.clear()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.name} on {self.device}>"


# name -> (is_available() -> str | None reason-not-available, factory(**kwargs) -> dict[str, Engine])
EngineFactory = Callable[..., dict[str, Engine]]
BACKENDS: dict[str, tuple[Callable[[], str | None], EngineFactory]] = {}
# `auto` tries these in order: fastest first. "torch" covers CPU and CUDA (`--device` chooses).
AUTO_ORDER = ("tensorrt", "tensorrt-rtx", "onnxruntime-cuda", "onnxruntime", "torch")


# name -> artifacts_reason(artifact_dir=, config=, precision=) -> None if the folder holds usable
# artifacts for this backend here, else why not (`auto` skips the backend then).
ARTIFACT_CHECKS: dict[str, Callable[..., str | None]] = {}


def register_backend(name: str, unavailable_reason: Callable[[], str | None], factory: EngineFactory, *,
                     artifacts_reason: Callable[..., str | None] | None = None) -> None:
    BACKENDS[name] = (unavailable_reason, factory)
    if artifacts_reason is not None:
        ARTIFACT_CHECKS[name] = artifacts_reason


def _load_builtin_backends() -> None:
    from supir_rt.backends import torch_backend  # noqa: F401  (registers "torch")

    try:
        from supir_rt.backends import onnxruntime_backend  # noqa: F401  (registers "onnxruntime")
    except ImportError:
        pass
    try:
        from supir_rt.backends import tensorrt_backend  # noqa: F401  (registers "tensorrt", "tensorrt-rtx")
    except ImportError:
        pass


def available_backends() -> dict[str, str | None]:
    """Backend name -> None if usable here, else the reason it is not."""
    _load_builtin_backends()
    return {name: reason() for name, (reason, _) in BACKENDS.items()}


def resolve_backend(name: str, *, needs_artifacts: bool = False, artifacts: Mapping[str, Any] | None = None) -> str:
    """Validate a backend name; `auto` picks the first available of AUTO_ORDER (with `needs_artifacts`,
    only backends that run exported engines: the PyTorch ones need the checkpoints instead). With
    `artifacts` (artifact_dir=, config=, precision=) a backend that checks its artifacts is skipped
    when the folder holds none usable here; the choice and the reasons go to one log line."""
    status = available_backends()
    if name == "auto":
        skipped = []
        for candidate in AUTO_ORDER:
            if needs_artifacts and candidate.startswith("torch"):
                continue
            if candidate not in status:
                continue
            reason = status[candidate]
            if reason is None and artifacts is not None and candidate in ARTIFACT_CHECKS:
                reason = ARTIFACT_CHECKS[candidate](**artifacts)
                if reason is not None:
                    skipped.append(f"{candidate}: {reason}")
            if reason is None:
                if skipped:
                    log.info("backend auto: %s (skipped %s)", candidate, "; ".join(skipped))
                return candidate
        raise RuntimeError(f"no backend is available: {status}")
    if name not in status:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(['auto', *status])}")
    if status[name] is not None:
        raise RuntimeError(f"backend {name!r} is not available here: {status[name]}")
    return name


def open_engines(backend: str = "auto", **kwargs: Any) -> dict[str, Engine]:
    """Open all networks on one backend. kwargs are the backend factory's (model=, artifact_dir=, ...)."""
    name = resolve_backend(backend)
    return BACKENDS[name][1](**kwargs)
