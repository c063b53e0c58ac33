"""Shared fixtures: the tiny configuration, a tiny random model; the `requires_cuda` marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from supir_rt.config import ModelConfig


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.requires_cuda` tests run only where torch sees a CUDA GPU (skipped, with the reason, elsewhere)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A tiny SUPIR model with seeded random weights; treat as read-only (session-scoped)."""
    from supir_rt.model.supir import build_model

    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model, tmp_path_factory) -> Path:
    """All five tiny networks as fp32 ONNX artifacts with manifests, exported once per session (read-only for
    tests: tests/backends/test_tensorrt.py hard-links it)."""
    pytest.importorskip("onnx", reason="the tiny ONNX export needs the [onnx] extra (onnx, onnxruntime)")
    from supir_rt.backends.onnx_export import export_all

    return export_all(tiny_model, tmp_path_factory.mktemp("onnx_tiny"), precision="fp32", progress=False,
                      source={"kind": "random-init", "seed": 0})


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests must not leak a changed default dtype or grad mode into each other."""
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
