"""Fixtures for backend tests: engines over the tiny fp32 ONNX export (`tiny_onnx_dir`, tests/conftest.py)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("onnx", reason="the backend tests need the [onnx] extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="the backend tests need the [onnx] extra (onnx, onnxruntime)")


@pytest.fixture(scope="session")
def ort_engines(tiny_config, tiny_onnx_dir):
    from supir_rt.backends import open_engines

    engines = open_engines("onnxruntime", config=tiny_config, artifact_dir=tiny_onnx_dir)
    yield engines
    for e in engines.values():
        e.close()


@pytest.fixture(scope="session")
def torch_engines(tiny_model):
    from supir_rt.backends import open_engines

    return open_engines("torch", model=tiny_model)


_SURFACE = re.compile(r"\[(trt10|trt11|rtx)[\]-]")


def pytest_terminal_summary(terminalreporter) -> None:
    """Counts per TensorRT stand-in surface (test ids ``[trt10]``, ``[trt11]``, ``[rtx]``)."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            m = _SURFACE.search(getattr(report, "nodeid", "") or "")
            if m and getattr(report, "when", "call") in ("call", "setup") and not (
                    outcome == "passed" and report.when == "setup"):
                counts.setdefault(m.group(1), {}).setdefault(outcome, 0)
                counts[m.group(1)][outcome] += 1
    if counts:
        terminalreporter.write_sep("-", "TensorRT stand-in surfaces")
        for surface in ("trt10", "trt11", "rtx"):
            if surface in counts:
                terminalreporter.write_line(f"{surface}: " + ", ".join(f"{n} {k}" for k, n in
                                                                        sorted(counts[surface].items())))
