"""Fixtures for backend tests: the tiny model exported once per session to fp32 ONNX."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="the backend tests need the [onnx] extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="the backend tests need the [onnx] extra (onnx, onnxruntime)")


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model, tmp_path_factory) -> Path:
    """All five tiny networks as fp32 ONNX artifacts with manifests (read-only for tests)."""
    from supir_rt.backends.onnx_export import export_all

    return export_all(tiny_model, tmp_path_factory.mktemp("onnx_tiny"), precision="fp32", progress=False,
                      source={"kind": "random-init", "seed": 0})


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
