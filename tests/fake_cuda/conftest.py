"""The fake-CUDA layer (fake_cuda.py) as fixtures. These tests need the CUDA build of PyTorch (no GPU):
`.ci/run` runs them with the interpreter `.ci/fake_cuda_env.sh` prepares. Under the CPU build of the
main suite the folder is not collected."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if torch.version.cuda is None:  # the CPU build: nothing here can run (.ci/run runs it with the CUDA build)
    collect_ignore_glob = ["*.py"]
else:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture()
def fake():
    """One fake GPU (an 80 GB H100, sm_90); the test fails at teardown if the checker saw a violation
    that the code under test swallowed."""
    from fake_cuda import FakeCuda

    with FakeCuda() as fc:
        yield fc
    assert not fc.violations, "\n".join(fc.violations)


@pytest.fixture()
def fake2():
    """Two fake GPUs."""
    from fake_cuda import FakeCuda

    with FakeCuda(devices=2) as fc:
        yield fc
    assert not fc.violations, "\n".join(fc.violations)


@pytest.fixture()
def no_streams(monkeypatch):
    """CFG-parallel's stream and event calls (`parallel._on_device`, `parallel._record`) need a driver: made
    no-ops, so that the device of every tensor is what is traced."""
    import contextlib

    from supir_rt.backends import parallel

    monkeypatch.setattr(parallel, "_on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(parallel, "_record", lambda device: None)
