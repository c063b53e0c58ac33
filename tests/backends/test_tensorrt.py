"""The TensorRT backend and build, run on CPU through a stand-in `tensorrt` module (fake_tensorrt.py).

The stand-in enforces TensorRT's documented contracts (return values, 256-byte alignment, profile
bounds, device-memory sizes, USER_MANAGED memory before enqueue, refit rules, version tags) and
executes the plan's ONNX graph with ONNX Runtime, so results are checked against ONNX Runtime on the
same ONNX files (an independent runtime). Each of the six defects of issue 12 has a test here that
fails if it comes back (marked "defect N"). What only a GPU with TensorRT can confirm is in
tests/backends/test_tensorrt_gpu.py and docs/engines.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fake_tensorrt
from supir_rt.backends import open_engines, resolve_backend
from supir_rt.backends import tensorrt_backend as tb
from supir_rt.backends.manifest import (
    ArtifactError, Manifest, file_sha256, manifest_path, onnx_name, plan_name, timing_cache_name,
)
from supir_rt.backends.specs import DimRange, Profile, default_profiles

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "export"))

import build_trt  # noqa: E402

PREC = "fp32"  # the stand-in runs the tiny fp32 graphs; precision only names the files
PROFILES = default_profiles(static_latent=(8, 8), tile_latent=16, tile_batch=2,
                            dynamic={"B": DimRange(1, 1, 2), "h": DimRange(8, 16, 32), "w": DimRange(8, 16, 32)})
BUILD = build_trt.BuildConfig(profiles=PROFILES)
FULL = dataclasses.replace(BUILD, refit="full")
SMALL = ("text_encoders", "vae_decoder")  # the cheapest networks, for flows that need no UNet


@pytest.fixture
def fake(monkeypatch):
    """`tensorrt` is the stand-in (10.7, compute capability 8.9) and the backend's CUDA seam is FakeCuda."""
    fake_tensorrt.reset("10.7.0", (8, 9))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    cuda = fake_tensorrt.FakeCuda()
    monkeypatch.setattr(tb, "default_cuda", lambda: cuda)
    return cuda


@pytest.fixture
def folder(tiny_onnx_dir, tmp_path):
    """A private engines folder holding copies of the tiny fp32 ONNX artifacts."""
    for f in tiny_onnx_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def build(cfg, folder, networks=SMALL, build=BUILD, **kw):
    return build_trt.build_all(cfg, folder, precision=PREC, networks=networks, build=build, **kw)


def open_trt(cfg, folder, networks=SMALL, **kw):
    return open_engines("tensorrt", config=cfg, artifact_dir=folder, precision=PREC,
                        networks=None if networks is None else list(networks), **kw)


def plan_of(folder, network):
    return folder / plan_name(network, PREC, fake_tensorrt.STATE.cc, fake_tensorrt.STATE.version)


def edit_plan(plan: Path, change) -> None:
    """Rewrite a stand-in plan's JSON and keep its manifest's hash consistent (to reach the open-time checks)."""
    head = fake_tensorrt.MAGIC
    data = json.loads(plan.read_bytes()[len(head):])
    change(data)
    plan.write_bytes(head + json.dumps(data).encode())
    man = Manifest.read(manifest_path(plan))
    dataclasses.replace(man, files={plan.name: file_sha256(plan)}).write(manifest_path(plan))


def sample(spec, dims, seed=0):
    return spec.sample_inputs(dims, generator=torch.Generator().manual_seed(seed))


