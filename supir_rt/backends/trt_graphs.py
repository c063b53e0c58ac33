"""CUDA streams and graphs for the TensorRT engines: the CUDA seam and per-shape graph capture.

`TorchCuda` is every CUDA call the TensorRT backend makes, in one place, so the CPU tests can run
the backend on a stand-in (tests/backends/fake_tensorrt.py `FakeCuda`).

Graphs (``cuda_graphs=True``, the per-step `unet_adaptor` only): per input shape, a graph is captured
only right after a plain run of that same shape on the context (trtexec's "avoid capturing
initialization calls": a shape or profile change needs one warm-up enqueue first), then replayed.
A graph bakes in the input shapes, the tensor addresses and the activation arena's address; so
each shape has its own graph (its `Slot`), the inputs are copied into the slot's fixed buffers, and
every graph of an engine is dropped when the shared arena moves (`drop_graphs`). A capture that
fails (an enqueue that returns False during capture, or CUDA refusing it) logs one warning and that
shape keeps running without a graph. Graphs are not used while weights stream (TensorRT enqueues
synchronously then: NvInferRuntime.h enqueueV3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from supir_rt.backends.manifest import GpuTarget

log = logging.getLogger(__name__)

GRAPH_NETWORKS = ("unet_adaptor",)  # the per-step call; the others run once per image


class TorchCuda:
    """The CUDA calls the backend makes, in one place, so tests can run the backend on a stand-in."""

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def target(self, trt_version: str, flavour: str = "tensorrt") -> GpuTarget:
        cc = torch.cuda.get_device_capability()
        return GpuTarget(torch.cuda.get_device_name(), (cc[0], cc[1]), trt_version, flavour)

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def retire(self, ptr: int, nbytes: int) -> None:
        """A device buffer (the old arena) is being freed: nothing may use `ptr` after this. Torch's
        caching allocator needs no call (the stand-in checks that nothing does)."""

    def capture(self, run: Callable[[], None], stream) -> Callable[[], None]:
        """Record `run` (which enqueues on `stream`) into a CUDA graph; returns its replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        return graph.replay


class Slot:
    """Buffers (and graph) for one input shape: outputs, staging inputs, chosen profile."""

    def __init__(self, key: tuple, profile: int, outputs: dict[str, torch.Tensor]) -> None:
        self.key, self.profile, self.outputs = key, profile, outputs
        self.inputs: dict[str, torch.Tensor] = {}
        self.runs = 0
        self.checked = False  # output buffers compared with the context's shapes once
        self.replay: Callable[[], None] | None = None
        self.graph_failed = False


def drop_graphs(slots: Iterable[Slot]) -> None:
    """Forget every graph (they recorded an arena address that is no longer valid)."""
    for s in slots:
        s.replay, s.runs = None, 0


def run_slot(slot: Slot, *, graphs: bool, warm: bool, enqueue: Callable[[], None], restage: Callable[[], None],
             cuda: TorchCuda, stream, name: str) -> None:
    """One run of `slot`: replay its graph, or capture one (`graphs` and `warm`: the previous run on
    this context was a plain run of this shape), or a plain enqueue. `restage` rebinds the inputs in
    place for the plain run that replaces a failed capture."""
    if slot.replay is not None:
        slot.replay()
    elif graphs and warm:
        try:
            slot.replay = cuda.capture(enqueue, stream)
            slot.replay()
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to plain runs
            log.warning("%s: CUDA graph capture failed for shapes %s (%s); running without a graph", name,
                        slot.key, err)
            slot.graph_failed, slot.replay = True, None
            restage()
            enqueue()
    else:
        enqueue()
    slot.runs += 1


__all__ = ["TorchCuda", "Slot", "GRAPH_NETWORKS", "drop_graphs", "run_slot"]
