"""GPU-only: the torch backend on CUDA computes what it computes on the CPU (skipped without CUDA).

fp32 with TF32 off on both sides, so the two differ only by kernel summation order: measured
1e-7..5e-6 of the output scale between CPU backends (benchmarks/RESULTS.md), bound 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from supir_rt.backends import open_engines
from supir_rt.backends.specs import NETWORKS, network_specs
from supir_rt.config import ModelConfig
from supir_rt.model.supir import build_model


@pytest.fixture()
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.requires_cuda
def test_every_network_on_cuda_matches_the_cpu(no_tf32):
    config = ModelConfig.tiny()
    torch.manual_seed(0)
    cpu_model = build_model(config)
    gpu_model = build_model(config, device="cuda", init=False)
    gpu_model.load_state_dict(cpu_model.state_dict())
    cpu, gpu = open_engines("torch", model=cpu_model), open_engines("torch", model=gpu_model)
    specs = network_specs(config)
    for i, name in enumerate(NETWORKS):
        feed = specs[name].sample_inputs({"B": 1, "h": 16, "w": 24}, generator=torch.Generator().manual_seed(i))
        ref = {k: v.clone() for k, v in cpu[name].infer(feed).items()}
        out = gpu[name].infer({k: v.cuda() for k, v in feed.items()})
        for key, expected in ref.items():
            got = out[key].float().cpu()
            err = (got - expected).abs().max().item()
            assert err <= 1e-4 * expected.abs().max().item(), f"{name}.{key}: {err:.3e}"