def assert_like_ort(trt_engine, ort_engine, feed):
    got = {k: v.clone() for k, v in trt_engine.infer(feed).items()}
    want = ort_engine.infer(feed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the six defects

def test_defect1_custom_profiles_are_read_from_the_manifest(fake, tiny_config, folder, ort_engines):
    custom = default_profiles(static_latent=None, tile_latent=None,
                              dynamic={"B": DimRange(1, 2, 3), "h": DimRange(16, 24, 40), "w": DimRange(8, 24, 40)})
    build(tiny_config, folder, build=dataclasses.replace(BUILD, profiles=custom))
    engine = open_trt(tiny_config, folder)["vae_decoder"]  # no ranges passed: they come from the manifest
    assert [p.describe() for p in engine.profiles] == ["dynamic (B 1..3, h 16..40, w 8..40)"]
    assert_like_ort(engine, ort_engines["vae_decoder"], sample(engine.spec, {"B": 3, "h": 40, "w": 8}))


def test_defect2_stale_plan_is_refused_after_reexport(fake, tiny_config, folder):
    from supir_rt.backends.onnx_export import export_all
    from supir_rt.model.supir import build_model

    build(tiny_config, folder, networks=["vae_decoder"])
    torch.manual_seed(1)  # "SUPIR-v0F" re-exported into a folder holding the "v0Q" plan
    export_all(build_model(tiny_config), folder, precision=PREC, networks=["vae_decoder"], progress=False)
    with pytest.raises(ArtifactError, match="is stale.*weights changed after the plan was built") as err:
        open_trt(tiny_config, folder, networks=["vae_decoder"])
    assert f"python export/build_engines.py --trt-only --tiny-random --precision {PREC} --out {folder}" in str(err.value)


@pytest.mark.parametrize("field,value", [("gpu_name", "NVIDIA A100"), ("compute_capability", "8.0"),
                                         ("tensorrt", "10.3.0")])
def test_defect2_plan_for_another_gpu_or_tensorrt_is_refused(fake, tiny_config, folder, field, value):
    build(tiny_config, folder, networks=["text_encoders"])
    path = manifest_path(plan_of(folder, "text_encoders"))
    man = Manifest.read(path)
    dataclasses.replace(man, build={**man.build, field: value}).write(path)
    with pytest.raises(ArtifactError, match=f"{field} is '{value}'.*rebuild with: python export/build_engines.py "
                                            "--trt-only --tiny-random"):
        open_trt(tiny_config, folder, networks=["text_encoders"])


@pytest.mark.parametrize("tf32", [False, True])
def test_defect3_tf32_flag_follows_the_build_config(fake, tiny_config, folder, tf32):
    build(tiny_config, folder, networks=["vae_decoder"], build=dataclasses.replace(BUILD, tf32=tf32))
    (_, _, flags), = [c for c in fake_tensorrt.STATE.calls if c[0] == "build"]
    assert bool(flags & (1 << int(fake_tensorrt.BuilderFlag.TF32))) is tf32  # TensorRT's default is on
    assert Manifest.read(manifest_path(plan_of(folder, "vae_decoder"))).build["build_config"]["tf32"] is tf32


def test_defect4_context_creation_failure_is_reported(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["text_encoders"])
    fake_tensorrt.STATE.fail_context = True
    with pytest.raises(tb.TensorRTError, match="could not create an execution context.*out of memory"):
        open_trt(tiny_config, folder, networks=["text_encoders"])


def test_defect4_refused_shape_and_address_are_errors(fake, tiny_config, folder, monkeypatch):
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    feed = sample(engine.spec, {"B": 1, "h": 8, "w": 8})
    monkeypatch.setattr(engine.context, "set_input_shape", lambda name, shape: False)
    with pytest.raises(tb.TensorRTError, match="refused input shape latent"):
        engine.infer(feed)
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    monkeypatch.setattr(engine.context, "set_tensor_address", lambda name, ptr: False)
    with pytest.raises(tb.TensorRTError, match="refused the address"):
        engine.infer(feed)


def test_defect4_out_of_profile_request_names_the_profiles_and_the_flag(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    with pytest.raises(tb.ProfileError) as err:
        engine.infer(sample(engine.spec, {"B": 1, "h": 40, "w": 8}))
    msg = str(err.value)
    assert "h 40" in msg and "static (B 1, h 8, w 8)" in msg and "dynamic (B 1..2, h 8..32, w 8..32)" in msg
    assert "--trt-only --tiny-random" in msg and "--latent 8 40 256" in msg
    assert not any(c[0] == "execute_async_v3" for c in engine.context.calls), "nothing ran on stale shapes"


def test_defect5_misaligned_and_strided_inputs_are_copied_to_aligned_buffers(fake, tiny_config, folder, ort_engines):
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    latent = sample(engine.spec, {"B": 1, "h": 8, "w": 16})["latent"]
    store = torch.empty(latent.numel() + 64)
    offset = next(i for i in range(1, 64) if (store.data_ptr() + 4 * i) % 256)  # a misaligned start
    misaligned = store[offset:offset + latent.numel()].view_as(latent).copy_(latent)
    assert misaligned.data_ptr() % 256
    strided = latent.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    for feed in ({"latent": misaligned}, {"latent": strided}):
        assert_like_ort(engine, ort_engines["vae_decoder"], feed)
    assert all(ptr % 256 == 0 for c in engine.context.calls if c[0] == "set_tensor_address" for ptr in [c[2]])


def test_defect6_one_shared_arena_own_stream_no_host_sync(fake, tiny_config, folder, ort_engines):
    build(tiny_config, folder, networks=["text_encoders", "vae_decoder", "dr_encoder"])
    engines = open_trt(tiny_config, folder, networks=["text_encoders", "vae_decoder", "dr_encoder"])
    used = {"text_encoders": {"B": 1}, "vae_decoder": {"B": 1, "h": 8, "w": 8}, "dr_encoder": {"B": 2, "h": 16, "w": 16}}
    for _ in range(2):  # the arena grows while new (engine, profile) pairs come; the second pass reuses it
        for name, dims in used.items():
            assert_like_ort(engines[name], ort_engines[name], sample(engines[name].spec, dims))
    contexts = fake_tensorrt.STATE.contexts
    assert {c.strategy.name for c in contexts} == {"USER_MANAGED"}
    memories = {c.memory for c in contexts}
    assert len(memories) == 1, "every context runs on the same arena"
    (ptr, size), = memories
    # the arena is the largest requirement of the (engine, profile) pairs used, not the sum
    needs = []
    for name in used:
        e = engines[name]
        idx = next(c[1] for c in reversed(e.context.calls) if c[0] == "set_optimization_profile_async")
        needs.append(e.engine.get_device_memory_size_for_profile_v2(idx))
    assert size == max(needs) < sum(needs) and ptr % 256 == 0
    stream = fake.streams[0]
    assert len(fake.streams) == 1 and stream.cuda_stream != 0
    assert fake_tensorrt.STATE.default_stream_enqueues == 0
    assert fake_tensorrt.STATE.host_syncs == 0
    assert stream.waited_on == [0] * 6 and fake.caller.waited_on == [stream.cuda_stream] * 6


# ----------------------------------------------------------------------------------------- runtime

def test_profile_is_chosen_per_request(fake, tiny_config, folder, ort_engines):
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    assert [p.name for p in engine.profiles] == ["static", "dynamic"]  # the tile profile is the UNet's only
    chosen = []
    for dims in ({"B": 1, "h": 8, "w": 8}, {"B": 2, "h": 16, "w": 16}, {"B": 1, "h": 16, "w": 24},
                 {"B": 1, "h": 8, "w": 8}):
        assert_like_ort(engine, ort_engines["vae_decoder"], sample(engine.spec, dims))
        chosen.append(engine.profiles[engine.context.active_optimization_profile].name)
    assert chosen == ["static", "dynamic", "dynamic", "static"]


def test_tightest_profile_is_selected():
    from supir_rt.backends.specs import select_profile

    profiles = default_profiles()  # static 1 x 128^2, tile 1..4 x 128^2, dynamic 1..4 x 8..256
    assert [profiles[select_profile(profiles, d)].name for d in (
        {"B": 1, "h": 128, "w": 128}, {"B": 3, "h": 128, "w": 128}, {"B": 1, "h": 64, "w": 200})] == [
        "static", "tile", "dynamic"]
    assert select_profile(profiles, {"B": 1, "h": 300, "w": 64}) is None
    assert select_profile(profiles, {"B": 5, "h": 128, "w": 128}) is None


def test_outputs_are_engine_owned_with_stable_addresses(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    spec = engine.spec
    a = engine.infer(sample(spec, {"B": 1, "h": 8, "w": 8}))["image"].data_ptr()
    engine.infer(sample(spec, {"B": 1, "h": 16, "w": 16}))
    b = engine.infer(sample(spec, {"B": 1, "h": 8, "w": 8}, seed=3))["image"].data_ptr()
    assert a == b and a % 256 == 0
    sets = [c for c in engine.context.calls if c[0] == "set_tensor_address" and c[1] == "image"]
    assert len(sets) == 3  # re-bound only when the address changes


def test_cuda_graph_is_captured_once_per_shape_and_replayed(fake, tiny_config, folder, ort_engines):
    build(tiny_config, folder, networks=["unet_adaptor"])
    engine = open_trt(tiny_config, folder, networks=["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    assert [p.name for p in engine.profiles] == ["static", "tile", "dynamic"]
    for seed in range(4):  # new values every call: a replay reads the engine's own input buffers
        assert_like_ort(engine, ort_engines["unet_adaptor"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}, seed))
    assert fake.captures == 1 and fake_tensorrt.STATE.replays == 3  # warm-up, capture (+replay), 2 replays
    assert fake_tensorrt.STATE.executions == 1 + 3


def test_cuda_graph_capture_failure_falls_back(fake, tiny_config, folder, ort_engines, caplog):
    fake.capture_fails = True
    build(tiny_config, folder, networks=["unet_adaptor"])
    engine = open_trt(tiny_config, folder, networks=["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    for seed in range(3):
        assert_like_ort(engine, ort_engines["unet_adaptor"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}, seed))
    assert fake.captures == 1 and "running without a graph" in caplog.text


def test_engine_io_is_checked_against_the_spec(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    edit_plan(plan_of(folder, "vae_decoder"), lambda d: d["outputs"][0].__setitem__(1, 1))  # image: HALF
    with pytest.raises(tb.TensorRTError, match="image is HALF, the spec says torch.float32"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])


def test_corrupt_plan_is_refused(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    plan = plan_of(folder, "vae_decoder")
    plan.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="has changed since it was built.*rebuild with"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])
    with pytest.raises(tb.TensorRTError, match="could not deserialize.*Magic tag does not match.*rebuild with"):
        open_trt(tiny_config, folder, networks=["vae_decoder"], verify_hash=False)


@pytest.mark.parametrize("version,match", [("9.3.0", "needs TensorRT 10.x"), ("11.1.0", "11.x is not supported")])
def test_tensorrt_version_is_enforced(fake, version, match):
    fake_tensorrt.reset(version)
    with pytest.raises(ImportError, match=match):
        tb.require_tensorrt()
    assert match.split()[0] in tb.tensorrt_unavailable()


def test_tensorrt_10_0_uses_the_v1_memory_calls(fake, tiny_config, folder, ort_engines):
    fake_tensorrt.reset("10.0.1")
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    assert_like_ort(engine, ort_engines["vae_decoder"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}))
    assert [c[0] for c in engine.context.calls if "memory" in c[0]] == ["device_memory"]


def test_missing_plans_say_which_exist(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    fake_tensorrt.reset("10.8.0")
    with pytest.raises(ArtifactError, match=r"no TensorRT plan .*TensorRT 10.8.0.*vae_decoder_fp32_sm89_trt10.7.0"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])


# ------------------------------------------------------------------------------------------- build

def test_matching_plan_is_reused_and_timing_cache_kept(fake, tiny_config, folder, caplog):
    caplog.set_level(logging.INFO)
    assert [a for _, a in build(tiny_config, folder)] == ["built", "built"]
    cache = folder / timing_cache_name((8, 9), "10.7.0")
    assert cache.is_file() and len(json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])["entries"]) >= 1
    builds = sum(c[0] == "build" for c in fake_tensorrt.STATE.calls)
    assert [a for _, a in build(tiny_config, folder)] == ["reused", "reused"]
    assert sum(c[0] == "build" for c in fake_tensorrt.STATE.calls) == builds
    assert [a for _, a in build(tiny_config, folder, build=dataclasses.replace(BUILD, optimization_level=2))] == [
        "built", "built"]
    assert "no timing cache" not in caplog.text.split("reusing")[-1]


def test_timing_cache_from_another_gpu_is_replaced(fake, tiny_config, folder, caplog):
    build(tiny_config, folder, networks=["text_encoders"])
    cache = folder / timing_cache_name((8, 9), "10.7.0")
    data = json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])
    cache.write_bytes(fake_tensorrt.CACHE_MAGIC + json.dumps({**data, "cc": [8, 0]}).encode())
    build(tiny_config, folder, networks=["text_encoders"], reuse=False)
    assert "does not fit this GPU" in caplog.text
    assert json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])["cc"] == [8, 9]


