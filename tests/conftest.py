"""Shared fixtures: the tiny configuration, a tiny random model, markers for GPU-only tests."""

from __future__ import annotations

import pytest
import torch

from supir_rt.config import ModelConfig

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A tiny SUPIR model with seeded random weights; treat as read-only (session-scoped)."""
    from supir_rt.model.supir import build_model

    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests must not leak a changed default dtype or grad mode into each other."""
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
