"""Every call supir-rt makes into the CUDA runtime itself, one small function each.

Tensor operations on CUDA tensors are not here (they go through PyTorch's dispatcher, where the
fake-CUDA test layer, ``tests/fake_cuda``, sees them); what is here needs a real driver: device
count and properties, free / cached memory, generators, graph capture, synchronisation. The fake-CUDA
tests replace these functions (module attributes, so call them as ``cuda_runtime.name(...)``), and the
code around each call is then traced on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def built_with_cuda() -> bool:
    """Whether this PyTorch build has CUDA at all (a ``+cpu`` wheel does not)."""
    return torch.version.cuda is not None


def is_available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    return torch.cuda.device_count() if is_available() else 0


def current_device() -> int:
    return torch.cuda.current_device()


def normalize_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` with an index-less ``cuda`` resolved to the current device, as every CUDA
    tensor reports it (``torch.device("cuda") != torch.device("cuda:0")``): compare and cache only
    normalised devices. Without a usable GPU ``cuda`` stays as it is (device checks refuse it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_available():
        return torch.device("cuda", current_device())
    return device


def capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def mem_get_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device as the driver sees it (other processes, the CUDA context and
    PyTorch's cache all count as used)."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def memory_stats(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) bytes of PyTorch's caching allocator on the device: reserved − allocated is
    cached memory PyTorch hands out again without asking the driver."""
    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))


def reset_peak_memory(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, int]:
    """(max allocated, max reserved) bytes since the last `reset_peak_memory`."""
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


def synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def empty_cache() -> None:
    torch.cuda.empty_cache()


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator that draws on ``device`` (its own random stream, like the official run's)."""
    return torch.Generator(device).manual_seed(seed)


def is_capturing() -> bool:
    """Whether the current stream is capturing a CUDA graph (an error then must not be retried eagerly:
    the capture is broken and the eager call would be captured too)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def capture_graph(fn: Callable, static: list[torch.Tensor]):
    """One warm-up call of ``fn(*static)`` on a side stream, then a captured call; returns
    (replay, static outputs): ``replay()`` reruns the captured kernels on whatever ``static`` holds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph.replay, out


__all__ = [
    "built_with_cuda", "capability", "capture_graph", "current_device", "device_count", "device_name", "empty_cache",
    "generator", "is_available", "is_capturing", "mem_get_info", "memory_stats", "normalize_device", "peak_memory",
    "reset_peak_memory", "synchronize",
]
