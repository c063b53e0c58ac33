"""The Engine protocol every backend implements, and `EngineBase`, the shared lifecycle, input checking
and input conversion (after Polygraphy's runner).

Contract:
* `engine.spec` is the network's `NetworkSpec` (inputs, outputs, symbolic dims); `engine.device`,
  `engine.dtype` (the precision it computes in) and `engine.backend` (its registry name) describe it;
* `engine.infer(feed, check_inputs=True)` takes a mapping name -> torch.Tensor and returns dict
  name -> torch.Tensor. **Returned tensors belong to the engine until the next `infer`** on it: copy
  them if you need them longer (backends may write into preallocated buffers). ``check_inputs=False``
  skips the feed check (names, dtypes, ranks, consistent dims) for a hot loop whose feeds change values
  only (Polygraphy's ``check_inputs``);
* `engine.vae_modules()` is the PyTorch VAE and scale factor behind a VAE engine, or None: what the tiled
  VAE needs (only the torch backend has them; exported graphs cannot be tiled layer by layer);
* `engine.close()` frees it; engines are context managers.
Feeds are converted in ONE place, `EngineBase.conform_inputs` (device, contiguity and the dtype the
backend computes in); `_run` receives the conformed feed and trusts it. Outputs are produced in the
spec's dtype and callers never re-cast them.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from supir_rt.backends.specs import NetworkSpec, TensorSpec, validate_feed

@runtime_checkable
class Engine(Protocol):
    spec: NetworkSpec
    device: torch.device
    dtype: torch.dtype
    backend: str

    def infer(self, feed: Mapping[str, torch.Tensor], *, check_inputs: bool = True) -> dict[str, torch.Tensor]: ...

    def vae_modules(self) -> tuple[Any, float] | None: ...

    def close(self) -> None: ...


class EngineBase(abc.ABC):
    """Shared lifecycle, validation and input conversion; subclasses implement `_run(feed) -> dict`.

    `infer(feed)`: check the feed against the spec (unless ``check_inputs=False``, or the engine was
    opened with ``validate=False``), conform with `conform_inputs`, then `_run`. Backends must not
    convert inputs again inside `_run`.
    """

    backend = "base"

    def __init__(self, spec: NetworkSpec, device: str | torch.device = "cpu", *, validate: bool = True,
                 float_dtype: torch.dtype | None = None) -> None:
        self.spec, self.device, self.validate = spec, torch.device(device), validate
        # dtype the floating-point inputs are converted to before `_run` (None: the spec's, fp32). A
        # backend that computes in another precision (a torch module in fp16) sets it; callers still
        # feed the spec's dtype.
        self.float_dtype = float_dtype
        self.dtype = float_dtype if float_dtype is not None else torch.float32  # the precision it computes in
        self.closed = False
        self._out_buffers: dict[str, torch.Tensor] = {}

    def vae_modules(self) -> tuple[Any, float] | None:
        """The PyTorch VAE and scale factor behind this engine (only torch-backend VAE engines have them)."""
        return None

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

    def infer(self, feed: Mapping[str, torch.Tensor], *, check_inputs: bool = True) -> dict[str, torch.Tensor]:
        if self.closed:
            raise RuntimeError(f"{self.backend} engine {self.spec.name!r} is closed")
        if check_inputs and self.validate:
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


__all__ = ["Engine", "EngineBase"]
