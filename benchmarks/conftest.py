"""Hooks and fixtures of `pytest benchmarks/` (issue 6): parity first, then time, then record.

Every case (one network or one end-to-end restore, on one backend, precision and shape) asserts
parity with the PyTorch eager fp32 output on the same feed, times with `benchmark.pedantic`, records
peak memory (RSS on CPU, `max_memory_allocated` on CUDA) and lands in one JSON per run
(`--results-dir`), with every knob as a field. The Markdown table of the run is printed last.

The machinery lives in modules beside this file, one concern each: `bench_options` (command-line
knobs), `bench_memory` (peak memory, skipping what cannot fit), `bench_engines` (the model, its parts
materialised on demand, and the engines per backend), `bench_parity` (metric and tolerances) and
`bench_record` (the run's JSON). Test modules get them through the `kit` fixture (conftest itself is
not importable by name: `tests/` has a conftest too).

Memory: the `full` architecture is ~4.8 B parameters (19 GB in fp32). Parts of the model
(`first_stage_model`, `model`, `conditioner`) are therefore materialised on demand, with seeded
random weights, and on CPU only one part is resident at a time; cases that cannot fit in the memory
available right now are skipped with the numbers in the reason, never run into swap or the OOM killer.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import bench_parity
from bench_engines import EngineCache, ModelHost, count_flops
from bench_memory import CaseSkipped, memory_probe, param_bytes, require_memory, sync
from bench_options import BACKENDS, BENCH_DIR, PRECISIONS, REFERENCE, BenchOptions, add_options, read_options
from bench_record import FallbackBenchmark, Recorder, load_report_module, machine_info, timing_of, versions
from supir_rt.backends.specs import NETWORKS
from supir_rt.model import supir as supir_model


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over the command-line choices (backend, precision, latent); networks come from the test."""
    opts = read_options(metafunc.config)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", opts.backends)
    if "precision" in metafunc.fixturenames:
        metafunc.parametrize("precision", opts.precisions)
    if "network" in metafunc.fixturenames:
        # (network, latent) pairs; the text encoders do not depend on the latent: first one only.
        pairs = [(n, lat) for n in opts.networks for lat in opts.latents
                 if n != "text_encoders" or lat == opts.latents[0]]
        metafunc.parametrize(("network", "latent"), pairs,
                             ids=[n if n == "text_encoders" else f"{n}-{h}x{w}" for n, (h, w) in pairs])
    elif "latent" in metafunc.fixturenames:
        metafunc.parametrize("latent", opts.latents, ids=[f"{h}x{w}" for h, w in opts.latents])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order: network, backend (reference first), precision, latent: one network's weights, copies
    and sessions are built once and released before the next network (matters for `full` on CPU)."""
    def key(item: pytest.Item) -> tuple:
        p = getattr(item, "callspec", None)
        p = p.params if p else {}
        return (str(item.path), NETWORKS.index(p["network"]) if "network" in p else -1,
                BACKENDS.index(p["backend"]) if "backend" in p else -1,
                list(PRECISIONS).index(p["precision"]) if "precision" in p else -1, p.get("latent", (0, 0)))

    bench = [i for i in items if BENCH_DIR in Path(str(i.path)).parents]
    rest = [i for i in items if i not in bench]
    items[:] = rest + sorted(bench, key=key)


@pytest.fixture(scope="session")
def opts(pytestconfig: pytest.Config) -> BenchOptions:
    return read_options(pytestconfig)


@pytest.fixture(scope="session")
def host(opts: BenchOptions) -> ModelHost:
    return ModelHost(opts)


@pytest.fixture(scope="session")
def meta_model(opts: BenchOptions) -> nn.Module:
    """A weightless copy, for counting FLOPs."""
    return supir_model.build_model(opts.config, device="meta")


@pytest.fixture(scope="session")
def artifact_dir(opts: BenchOptions) -> Iterator[Path]:
    if opts.artifact_dir is not None:
        opts.artifact_dir.mkdir(parents=True, exist_ok=True)
        yield opts.artifact_dir
        return
    tmp = Path(tempfile.mkdtemp(prefix="supir-rt-bench-onnx-"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def engines(host: ModelHost, opts: BenchOptions, artifact_dir: Path) -> Iterator[EngineCache]:
    cache = EngineCache(host, opts, artifact_dir)
    yield cache
    cache.close_all()


def pytest_configure(config: pytest.Config) -> None:
    config._supir_recorder = None  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def recorder(opts: BenchOptions, pytestconfig: pytest.Config) -> Recorder:
    stamp = _dt.datetime.now(_dt.timezone.utc)
    name = f"run-{stamp:%Y%m%dT%H%M%SZ}-{opts.model_size}-{opts.device.type}.json"
    rec = Recorder(opts, opts.results_dir / name)
    rec.run = {"schema": 1, "date_utc": stamp.isoformat(timespec="seconds"),
               "command": "pytest " + " ".join(sys.argv[1:]) if "pytest" in sys.argv[0] else " ".join(sys.argv),
               "benchmark_disabled": bool(pytestconfig.getoption("benchmark_disable", False)),
               "options": opts.knobs(), "machine": machine_info(opts.device), "versions": versions()}
    pytestconfig._supir_recorder = rec  # type: ignore[attr-defined]
    return rec


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rec = getattr(config, "_supir_recorder", None)
    if rec is None or not rec.cases:
        return
    rec.save()
    report = load_report_module()
    terminalreporter.write_sep("=", "supir-rt benchmarks")
    terminalreporter.write_line(report.markdown_run(json.loads(rec.path.read_text())))
    terminalreporter.write_line(f"run saved to {rec.path}")


if importlib.util.find_spec("pytest_benchmark") is None:

    @pytest.fixture
    def benchmark() -> FallbackBenchmark:
        return FallbackBenchmark()


class Kit:
    """The helpers test modules use, handed out as a fixture (conftest is not imported by name:
    `tests/` has a conftest too, and the module name would be ambiguous)."""

    CaseSkipped = CaseSkipped
    REFERENCE = REFERENCE
    NETWORK_TOLERANCES = bench_parity.NETWORK_TOLERANCES
    count_flops = staticmethod(count_flops)
    memory_probe = staticmethod(memory_probe)
    parity = staticmethod(bench_parity.parity)
    restore_parity = staticmethod(bench_parity.restore_parity)
    require_memory = staticmethod(require_memory)
    param_bytes = staticmethod(param_bytes)
    sync = staticmethod(sync)
    timing_of = staticmethod(timing_of)


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    return Kit
