"""The memory planner's decisions for the official model on faked 12 GB / 24 GB / 80 GB GPUs, with the
budget read from the (fake) driver and PyTorch's allocator as `plan_tiling` reads it."""

from __future__ import annotations

import pytest
import torch

from supir_rt.backends.placement import MemoryPlan
from supir_rt.config import ModelConfig
from supir_rt.tiling.policy import GiB, TilingSettings, plan_tiling
from supir_rt.model.supir import build_model

OFFICIAL = ModelConfig.official()
# the resident weights of the default CUDA plan: UNet + adaptor in fp16 (3.9 B parameters)
WEIGHTS = MemoryPlan.for_device("cuda:0").weight_bytes(build_model(OFFICIAL, device="meta"))["device"]


def _plan(side: int):
    return plan_tiling(OFFICIAL, (side, side), TilingSettings(), device=torch.device("cuda:0"), dtype="fp16",
                       backend="torch")


def _vae_gb(side: int) -> float:
    """The untiled VAE estimate written out (memory.py's formula): 6·ch float32 values per image px plus
    8·ch_mult[-1]·ch per latent px, ch = 128, ch_mult[-1] = 4; no attention scores (fused SDPA kernel)."""
    return (6 * 128 * side * side + 8 * 4 * 128 * (side // 8) ** 2) * 4 / GiB


@pytest.mark.parametrize("total_gib, side, vae_tiled", [
    (12, 1024, False), (12, 2048, True),  # 12 GB: 12 − 7.2 (weights) − 0.5 (context) = 4.3 GiB budget
    (24, 1024, False), (24, 2048, False),  # 24 GB: 16.3 GiB; the 2048² VAE needs 12.9 GiB
    (80, 2048, False),
])
def test_planner_decisions_on_faked_gpus(fake, total_gib, side, vae_tiled):
    """Defect 5: the planner charged the VAE's untiled attention the full tokens x tokens score matrix
    (16 GiB at 2048²) although the PyTorch VAE's SDPA takes a fused kernel (test_restore checks which one);
    it then tiled the 2048² VAE on a 24 GB card (checked by hand: with ``values += latent * latent`` back
    in `vae_bytes` the (24, 2048) case fails)."""
    fake.device.total = total_gib * GiB
    fake.device.allocated = fake.device.reserved = WEIGHTS
    budget = total_gib * GiB - WEIGHTS - fake.device.context
    plan = _plan(side)
    assert plan.budget_bytes == budget
    assert plan.vae_tiled == (_vae_gb(side) * GiB > budget) == vae_tiled
    assert not plan.sampler_tiled  # one UNet call at 2048² (16·320 values per latent px, fp16) is ~1.3 GiB


def test_budget_does_not_shrink_when_pytorch_caches_memory(fake):
    """Defect 4: `available_memory` counted memory PyTorch had cached (the previous image's activations,
    a CUDA-graph pool) as used, so the second identical request got a smaller budget and tiled differently
    (checked by hand: with ``free`` alone as the budget the second plan tiles the VAE)."""
    fake.device.total = 24 * GiB
    fake.device.allocated = fake.device.reserved = WEIGHTS
    first = _plan(2048)
    fake.device.reserved = WEIGHTS + 6 * GiB  # after one image: 6 GiB cached, the driver sees it as used
    second = _plan(2048)
    assert fake.device.mem_get_info()[0] == first.budget_bytes - 6 * GiB
    assert second.budget_bytes == first.budget_bytes and second.vae_tiled == first.vae_tiled is False
