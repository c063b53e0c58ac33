"""CFG-parallel: the classifier-free-guidance pair of each sampler step on two engines at once.

Every sampler step calls the ``unet_adaptor`` once on a ``2B`` batch laid out ``[uncond × B, cond × B]``
(`GuidedDenoiser`; the tiled denoiser lays out ``[uncond × n·B, cond × n·B]`` the same way). The two
halves never meet inside the network, so `CFGParallelEngine` runs the unconditional half on one engine
and the conditional half on another, then gathers the two ``eps`` halves into one ``(2B, ...)`` output
on the home device. To the pipeline it is one ``unet_adaptor`` engine: same spec, same call, same output
contract (the returned tensor belongs to the wrapper until its next `infer`).

On CUDA each engine lives on its own device; the wrapper enqueues everything from the calling thread
without a host synchronisation: per engine, on that device's current stream, the half-feed is copied in
(``non_blocking``; constant inputs such as the text conditioning and the control latent are copied once
and reused while they are the same, unmodified tensor), the engine is called (PyTorch queues its
kernels; TensorRT's backend orders its own stream after the current one), and the ``eps`` half is
copied back into the home output after the home stream waits on an event recorded on that stream. The
two GPUs therefore compute concurrently, and the host returns as soon as all of it is queued.

On CPU engines the halves simply run one after the other (the result is the same; there is no speedup).

Each inner engine sees a batch of B (not the spec's ``2B``), so the wrapper checks the whole feed once
and calls the inner engines with ``check_inputs=False``. The torch and ONNX Runtime backends take any batch; a
TensorRT ``unet_adaptor`` engine must have been built with a batch profile that admits B per call (its
default profiles start at ``2B`` = 2, so an untiled single image needs an engine built for batch 1).

Speed model (docs/scale.md): with t_u the time of one UNet call on B images, one step on one GPU takes
about 2·t_u (the UNet is compute-bound at SUPIR's sizes, so a 2B batch costs twice a B batch); on two
equal GPUs it takes t_u + t_copy, with t_copy the home <-> peer copies of x_in and eps (2 × B·4·h·w
floats: 0.5 MB at 1024², ~20 µs over NVLink, ~50–100 µs over PCIe 4) plus the launch skew, so the step
speedup is 2·t_u / (t_u + t_copy + t_skew) ≈ 1.8–1.9× at t_u ≈ 0.2–0.5 s. Only real GPUs can confirm it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping, Sequence

import torch

from supir_rt.backends import Engine
from supir_rt.backends.specs import validate_feed

# Inputs whose leading dimension is the CFG batch ``2B`` (in the unet_adaptor spec); the others
# (``control_scale``) go to both engines whole.
_PAIRED = ("x_in", "timesteps", "context", "vector", "lq_latent")


class CFGParallelEngine:
    """One ``unet_adaptor`` engine over two: ``uncond`` runs the first half of the ``2B`` batch, ``cond``
    the second. ``home`` is where the feed comes from and the output goes (default: ``uncond``'s
    device). Both engines must have the same spec (the same network); the wrapper owns neither
    (`close` closes both only with ``owns_engines=True``)."""

    backend = "cfg-parallel"

    def __init__(self, uncond: Engine, cond: Engine, *, home: str | torch.device | None = None,
                 validate: bool = True, owns_engines: bool = True) -> None:
        if uncond.spec.name != "unet_adaptor" or cond.spec != uncond.spec:
            raise ValueError(f"CFG-parallel needs two unet_adaptor engines with one spec, got {uncond.spec.name!r} "
                             f"and {cond.spec.name!r}")
        self.engines = (uncond, cond)  # each half has batch B, not the spec's 2B: the wrapper checks the whole
        self.spec = uncond.spec
        self.device = torch.device(home) if home is not None else torch.device(uncond.device)
        self.validate, self.owns_engines, self.closed = validate, owns_engines, False
        self.dtype = getattr(uncond, "dtype", torch.float32)
        self._out: torch.Tensor | None = None
        # per engine, per input: (source tensor ref, its version, the copy on the engine's device)
        self._copies: list[dict[str, tuple[weakref.ref, int, torch.Tensor]]] = [{}, {}]

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        return tuple(torch.device(e.device) for e in self.engines)  # type: ignore[return-value]

    def _half(self, index: int, name: str, t: torch.Tensor, half: int) -> torch.Tensor:
        """Input ``name``'s half for engine ``index`` on that engine's device: a view when it is there
        already, else a non-blocking copy, reused while the source is the same, unmodified tensor."""
        part = t[half * index:half * (index + 1)] if name in _PAIRED else t
        device = self.devices[index]
        if part.device == device:
            return part
        cached = self._copies[index].get(name)
        if cached is not None and cached[0]() is t and not t.is_inference() and t._version == cached[1]:
            return cached[2]
        copy = part.to(device, non_blocking=True)
        if not t.is_inference():
            self._copies[index][name] = (weakref.ref(t), t._version, copy)
        return copy

    def infer(self, feed: Mapping[str, torch.Tensor], *, check_inputs: bool = True) -> dict[str, torch.Tensor]:
        if self.closed:
            raise RuntimeError("cfg-parallel engine is closed")
        if check_inputs and self.validate:
            validate_feed(self.spec, feed)
        pairs = feed["x_in"].shape[0]
        if pairs % 2:
            raise ValueError(f"CFG-parallel needs an even batch [uncond, cond], got x_in of batch {pairs}")
        half = pairs // 2
        out_spec = self.spec.output("eps")
        shape = (pairs, *feed["x_in"].shape[1:])
        if self._out is None or tuple(self._out.shape) != shape:
            self._out = torch.empty(shape, dtype=out_spec.dtype, device=self.device)
        # enqueue both halves before reading anything back (no host sync on CUDA)
        results = []
        for index, engine in enumerate(self.engines):
            sub = {s.name: self._half(index, s.name, feed[s.name], half) for s in self.spec.inputs}
            with _on_device(self.devices[index]):
                eps = engine.infer(sub, check_inputs=False)["eps"]
                done = _record(self.devices[index])
            results.append((eps, done))
        for index, (eps, done) in enumerate(results):
            _wait(self.device, done)
            self._out[half * index:half * (index + 1)].copy_(eps, non_blocking=True)
        return {"eps": self._out}

    def vae_modules(self) -> None:
        return None

    def close(self) -> None:
        if self.owns_engines:
            for engine in self.engines:
                engine.close()
        self._copies = [{}, {}]
        self._out = None
        self.closed = True

    def __enter__(self) -> CFGParallelEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CFGParallelEngine unet_adaptor on {self.devices[0]} + {self.devices[1]}, home {self.device}>"


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _record(device: torch.device):
    """An event on ``device``'s current stream after the work just queued (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _wait(home: torch.device, event) -> None:
    """Make ``home``'s current stream wait for ``event`` (device-side; the host does not block)."""
    if event is not None and home.type == "cuda":
        torch.cuda.current_stream(home).wait_event(event)


def cfg_parallel(engines: Mapping[str, Engine], second: Engine, *, home: str | torch.device | None = None
                 ) -> dict[str, Engine]:
    """``engines`` with its ``unet_adaptor`` replaced by a `CFGParallelEngine` over it and ``second`` (a
    second ``unet_adaptor`` engine, typically on another GPU)."""
    out = dict(engines)
    out["unet_adaptor"] = CFGParallelEngine(engines["unet_adaptor"], second, home=home)
    return out


def split_devices(devices: Sequence[str | torch.device]) -> list[torch.device]:
    """Parse a device list (``["cuda:0", "cuda:1"]`` or one comma-separated string)."""
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    return [torch.device(str(d).strip()) for d in devices]


__all__ = ["CFGParallelEngine", "cfg_parallel", "split_devices"]