def test_failed_build_leaves_nothing_half_written(fake, tiny_config, folder):
    before = sorted(p.name for p in folder.iterdir())
    fake_tensorrt.STATE.fail_build = True
    with pytest.raises(tb.TensorRTError, match="failed to build.*forced by the test.*nothing was written"):
        build(tiny_config, folder, networks=["vae_decoder"])
    assert sorted(p.name for p in folder.iterdir()) == before


def _reexport(tiny_config, folder, networks, seed=1):
    from supir_rt.backends.onnx_export import export_all
    from supir_rt.model.supir import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config)
    export_all(model, folder, precision=PREC, networks=networks, progress=False, source={"kind": "v0F"})
    return open_engines("onnxruntime", config=tiny_config, artifact_dir=folder, precision=PREC, networks=networks)


def test_refit_puts_other_weights_into_the_plan(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"], build=FULL)
    new_ort = _reexport(tiny_config, folder, ["vae_decoder"])
    builds = sum(c[0] == "build" for c in fake_tensorrt.STATE.calls)
    assert build(tiny_config, folder, networks=["vae_decoder"], build=FULL, refit=True)[0][1] == "refitted"
    assert sum(c[0] == "build" for c in fake_tensorrt.STATE.calls) == builds, "no rebuild"
    man = Manifest.read(manifest_path(plan_of(folder, "vae_decoder")))
    assert len(man.build["refits"]) == 1 and man.build["refits"][0]["source"] == {"kind": "v0F"}
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    assert_like_ort(engine, new_ort["vae_decoder"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}))


