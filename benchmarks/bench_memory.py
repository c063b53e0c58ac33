"""Memory for the benchmarks: peak RSS / CUDA peak of a block, and skipping what cannot fit now."""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class CaseSkipped(Exception):
    """A case cannot run here; the message is the true reason (recorded, then pytest.skip)."""


def mem_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 60  # not Linux: no guard


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def memory_probe(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory of the block: process RSS (all backends) and, on CUDA, torch's allocator peak.

    `peak_rss_bytes` is the whole process (weights of every resident part included);
    `peak_rss_delta_bytes` is the growth over the RSS when the block started (activations, buffers).
    """
    out: dict[str, Any] = {}
    gc.collect()
    exact = _reset_peak_rss()
    before = _rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    yield out
    peak = _peak_rss()
    out.update(rss_before_bytes=before, peak_rss_bytes=peak, peak_rss_delta_bytes=max(0, peak - before),
               peak_rss_scope="block" if exact else "process lifetime (clear_refs not writable)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out.update(peak_cuda_bytes=torch.cuda.max_memory_allocated(device),
                   cuda_before_bytes=cuda_before)


def require_memory(need: int, what: str, device: torch.device) -> None:
    """Skip (with the numbers) what would not fit in host memory now, or in GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise CaseSkipped(f"{what} needs ~{need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")
        return
    avail = mem_available()
    if need > avail:
        raise CaseSkipped(f"{what} needs ~{need / 2**30:.1f} GiB of RAM, {avail / 2**30:.1f} GiB available now")


def param_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
