"""One Engine protocol for every backend; the pipeline only ever calls `infer`.

Contract (after Polygraphy's runner, STYLE G3):
* `engine.spec` is the network's `NetworkSpec` (inputs, outputs, symbolic dims);
* `engine.infer(feed)` takes a mapping name -> torch.Tensor (on `engine.device`) and returns
  dict name -> torch.Tensor. **Returned tensors belong to the engine until the next `infer`** on
  it: copy them if you need them longer (backends may write into preallocated buffers);
* `engine.close()` frees it; engines are context managers.
Feeds are validated (names, dtypes, ranks, consistent dims) unless `validate=False` was asked for
the hot loop. Backends register by name; `open_engines` picks one (`auto` = fastest available).
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
    """Shared lifecycle and validation; subclasses implement `_run(feed) -> dict`."""

    backend = "base"

    def __init__(self, spec: NetworkSpec, device: str | torch.device = "cpu", *, validate: bool = True,
                 float_dtype: torch.dtype | None = None) -> None:
        self.spec, self.device, self.validate = spec, torch.device(device), validate
        self.float_dtype = float_dtype  # dtype float inputs must have (None: the spec's, fp32)
        self.closed = False
        self._out_buffers: dict[str, torch.Tensor] = {}

    def _staged_inputs(self, feed: Mapping[str, torch.Tensor]) -> list[tuple[TensorSpec, torch.Tensor]]:
        """Each input as a contiguous tensor of the spec's dtype on the engine's device, in spec order.
        Converted copies are returned so that the caller keeps them alive for the whole run."""
        staged = []
        for s in self.spec.inputs:
            t = feed[s.name]
            if t.dtype != s.dtype or t.device != self.device or not t.is_contiguous():
                t = t.to(device=self.device, dtype=s.dtype).contiguous()
            staged.append((s, t))
        return staged

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
            validate_feed(self.spec, feed, float_dtype=self.float_dtype)
        return self._run(feed)

    @abc.abstractmethod
    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the validated feed; outputs may be the engine's reused buffers."""

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
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime", "torch")


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
        from supir_rt.backends import tensorrt_backend  # noqa: F401  (registers "tensorrt")
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