def test_refit_of_an_identical_weights_plan_is_refused(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    _reexport(tiny_config, folder, ["vae_decoder"])
    with pytest.raises(ArtifactError, match="refit='identical'.*--trt-refittable full"):
        build(tiny_config, folder, networks=["vae_decoder"], refit=True)


def test_stripped_plan_is_small_and_filled_from_the_onnx(fake, tiny_config, folder, ort_engines):
    (full, _), = build(tiny_config, folder, networks=["vae_decoder"])
    size = full.stat().st_size
    (stripped, _), = build(tiny_config, folder, networks=["vae_decoder"],
                           build=dataclasses.replace(BUILD, strip_weights=True))
    assert stripped.stat().st_size < size / 2
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    assert_like_ort(engine, ort_engines["vae_decoder"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}))
    engine.close()
    (folder / onnx_name("vae_decoder", PREC)).unlink()
    with pytest.raises(ArtifactError, match="built without weights.*missing"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])


def test_weight_streaming_budget(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["unet_adaptor"], build=dataclasses.replace(BUILD, weight_streaming=True),
          weight_budget=1000)
    man = Manifest.read(manifest_path(plan_of(folder, "unet_adaptor")))
    assert man.build["weight_streaming"] and man.build["runtime"] == {"weight_budget": 1000}
    (_, _, flags), = [c for c in fake_tensorrt.STATE.calls if c[0] == "build"]
    assert flags & (1 << int(fake_tensorrt.BuilderFlag.WEIGHT_STREAMING))
    engine = open_trt(tiny_config, folder, networks=["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    assert engine.engine.weight_streaming_budget_v2 == 1000 and not engine.cuda_graphs  # enqueue is synchronous
    streamed = engine.engine.get_device_memory_size_for_profile_v2(0)
    other = open_trt(tiny_config, folder, networks=["unet_adaptor"], weight_budget=4096)["unet_adaptor"]
    assert other.engine.weight_streaming_budget_v2 == 4096
    whole = open_trt(tiny_config, folder, networks=["unet_adaptor"], weight_budget=1 << 40)["unet_adaptor"]
    assert whole.engine.weight_streaming_budget_v2 == whole.engine.streamable_weights_size  # nothing streams
    assert whole.engine.get_device_memory_size_for_profile_v2(0) < streamed  # streaming needs scratch memory


# -------------------------------------------------------------------------------- backend choice, e2e

def test_auto_picks_tensorrt_only_with_valid_plans(fake, tiny_config, folder, caplog):
    caplog.set_level(logging.INFO)
    artifacts = {"artifact_dir": folder, "config": tiny_config, "precision": PREC}
    assert resolve_backend("auto", needs_artifacts=True, artifacts=artifacts) == "onnxruntime"
    line, = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backend auto")]
    assert "tensorrt" in line and "not found" in line
    build(tiny_config, folder, networks=None)
    assert resolve_backend("auto", needs_artifacts=True, artifacts=artifacts) == "tensorrt"


@pytest.mark.slow
def test_tiny_restore_over_tensorrt_equals_onnxruntime(fake, tiny_config, folder, ort_engines):
    """The whole pipeline over the TensorRT backend's code path (stand-in execution) == ONNX Runtime."""
    import numpy as np

    from supir_rt.api import Restorer
    from supir_rt.restore_config import RestoreConfig

    build(tiny_config, folder, networks=None)
    trt = open_trt(tiny_config, folder, networks=None, cuda_graphs=True)
    img = torch.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3).to(torch.uint8).numpy()
    from PIL import Image

    cfg = RestoreConfig(num_steps=3, min_size=64)
    a = Restorer(trt, tiny_config).restore(Image.fromarray(img), cfg).result.image
    b = Restorer(ort_engines, tiny_config).restore(Image.fromarray(img), cfg).result.image
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert fake.captures == 1 and fake_tensorrt.STATE.host_syncs == 0


# ------------------------------------------------------------------------------ the build command

def test_build_command_with_the_stand_in(fake, folder, caplog):
    import build_engines

    caplog.set_level(logging.INFO)
    args = ["--trt-only", "--tiny-random", "--precision", PREC, "--out", str(folder), "--networks", "text_encoders",
            "--static-latent", "8", "--tile-latent", "16", "--tile-batch", "2", "--batch", "1", "1", "2",
            "--latent", "8", "16", "32", "--no-tf32"]
    assert build_engines.main(args) == 0
    man = Manifest.read(manifest_path(plan_of(folder, "text_encoders")))
    assert man.build["build_config"]["tf32"] is False
    assert man.build["profiles"] == [{"name": "static", "ranges": {"B": [1, 1, 1]}},  # the text encoders only have B
                                     {"name": "dynamic", "ranges": {"B": [1, 1, 2]}}]
    assert "MiB" in caplog.text
    assert build_engines.main(args) == 0 and "reusing" in caplog.text


@pytest.mark.parametrize("bad,match", [(["--latent", "32", "16", "8"], "needs 1 <= min <= opt <= max"),
                                       (["--trt-strip", "--trt-refittable", "none"], "must be refittable"),
                                       (["--trt-weight-budget", "lots"], "--trt-weight-budget")])
def test_build_command_bad_input_is_one_error_line(fake, folder, capsys, bad, match):
    import build_engines

    rc = build_engines.main(["--trt-only", "--tiny-random", "--out", str(folder), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err


def test_unavailable_backend_says_why():
    reason = tb.tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT is available here")
    assert "TensorRT" in reason or "CUDA" in reason
    with pytest.raises(RuntimeError, match="not available here"):
        open_engines("tensorrt", config=None, artifact_dir=".")


def test_build_command_explains_missing_tensorrt(tmp_path, capsys):
    if tb.tensorrt_unavailable() is None:
        pytest.skip("TensorRT is available here")
    import build_engines

    assert build_engines.main(["--tiny-random", "--trt", "--out", str(tmp_path), "--quiet"]) == 2
    assert "cannot build TensorRT plans" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "it fails before exporting anything"


def test_stand_in_is_not_importable_as_tensorrt():
    assert sys.modules.get("tensorrt") is not fake_tensorrt
    assert fake_tensorrt.__name__ == "fake_tensorrt"


def test_profile_json_round_trip():
    p = Profile.of("x", {"B": DimRange(1, 2, 3)})
    assert Profile.from_json(p.to_json()) == p
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile.of("y", {"h": DimRange(8, 4, 16)})


@pytest.mark.slow
def test_cli_restore_over_tensorrt_missing_then_built_plans(fake, folder, tmp_path_factory, capsys):
    """`supir-rt restore --backend tensorrt` without plans: one error line with the build command;
    after that command (stand-in TensorRT), the same restore runs."""
    import build_engines
    from PIL import Image

    from supir_rt import cli

    work = tmp_path_factory.mktemp("cli")
    src = work / "in.png"
    Image.fromarray(torch.arange(50 * 40 * 3).reshape(40, 50, 3).remainder(256).to(torch.uint8).numpy()).save(src)
    args = ["restore", str(src), "-o", str(work / "out.png"), "--tiny-random", "--backend", "tensorrt",
            "--engines-dir", str(folder), "--steps", "1", "--min-size", "64", "-q"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"python export/build_engines.py --trt-only --tiny-random --precision fp32 --out {folder}" in err
    assert build_engines.main(["--trt-only", "--tiny-random", "--precision", "fp32", "--out", str(folder),
                               "--static-latent", "8", "--tile-latent", "16", "--tile-batch", "2",
                               "--batch", "1", "1", "2", "--latent", "8", "16", "32", "--quiet"]) == 0
    assert cli.main(args) == 0, capsys.readouterr().err
    with Image.open(work / "out.png") as img:
        assert img.size == (50, 40)
