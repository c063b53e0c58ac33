"""Split placement and CFG-parallel traced on two fake GPUs (``cuda:0`` + ``cuda:1``), without a GPU.

Needs the CUDA build of PyTorch (skipped under the CPU build). PyTorch's `FakeTensorMode` gives every
tensor a device and no data, and refuses any operation that mixes ``cuda:0`` and ``cuda:1`` tensors
("found two different devices"), as a real GPU would. So these tests prove the device bookkeeping:
each network computes on the device the plan gives it, the pipeline moves tensors between the two
GPUs only through explicit copies, and the CFG-parallel halves come back to the home GPU. What only
real GPUs show: the two devices actually computing at once (stream/event ordering), the speedup,
and memory use (docs/scale.md has the commands).
"""

from __future__ import annotations

import pytest
import torch

if torch.version.cuda is None:
    pytest.skip("needs the CUDA build of PyTorch (fake CUDA devices)", allow_module_level=True)

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from supir_rt.backends import parallel  # noqa: E402
from supir_rt.backends.placement import MemoryPlan  # noqa: E402
from supir_rt.backends.torch_backend import TorchOptions, open_torch_engines  # noqa: E402
from supir_rt.config import ModelConfig  # noqa: E402
from supir_rt.denoiser import EpsDenoiser, GuidedDenoiser, LinearCFG  # noqa: E402
from supir_rt.model.supir import build_model  # noqa: E402
from supir_rt.schedule import legacy_ddpm_sigmas  # noqa: E402

GPU0, GPU1 = torch.device("cuda:0"), torch.device("cuda:1")


@pytest.fixture
def fake_mode():
    # Module.to() must replace the parameters (a fake tensor cannot be swapped into a real one's place)
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)


def _fake_placed(config: ModelConfig, plan: MemoryPlan) -> torch.nn.Module:
    """The tiny model with every part's weights as fake tensors at its home in the plan, in its dtype
    (what `place_model` does; `Module.to` itself cannot swap fake tensors in, so each tensor is set)."""
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        model = build_model(config, device="meta")  # the module tree only
    for part, (home, dtype) in plan.part_placements().items():
        for sub in model.get_submodule(part).modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is not None:
                        new = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=home)
                        table[name] = torch.nn.Parameter(new, requires_grad=False) if table is sub._parameters else new
    return model.eval()


def _open(model, plan, **kwargs):
    # channels-last is a memory format, not a device question; Module.to(memory_format=) cannot swap fakes
    return open_torch_engines(model=model, plan=plan, options=TorchOptions(channels_last=False), **kwargs)


def _one_step(engines, cond, uncond, x):
    """One guided denoiser call on the unet_adaptor engine(s), as the sampler makes it."""
    from supir_rt.stages import engine_network

    table = legacy_ddpm_sigmas().to(x.device)
    guided = GuidedDenoiser(EpsDenoiser(engine_network(engines["unet_adaptor"]), table), cond, uncond,
                            LinearCFG.constant(4.0))
    sigma = torch.full((1,), 3.0, device=x.device)
    return guided(x, sigma, sigma)


def test_split_placement_runs_each_network_on_its_gpu(fake_mode):
    from supir_rt.stages import encode_prompt, prepare_condition, stage1
    from supir_rt.tokenizer import load_tokenizer

    config = ModelConfig.tiny()
    plan = MemoryPlan.split((GPU0, GPU1))
    model = _fake_placed(config, plan)
    engines = _open(model, plan)
    assert {n: e.device for n, e in engines.items()} == {
        "unet_adaptor": GPU0, "text_encoders": GPU1, "dr_encoder": GPU1, "vae_encoder": GPU1, "vae_decoder": GPU1}
    assert next(model.model.parameters()).device == GPU0
    assert next(model.first_stage_model.decoder.parameters()).device == GPU1
    assert next(model.first_stage_model.decoder.parameters()).dtype == torch.bfloat16

    lq = torch.randn(1, 3, 64, 64, device=GPU0)  # the pipeline's device is the UNet's
    first = stage1(engines, lq)  # DR encoder + decoder on cuda:1, results copied back to cuda:0
    assert first.control_latent.device == GPU0 and first.image.device == GPU0
    moments = engines["vae_encoder"].infer({"image": first.image})["moments"]
    assert moments.device == GPU1
    tok = load_tokenizer()
    pos, neg = (encode_prompt(engines, tok, p, config, GPU0) for p in ("a photo", "blurry"))
    assert pos["crossattn"].device == GPU0
    cond, uncond = prepare_condition(pos, neg, first.control_latent)
    x = torch.randn_like(first.control_latent)
    denoised = _one_step(engines, cond, uncond, x)
    assert denoised.device == GPU0 and denoised.shape == x.shape
    image = engines["vae_decoder"].infer({"latent": denoised})["image"].to(GPU0, copy=True)
    assert image.device == GPU0 and image.shape == (1, 3, 64, 64)


def test_cfg_parallel_runs_one_half_on_each_gpu(fake_mode, no_streams):
    config = ModelConfig.tiny()
    plans = [MemoryPlan.for_device(d, offload=False) for d in (GPU0, GPU1)]
    models = [_fake_placed(config, p) for p in plans]
    unets = [_open(m, p, networks=["unet_adaptor"])["unet_adaptor"] for m, p in zip(models, plans)]
    seen = []
    for u in unets:
        original = u._run
        u._run = lambda feed, original=original: seen.append({k: v.device for k, v in feed.items()}) or original(feed)
    engine = parallel.CFGParallelEngine(*unets, home=GPU0)
    feed = engine.spec.sample_inputs({"B": 1, "h": 8, "w": 8}, device=GPU0)
    eps = engine.infer(feed)["eps"]
    assert eps.device == GPU0 and eps.shape == feed["x_in"].shape and eps.dtype == torch.float32
    assert [set(d.values()) for d in seen] == [{GPU0}, {GPU1}]  # each half's whole feed on its engine's GPU
    # and inside a guided sampler step
    g = torch.Generator().manual_seed(0)
    text = {"crossattn": torch.randn(1, 77, config.network_config.context_dim, generator=g).to(GPU0),
            "vector": torch.randn(1, config.network_config.adm_in_channels, generator=g).to(GPU0),
            "control": torch.randn(1, 4, 8, 8, generator=g).to(GPU0)}
    denoised = _one_step({"unet_adaptor": engine}, text, dict(text), torch.randn(1, 4, 8, 8, device=GPU0))
    assert denoised.device == GPU0
