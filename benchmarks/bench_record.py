"""Recording a run: one JSON per run with the knobs, machine, versions and every case."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench_options import BENCH_DIR, REPO_ROOT, BenchOptions


def load_report_module():
    spec = importlib.util.spec_from_file_location("supir_rt_bench_report", BENCH_DIR / "report.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for name in ("numpy", "onnx", "onnxruntime", "tensorrt", "pytest_benchmark"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
            out[name] = None if isinstance(err, ImportError) else f"unusable: {err}"
    try:
        out["supir_rt_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["supir_rt_commit"] = None
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = None
    m = {"hostname": socket.gethostname(), "cpu": cpu, "cpu_cores": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "ram_bytes": total, "os": platform.platform(),
         "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=p.name, gpu_memory_bytes=p.total_memory, compute_capability=f"{p.major}.{p.minor}",
                 tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return m


@dataclass
class Recorder:
    """One JSON per run: the knobs, machine and versions once, then every case (rewritten after each)."""

    opts: BenchOptions
    path: Path
    run: dict[str, Any] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: dict[str, Any]) -> None:
        if hasattr(os, "getloadavg"):  # other processes on the cores distort CPU timings: keep the evidence
            case["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        self.cases.append(case)
        self.save()

    def save(self) -> None:
        report = load_report_module()
        report.add_reference_ratios(self.cases)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ignore = self.path.parent / ".gitignore"  # runs are outputs: figures go to RESULTS.md
        if not ignore.exists():
            ignore.write_text("*\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.run, "cases": self.cases}, indent=1, default=str))
        tmp.replace(self.path)


def timing_of(benchmark: Any) -> dict[str, Any] | None:
    """pytest-benchmark's statistics in seconds; None when timing is disabled (--benchmark-disable)."""
    meta = getattr(benchmark, "stats", None)
    if meta is None or getattr(benchmark, "disabled", False):
        return None
    s = meta.stats
    return {"median_s": s.median, "mean_s": s.mean, "min_s": s.min, "max_s": s.max, "stddev_s": s.stddev,
            "rounds": s.rounds}


class FallbackBenchmark:
    """Stand-in for pytest-benchmark's fixture where the plugin is not installed (e.g. a GPU box that
    installs nothing): the same `pedantic` / `stats` / `extra_info` / `disabled` surface, timed with
    perf_counter, nothing else."""

    def __init__(self) -> None:
        self.disabled, self.group, self.extra_info, self.stats = False, None, {}, None

    def pedantic(self, target: Callable[[], Any], *, rounds: int = 1, warmup_rounds: int = 0,
                 iterations: int = 1) -> None:
        import statistics
        from types import SimpleNamespace

        for _ in range(warmup_rounds):
            target()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iterations):
                target()
            times.append((time.perf_counter() - t0) / iterations)
        self.stats = SimpleNamespace(stats=SimpleNamespace(
            median=statistics.median(times), mean=statistics.fmean(times), min=min(times), max=max(times),
            stddev=statistics.stdev(times) if len(times) > 1 else 0.0, rounds=len(times)))
