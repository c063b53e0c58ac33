"""The parity tolerances themselves: tight enough to fail a wrong UNet, loose enough to pass a correct
half-precision one. Runs on the tiny model whatever the suite's options (a few seconds on a CPU);
the evidence behind the numbers is `measure_precision.py` (RESULTS.md, "Parity tolerances")."""

from __future__ import annotations

import pytest
import torch

from bench_parity import NETWORK_TOLERANCES, rel_error
from measure_precision import engines_for, feed_for
from supir_rt.config import ModelConfig
from supir_rt.model.supir import build_model

LATENT = (16, 16)


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def tiny(request):
    torch.manual_seed(request.param)
    model = build_model(ModelConfig.tiny())
    feed = feed_for(model, "unet_adaptor", LATENT, request.param)
    reference = engines_for(model, ["unet_adaptor"], torch.float32)["unet_adaptor"].infer(feed)
    return model, feed, {k: v.clone() for k, v in reference.items()}


def test_a_perturbed_unet_fails_parity_at_every_precision(tiny):
    """One decoder convolution of the UNet with noise of 30 % of its weights' std (a wrong model that
    still produces plausible numbers; measured 0.10-0.12) is outside every precision's bound; the former
    bf16 bound (0.15) let it through."""
    model, feed, reference = tiny
    unet = model.model.diffusion_model
    conv = unet.output_blocks[len(unet.output_blocks) // 2][0].in_layers[2]
    saved = conv.weight.detach().clone()
    try:
        with torch.no_grad():
            conv.weight.add_(0.3 * saved.std() * torch.randn(saved.shape, generator=torch.Generator().manual_seed(99)))
        err = rel_error(engines_for(model, ["unet_adaptor"], torch.float32)["unet_adaptor"].infer(feed), reference)
    finally:
        conv.weight.data.copy_(saved)
    assert err > max(t["unet_adaptor"] for t in NETWORK_TOLERANCES.values())


def test_a_swapped_control_scale_fails_parity(tiny):
    """The adaptor at the wrong strength (the fed control scale lowered by 0.3) is caught too."""
    model, feed, reference = tiny
    wrong = dict(feed, control_scale=torch.clamp(feed["control_scale"] - 0.3, min=0.0))
    err = rel_error(engines_for(model, ["unet_adaptor"], torch.float32)["unet_adaptor"].infer(wrong), reference)
    assert err > NETWORK_TOLERANCES["bf16"]["unet_adaptor"]


def test_a_correct_bf16_unet_passes(tiny):
    """bf16 (native on CPUs with AVX512-BF16, emulated elsewhere) stays inside its bound; fp16 is measured
    by measure_precision.py only (emulated on a CPU: tens of seconds per call)."""
    model, feed, reference = tiny
    err = rel_error(engines_for(model, ["unet_adaptor"], torch.bfloat16)["unet_adaptor"].infer(feed), reference)
    assert 1e-3 < err <= NETWORK_TOLERANCES["bf16"]["unet_adaptor"]  # really rounded, and within the bound
