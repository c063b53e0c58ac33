"""What only a GPU with TensorRT 10.x can confirm (skipped elsewhere, with the reason).

    python -m pytest -q -rs tests/backends/test_tensorrt_gpu.py

Builds tiny fp16 plans with the real TensorRT and checks: parity with the torch backend on every
profile kind; the shared arena is the largest per-profile size TensorRT reports (logged at the
static and tile shapes), not the sum; `infer` never synchronises the host (torch's sync debug mode
turns any synchronisation into an error); CUDA graphs give the same results; TF32 really is on by
default in a fresh builder config; several profiles build with a fully refittable plan; refit with
other weights, stripped plans and weight streaming work. docs/engines.md lists the same checks.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch

from supir_rt.backends import open_engines
from supir_rt.backends.specs import DimRange, default_profiles
from supir_rt.backends.tensorrt_backend import tensorrt_unavailable

REASON = tensorrt_unavailable()
pytestmark = [pytest.mark.requires_tensorrt,
              pytest.mark.skipif(REASON is not None, reason=f"TensorRT backend unavailable: {REASON}")]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "export"))

FP16_TOL = dict(atol=2e-2, rtol=2e-2)  # fp16 plan vs the fp32 reference (see test_onnxruntime.py)
PROFILES = default_profiles(static_latent=(16, 16), tile_latent=32, tile_batch=2,
                            dynamic={"B": DimRange(1, 1, 2), "h": DimRange(8, 16, 32), "w": DimRange(8, 16, 32)})
SHAPES = {"static": {"B": 1, "h": 16, "w": 16}, "tile": {"B": 2, "h": 32, "w": 32}, "dynamic": {"B": 1, "h": 8, "w": 24}}
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def plans(tiny_model, tiny_config, tmp_path_factory):
    import build_trt

    from supir_rt.backends.onnx_export import export_all

    folder = tmp_path_factory.mktemp("trt_gpu")
    export_all(tiny_model, folder, precision="fp16", progress=False)
    build_trt.build_all(tiny_config, folder, precision="fp16", build=build_trt.BuildConfig(profiles=PROFILES))
    return folder


def _feed(spec, dims, seed=0):
    return {k: v.cuda() for k, v in spec.sample_inputs(dims, generator=torch.Generator().manual_seed(seed)).items()}


@pytest.mark.parametrize("network", ["text_encoders", "unet_adaptor", "vae_decoder", "dr_encoder", "vae_encoder"])
def test_plans_match_the_torch_backend_on_every_profile(plans, tiny_config, torch_engines, network):
    engine = open_engines("tensorrt", config=tiny_config, artifact_dir=plans, precision="fp16", networks=[network])[network]
    for name, dims in SHAPES.items():
        feed = _feed(engine.spec, dims)
        got = {k: v.cpu() for k, v in engine.infer(feed).items()}
        want = torch_engines[network].infer({k: v.cpu() for k, v in feed.items()})
        for out in want:
            torch.testing.assert_close(got[out], want[out], **FP16_TOL, msg=f"{network} on profile {name}")


def test_arena_is_the_largest_reported_size_and_infer_never_syncs(plans, tiny_config):
    engines = open_engines("tensorrt", config=tiny_config, artifact_dir=plans, precision="fp16")
    sizes = {}
    for name, e in engines.items():
        for i, p in enumerate(e.profiles):
            sizes[(name, p.name)] = e.engine.get_device_memory_size_for_profile_v2(i)
    log.warning("TensorRT activation sizes per (network, profile): %s", sizes)
    feeds = {(n, k): _feed(e.spec, d) for n, e in engines.items() for k, d in SHAPES.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for (name, _), feed in feeds.items():
            engines[name].infer(feed)  # first calls: arena, buffers, profiles
        for (name, _), feed in feeds.items():
            engines[name].infer(feed)  # steady state
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    arena = next(iter(engines.values()))._shared.arena
    used = [sizes[(n, e.profiles[i].name)] for n, e in engines.items() for i in range(len(e.profiles))
            if e.profiles[i].name in SHAPES]
    assert arena.size == max(used) < sum(used)


def test_cuda_graphs_give_the_same_results(plans, tiny_config):
    plain = open_engines("tensorrt", config=tiny_config, artifact_dir=plans, precision="fp16",
                         networks=["unet_adaptor"])["unet_adaptor"]
    graphed = open_engines("tensorrt", config=tiny_config, artifact_dir=plans, precision="fp16",
                           networks=["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    for seed in range(6):  # alternating shapes (and profiles): each replay runs on its own shapes
        feed = _feed(plain.spec, SHAPES["static" if seed % 2 else "dynamic"], seed)
        a = plain.infer(feed)["eps"].clone()
        b = graphed.infer(feed)["eps"].clone()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # same plan and kernels: equal up to reduction order
    assert any(s.replay is not None for s in graphed._slots.values()), "a graph was captured"


def test_tf32_is_on_in_a_fresh_builder_config():
    import tensorrt as trt

    config = trt.Builder(trt.Logger()).create_builder_config()
    assert config.get_flag(trt.BuilderFlag.TF32), "the stand-in assumes TensorRT's documented default"


def test_refit_stripped_and_weight_streaming(plans, tiny_config, tmp_path):
    import shutil

    import build_trt

    from supir_rt.backends.onnx_export import export_all
    from supir_rt.model.supir import build_model

    shutil.copy(plans / "vae_decoder_fp16.onnx", tmp_path / "vae_decoder_fp16.onnx")
    shutil.copy(plans / "vae_decoder_fp16.json", tmp_path / "vae_decoder_fp16.json")
    cfg = build_trt.BuildConfig(profiles=PROFILES, refit="full")  # several profiles in a fully refittable plan
    (_, action), = build_trt.build_all(tiny_config, tmp_path, precision="fp16", networks=["vae_decoder"], build=cfg)
    assert action == "built"
    torch.manual_seed(1)
    other = build_model(tiny_config)
    export_all(other, tmp_path, precision="fp16", networks=["vae_decoder"], progress=False)
    (_, action), = build_trt.build_all(tiny_config, tmp_path, precision="fp16", networks=["vae_decoder"], build=cfg,
                                       refit=True)
    assert action == "refitted"
    from supir_rt.backends import open_engines as oe

    trt_e = oe("tensorrt", config=tiny_config, artifact_dir=tmp_path, precision="fp16", networks=["vae_decoder"])
    torch_e = oe("torch", model=other)
    feed = _feed(trt_e["vae_decoder"].spec, SHAPES["static"])
    torch.testing.assert_close(trt_e["vae_decoder"].infer(feed)["image"].cpu(),
                               torch_e["vae_decoder"].infer({k: v.cpu() for k, v in feed.items()})["image"], **FP16_TOL)
    stripped = dataclasses.replace(cfg, strip_weights=True, refit="identical")
    build_trt.build_all(tiny_config, tmp_path, precision="fp16", networks=["vae_decoder"], build=stripped)
    trt_s = oe("tensorrt", config=tiny_config, artifact_dir=tmp_path, precision="fp16", networks=["vae_decoder"])
    torch.testing.assert_close(trt_s["vae_decoder"].infer(feed)["image"].cpu(),
                               torch_e["vae_decoder"].infer({k: v.cpu() for k, v in feed.items()})["image"], **FP16_TOL)
    streaming = dataclasses.replace(cfg, weight_streaming=True)
    build_trt.build_all(tiny_config, plans, precision="fp16", networks=["unet_adaptor"], build=streaming,
                        weight_budget=1 << 20)
    unet = oe("tensorrt", config=tiny_config, artifact_dir=plans, precision="fp16", networks=["unet_adaptor"])
    assert unet["unet_adaptor"].engine.weight_streaming_budget_v2 == 1 << 20
    unet["unet_adaptor"].infer(_feed(unet["unet_adaptor"].spec, SHAPES["static"]))
    torch.cuda.synchronize()
