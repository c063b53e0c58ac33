"""What only a GPU with real TensorRT (10.x or 11.x) or TensorRT-RTX can confirm (skipped elsewhere).

    python -m pytest -q -rs tests/backends/test_tensorrt_gpu.py -s    # -s shows the benchmark row

Each test runs for every installed flavour (``[tensorrt]``, ``[tensorrt-rtx]``) and builds tiny
fp16 plans (fp32 VAE and DR encoder) with the default build settings. It checks: parity with the
torch backend on every profile kind, and that the profile which ran is the one expected (fp16
networks at 2e-2, fp32 networks at 1e-3); the shared arena is the largest per-profile size TensorRT
reports, not the sum, with the outputs still right and `infer` never synchronising the host
(torch's sync debug mode turns any synchronisation into an error); work is enqueued on the engines'
own stream, never the default stream; CUDA graphs give the same results; TF32 really is on by
default; the default build (refit only with one profile) builds, a one-profile ``full`` plan
refits with other weights, stripped plans are refilled and weight streaming gives the right
results; and a timing row, TensorRT (graphs off and on) against torch, measured with CUDA events.
docs/engines.md lists the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from supir_rt.backends import open_engines
from supir_rt.backends.specs import DimRange, default_profiles
from supir_rt.backends.tensorrt_backend import tensorrt_unavailable

REASONS = {f: tensorrt_unavailable(flavour=f) for f in ("tensorrt", "tensorrt-rtx")}
pytestmark = [pytest.mark.requires_tensorrt,
              pytest.mark.skipif(all(REASONS.values()), reason=f"TensorRT backends unavailable: {REASONS}")]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "export"))

FP16_TOL = dict(atol=2e-2, rtol=2e-2)  # fp16 plan vs the fp32 reference (see test_onnxruntime.py)
FP32_TOL = dict(atol=1e-3, rtol=1e-3)  # fp32 networks (TF32 tactics allowed)
FP32_NETWORKS = ("vae_encoder", "vae_decoder", "dr_encoder")
DYNAMIC = {"B": DimRange(1, 1, 2), "h": DimRange(8, 16, 32), "w": DimRange(8, 16, 32)}
PROFILES = default_profiles(static_latent=(16, 16), tile_latent=32, tile_batch=2, dynamic=DYNAMIC)
ONE_PROFILE = default_profiles(static_latent=None, tile_latent=None, dynamic=DYNAMIC)
SHAPES = {"static": {"B": 1, "h": 16, "w": 16}, "tile": {"B": 2, "h": 32, "w": 32}, "dynamic": {"B": 1, "h": 8, "w": 24}}
log = logging.getLogger(__name__)


def tol(network: str) -> dict:
    return FP32_TOL if network in FP32_NETWORKS else FP16_TOL


@pytest.fixture(scope="module", params=["tensorrt", "tensorrt-rtx"])
def flavour(request):
    if REASONS[request.param]:
        pytest.skip(f"{request.param} unavailable: {REASONS[request.param]}")
    return request.param


@pytest.fixture(scope="module")
def plans(tiny_model, tiny_config, tmp_path_factory, flavour):
    import build_trt

    from supir_rt.backends.onnx_export import export_all

    folder = tmp_path_factory.mktemp(f"gpu_{flavour}")
    export_all(tiny_model, folder, precision="fp16", progress=False)
    build_trt.build_all(tiny_config, folder, precision="fp16", build=build_trt.BuildConfig(profiles=PROFILES),
                        flavour=flavour)
    return folder


def _open(flavour, config, folder, networks=None, **kw):
    return open_engines(flavour, config=config, artifact_dir=folder, precision="fp16", networks=networks, **kw)


def _feed(spec, dims, seed=0):
    return {k: v.cuda() for k, v in spec.sample_inputs(dims, generator=torch.Generator().manual_seed(seed)).items()}


def _want(torch_engine, feed):
    return torch_engine.infer({k: v.cpu() for k, v in feed.items()})


@pytest.mark.parametrize("network", ["text_encoders", "unet_adaptor", "vae_decoder", "dr_encoder", "vae_encoder"])
def test_plans_match_the_torch_backend_on_every_profile(plans, flavour, tiny_config, torch_engines, network):
    engine = _open(flavour, tiny_config, plans, [network])[network]
    for name, dims in SHAPES.items():
        if name not in [p.name for p in engine.profiles]:
            continue  # the tile profile is the UNet's only
        feed = _feed(engine.spec, dims)
        got = {k: v.cpu() for k, v in engine.infer(feed).items()}
        assert engine.profiles[engine.context.active_optimization_profile].name == name, "the expected profile ran"
        want = _want(torch_engines[network], feed)
        for out in want:
            torch.testing.assert_close(got[out], want[out], **tol(network), msg=f"{network} on profile {name}")


def test_shared_arena_is_the_largest_size_outputs_right_no_sync_own_stream(plans, flavour, tiny_config,
                                                                            torch_engines):
    engines = _open(flavour, tiny_config, plans)
    sizes = {(n, p.name): e.engine.get_device_memory_size_for_profile_v2(i)
             for n, e in engines.items() for i, p in enumerate(e.profiles)}
    log.warning("TensorRT activation sizes per (network, profile): %s", sizes)
    feeds = {(n, k): _feed(e.spec, d) for n, e in engines.items() for k, d in SHAPES.items()
             if k in [p.name for p in e.profiles]}
    results = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for (name, _), feed in feeds.items():
            engines[name].infer(feed)  # first calls: arena, buffers, profiles
        for key, feed in feeds.items():
            results[key] = {k: v.clone() for k, v in engines[key[0]].infer(feed).items()}  # steady state
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    stream = next(iter(engines.values()))._shared.stream
    assert stream.cuda_stream not in (0, torch.cuda.default_stream().cuda_stream), "enqueued on the default stream"
    arena = next(iter(engines.values()))._shared.arena
    used = [sizes[k] for k in feeds]
    assert arena.size == max(used) < sum(used)
    for (name, shape), got in results.items():  # the arena shared by every engine did not corrupt any output
        want = _want(torch_engines[name], feeds[(name, shape)])
        for out in want:
            torch.testing.assert_close(got[out].cpu(), want[out], **tol(name), msg=f"{name} at {shape}")


def test_cuda_graphs_give_the_same_results(plans, flavour, tiny_config):
    plain = _open(flavour, tiny_config, plans, ["unet_adaptor"])["unet_adaptor"]
    graphed = _open(flavour, tiny_config, plans, ["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    for seed in range(8):  # pairs of shapes (and profiles): warm-up, capture, then replays on their own shapes
        feed = _feed(plain.spec, SHAPES["static" if (seed // 2) % 2 else "dynamic"], seed)
        a = plain.infer(feed)["eps"].clone()
        b = graphed.infer(feed)["eps"].clone()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # same plan and kernels: equal up to reduction order
    assert any(s.replay is not None for s in graphed._slots.values()), "a graph was captured"


def test_tf32_is_on_in_a_fresh_builder_config(flavour):
    from supir_rt.backends.trt_api import require

    trt = require(flavour)
    config = trt.Builder(trt.Logger()).create_builder_config()
    assert config.get_flag(trt.BuilderFlag.TF32), "the stand-in assumes TensorRT's documented default"


def test_refit_stripped_and_weight_streaming(plans, flavour, tiny_config, torch_engines, tmp_path):
    import build_trt

    from supir_rt.backends.onnx_export import export_all
    from supir_rt.model.supir import build_model

    for name in ("vae_decoder_fp16.onnx", "vae_decoder_fp16.json"):
        shutil.copy(plans / name, tmp_path / name)
    cfg = build_trt.BuildConfig(profiles=ONE_PROFILE, refit="full")  # a refittable plan holds one profile
    (_, action), = build_trt.build_all(tiny_config, tmp_path, precision="fp16", networks=["vae_decoder"], build=cfg,
                                       flavour=flavour)
    assert action == "built"
    torch.manual_seed(1)
    other = build_model(tiny_config)
    export_all(other, tmp_path, precision="fp16", networks=["vae_decoder"], progress=False)
    (_, action), = build_trt.build_all(tiny_config, tmp_path, precision="fp16", networks=["vae_decoder"], build=cfg,
                                       refit=True, flavour=flavour)
    assert action == "refitted"
    trt_e = _open(flavour, tiny_config, tmp_path, ["vae_decoder"])
    torch_e = open_engines("torch", model=other)
    feed = _feed(trt_e["vae_decoder"].spec, SHAPES["dynamic"])
    torch.testing.assert_close(trt_e["vae_decoder"].infer(feed)["image"].cpu(), _want(torch_e["vae_decoder"], feed),
                               **FP32_TOL)
    stripped = dataclasses.replace(cfg, strip_weights=True, refit="identical")
    build_trt.build_all(tiny_config, tmp_path, precision="fp16", networks=["vae_decoder"], build=stripped,
                        flavour=flavour)
    trt_s = _open(flavour, tiny_config, tmp_path, ["vae_decoder"])
    torch.testing.assert_close(trt_s["vae_decoder"].infer(feed)["image"].cpu(), _want(torch_e["vae_decoder"], feed),
                               **FP32_TOL)
    streaming = build_trt.BuildConfig(profiles=PROFILES, weight_streaming=True)
    build_trt.build_all(tiny_config, plans, precision="fp16", networks=["unet_adaptor"], build=streaming,
                        weight_budget=1 << 20, flavour=flavour)
    unet = _open(flavour, tiny_config, plans, ["unet_adaptor"])["unet_adaptor"]
    assert unet.engine.weight_streaming_budget_v2 == 1 << 20
    feed = _feed(unet.spec, SHAPES["static"])
    torch.testing.assert_close(unet.infer(feed)["eps"].cpu(), _want(torch_engines["unet_adaptor"], feed)["eps"],
                               **FP16_TOL)


def _ms_per_call(run, calls: int = 20) -> float:
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def test_benchmark_row_tensorrt_against_torch(plans, flavour, tiny_config, tiny_model):
    """One timing row (UNet + adaptor, static profile): torch fp16 on the GPU, the TensorRT plan with
    CUDA graphs off and on, each after a parity check. Printed with -s, and logged."""
    plain = _open(flavour, tiny_config, plans, ["unet_adaptor"])["unet_adaptor"]
    graphed = _open(flavour, tiny_config, plans, ["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    ref = open_engines("torch", model=copy.deepcopy(tiny_model).to("cuda", torch.float16))["unet_adaptor"]
    feed = _feed(plain.spec, SHAPES["static"])
    want = ref.infer(feed)["eps"].float()
    for e in (plain, graphed):
        torch.testing.assert_close(e.infer(feed)["eps"].float(), want, **FP16_TOL)
    row = {name: _ms_per_call(lambda e=e: e.infer(feed)) for name, e in
           (("torch fp16", ref), (f"{flavour} graphs off", plain), (f"{flavour} graphs on", graphed))}
    line = "| unet_adaptor tiny, 1x16x16 | " + " | ".join(f"{k}: {v:.3f} ms" for k, v in row.items()) + " |"
    print(f"\n{torch.cuda.get_device_name()}: {line}")
    log.warning("benchmark row (%s): %s", torch.cuda.get_device_name(), line)
    assert all(v > 0 for v in row.values())
