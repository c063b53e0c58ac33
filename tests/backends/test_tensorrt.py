"""The TensorRT backends and build, run on CPU through a versioned stand-in (fake_tensorrt.py).

Every test that takes the `fake` fixture runs three times, once per API surface of the stand-in:
``[trt10]`` (TensorRT 10.16), ``[trt11]`` (TensorRT 11.4) and ``[rtx]`` (TensorRT-RTX 1.7, through
the ``tensorrt-rtx`` backend); the counts per surface are printed at the end of the run. The
stand-in enforces TensorRT's documented contracts (return values, alignment, profile bounds,
device-memory sizes, refit rules, version tags, what each version lacks) and executes the plan's
ONNX graph with ONNX Runtime, so results are checked against ONNX Runtime on the same ONNX files
(an independent runtime). Each of the six defects of issue 12 has a test here that fails if it
comes back (marked "defect N"), and so do the four of issue 20 (docstrings say how each was
checked). What only a GPU with TensorRT can confirm is in tests/backends/test_tensorrt_gpu.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
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
DYNAMIC = {"B": DimRange(1, 1, 2), "h": DimRange(8, 16, 32), "w": DimRange(8, 16, 32)}
PROFILES = default_profiles(static_latent=(8, 8), tile_latent=16, tile_batch=2, dynamic=DYNAMIC)
BUILD = build_trt.BuildConfig(profiles=PROFILES)
ONE = build_trt.BuildConfig(profiles=default_profiles(static_latent=None, tile_latent=None, dynamic=DYNAMIC))
FULL = dataclasses.replace(ONE, refit="full")  # a refittable plan holds one profile (NvInfer.h)
SMALL = ("text_encoders", "vae_decoder")  # the cheapest networks, for flows that need no UNet
# the stand-in's API surfaces: test id -> (version, flavour)
SURFACES = {"trt10": ("10.16.1.11", "tensorrt"), "trt11": ("11.4.0.106", "tensorrt"),
            "rtx": ("1.7.1.116", "tensorrt-rtx")}


def use_surface(monkeypatch, version: str, flavour: str = "tensorrt", cc=(8, 9)) -> None:
    fake_tensorrt.reset(version, cc, flavour)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx" if flavour == "tensorrt-rtx" else "tensorrt", fake_tensorrt)


@pytest.fixture(params=list(SURFACES))
def fake(request, monkeypatch):
    """The stand-in as TensorRT 10.x, 11.x or TensorRT-RTX (compute capability 8.9); the backend's
    CUDA seam is FakeCuda."""
    use_surface(monkeypatch, *SURFACES[request.param])
    cuda = fake_tensorrt.FakeCuda()
    monkeypatch.setattr(tb, "default_cuda", lambda: cuda)
    return cuda


def flavour() -> str:
    return fake_tensorrt.STATE.flavour


def rebuild_prefix() -> str:
    return "--trt-only --trt-rtx --tiny-random" if flavour() == "tensorrt-rtx" else "--trt-only --tiny-random"


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def folder(tiny_onnx_dir, tmp_path):
    """A private engines folder holding the tiny fp32 ONNX artifacts: hard links to the session's export
    (a copy is 121 MB, and about 150 tests take one), copies where the file system cannot link. A test that
    changes an artifact in place first `detach`es it; the shared export is checked unchanged afterwards."""
    before = _stamps(tiny_onnx_dir)
    for f in tiny_onnx_dir.iterdir():
        try:
            os.link(f, tmp_path / f.name)
        except OSError:
            shutil.copy(f, tmp_path / f.name)
    yield tmp_path
    assert _stamps(tiny_onnx_dir) == before, "a test wrote through a hard link into the shared export: detach() first"


def detach(*paths: Path) -> None:
    """Give each path its own copy of its bytes (a hard link would carry an in-place write to every test)."""
    for path in paths:
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)


def detach_onnx(folder: Path) -> None:
    """Before `export_all` writes into ``folder``: it rewrites the ONNX files in place."""
    detach(*folder.glob("*.onnx"), *folder.glob("*.onnx.data"))


def build(cfg, folder, networks=SMALL, build=BUILD, **kw):
    return build_trt.build_all(cfg, folder, precision=PREC, networks=networks, build=build, flavour=flavour(), **kw)


def open_trt(cfg, folder, networks=SMALL, **kw):
    return open_engines(flavour(), config=cfg, artifact_dir=folder, precision=PREC,
                        networks=None if networks is None else list(networks), **kw)


def plan_of(folder, network):
    s = fake_tensorrt.STATE
    return folder / plan_name(network, PREC, s.cc, s.version, s.flavour)


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
    detach_onnx(folder)
    export_all(build_model(tiny_config), folder, precision=PREC, networks=["vae_decoder"], progress=False)
    with pytest.raises(ArtifactError, match="is stale.*weights changed after the plan was built") as err:
        open_trt(tiny_config, folder, networks=["vae_decoder"])
    assert f"python export/build_engines.py {rebuild_prefix()} --precision {PREC} --out {folder}" in str(err.value)


@pytest.mark.parametrize("field,value", [("gpu_name", "NVIDIA A100"), ("compute_capability", "8.0"),
                                         ("tensorrt", "10.3.0"), ("flavour", "other")])
def test_defect2_plan_for_another_gpu_or_tensorrt_is_refused(fake, tiny_config, folder, field, value):
    build(tiny_config, folder, networks=["text_encoders"])
    path = manifest_path(plan_of(folder, "text_encoders"))
    man = Manifest.read(path)
    dataclasses.replace(man, build={**man.build, field: value}).write(path)
    with pytest.raises(ArtifactError, match=f"{field} is '{value}'.*rebuild with: python export/build_engines.py "
                                            f"{rebuild_prefix()}"):
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
    assert rebuild_prefix() in msg and "--latent 8 40 256" in msg
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


@pytest.mark.parametrize("version,flavour", [("9.3.0", "tensorrt"), ("12.0.1", "tensorrt"),
                                             ("2.0.0", "tensorrt-rtx")])
def test_unsupported_versions_are_refused_with_the_install_line(monkeypatch, version, flavour):
    use_surface(monkeypatch, version, flavour)
    want = "TensorRT-RTX 1.x-1.x: pip install tensorrt-rtx" if flavour == "tensorrt-rtx" else (
        "TensorRT 10.x-11.x: pip install 'tensorrt>=10,<12'")
    with pytest.raises(ImportError, match=re.escape(f"{version} is installed; supir-rt needs {want}")):
        tb.require_tensorrt(flavour)
    assert want in tb.tensorrt_unavailable(flavour=flavour)


@pytest.mark.parametrize("version", ["10.0.1", "10.16.1.11", "11.4.0.106"])
def test_tensorrt_10_and_11_are_both_accepted(monkeypatch, version):
    use_surface(monkeypatch, version)
    assert tb.require_tensorrt() is fake_tensorrt


@pytest.mark.parametrize("fake", ["trt10"], indirect=True)
def test_tensorrt_10_0_uses_the_v1_memory_calls(fake, tiny_config, folder, ort_engines, monkeypatch):
    use_surface(monkeypatch, "10.0.1")
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    assert_like_ort(engine, ort_engines["vae_decoder"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}))
    assert [c[0] for c in engine.context.calls if "memory" in c[0]] == ["device_memory"]


def test_missing_plans_say_which_exist(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["vae_decoder"])
    old = plan_of(folder, "vae_decoder").name
    other = {"tensorrt": "10.8.0.43", "tensorrt-rtx": "1.6.1.120"}[flavour()]
    fake_tensorrt.reset(other, flavour=flavour())
    with pytest.raises(ArtifactError, match=rf"no TensorRT\S* plan .*version {other}.*{re.escape(old)}.*rebuild with"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])


# ------------------------------------------------------------------------------------------- build

def test_matching_plan_is_reused_and_timing_cache_kept(fake, tiny_config, folder, caplog):
    caplog.set_level(logging.INFO)
    assert [a for _, a in build(tiny_config, folder)] == ["built", "built"]
    cache = folder / timing_cache_name((8, 9), fake_tensorrt.STATE.version)
    if flavour() == "tensorrt-rtx":  # TensorRT-RTX ignores a timing cache: none is kept
        assert not list(folder.glob("timing_*"))
    else:
        assert cache.is_file() and len(json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])["entries"]) >= 1
    builds = sum(c[0] == "build" for c in fake_tensorrt.STATE.calls)
    assert [a for _, a in build(tiny_config, folder)] == ["reused", "reused"]
    assert sum(c[0] == "build" for c in fake_tensorrt.STATE.calls) == builds
    assert [a for _, a in build(tiny_config, folder, build=dataclasses.replace(BUILD, optimization_level=2))] == [
        "built", "built"]
    assert "no timing cache" not in caplog.text.split("reusing")[-1]
    onnx = folder / onnx_name("vae_decoder", PREC)  # the ONNX file itself is hashed, not only its manifest
    detach(onnx)
    onnx.write_bytes(onnx.read_bytes() + b" ")
    with pytest.raises(ArtifactError, match="vae_decoder_fp32.onnx has changed since it was built"):
        build(tiny_config, folder)


@pytest.mark.parametrize("fake", ["trt10", "trt11"], indirect=True)
def test_timing_cache_from_another_gpu_is_replaced(fake, tiny_config, folder, caplog):
    build(tiny_config, folder, networks=["text_encoders"])
    cache = folder / timing_cache_name((8, 9), fake_tensorrt.STATE.version)
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
    detach_onnx(folder)
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
    build(tiny_config, folder, networks=["vae_decoder"], build=ONE)
    _reexport(tiny_config, folder, ["vae_decoder"])
    with pytest.raises(ArtifactError, match="refit='identical'.*--trt-refittable full"):
        build(tiny_config, folder, networks=["vae_decoder"], build=ONE, refit=True)


def test_stripped_plan_is_small_and_filled_from_the_onnx(fake, tiny_config, folder, ort_engines):
    (full, _), = build(tiny_config, folder, networks=["vae_decoder"], build=ONE)
    size = full.stat().st_size
    (stripped, _), = build(tiny_config, folder, networks=["vae_decoder"],
                           build=dataclasses.replace(ONE, strip_weights=True))
    assert stripped.stat().st_size < size / 2
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    assert_like_ort(engine, ort_engines["vae_decoder"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}))
    engine.close()
    (folder / onnx_name("vae_decoder", PREC)).unlink()
    with pytest.raises(ArtifactError, match="ONNX artifact it was built from is not beside it.*vae_decoder_fp32.onnx "
                                            "is missing"):
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
    assert resolve_backend("auto", needs_artifacts=True, artifacts=artifacts) == flavour()


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
    args = [*rebuild_prefix().split(), "--precision", PREC, "--out", str(folder), "--networks", "text_encoders",
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
                                       (["--trt-refittable", "full"], "may hold one optimisation profile only"),
                                       (["--trt-strip"], "stripped weights need a refittable plan"),
                                       (["--trt-weight-budget", "lots"], "--trt-weight-budget")])
def test_build_command_bad_input_is_one_error_line(fake, folder, capsys, bad, match):
    import build_engines

    before = sorted(folder.iterdir())
    rc = build_engines.main([*rebuild_prefix().split(), "--out", str(folder), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
    assert sorted(folder.iterdir()) == before, "nothing written"


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
    assert sys.modules.get("tensorrt_rtx") is not fake_tensorrt
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
    args = ["restore", str(src), "-o", str(work / "out.png"), "--tiny-random", "--backend", flavour(),
            "--engines-dir", str(folder), "--steps", "1", "--min-size", "64", "-q"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"python export/build_engines.py {rebuild_prefix()} --precision fp32 --out {folder}" in err
    assert build_engines.main([*rebuild_prefix().split(), "--precision", "fp32", "--out", str(folder),
                               "--static-latent", "8", "--tile-latent", "16", "--tile-batch", "2",
                               "--batch", "1", "1", "2", "--latent", "8", "16", "32", "--quiet"]) == 0
    assert cli.main(args) == 0, capsys.readouterr().err
    with Image.open(work / "out.png") as img:
        assert img.size == (50, 40)


# --------------------------------------------------------- issue 20: defects that must stay fixed

def test_execute_async_v3_false_is_an_error_normally_and_during_capture(fake, tiny_config, folder, ort_engines,
                                                                         monkeypatch, caplog):
    """TensorRT reports a failed enqueue only by returning False (NvInferRuntime.h enqueueV3).

    Checked by hand once (2026-12-06): with `TrtEngine._enqueue` ignoring the return value, the first
    half fails (no TensorRTError) and the second fails (the half-recorded graph is kept and replays
    stale outputs, which differ from ONNX Runtime)."""
    build(tiny_config, folder, networks=["unet_adaptor"])
    engine = open_trt(tiny_config, folder, networks=["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    real = engine.context.execute_async_v3
    feed = sample(engine.spec, {"B": 1, "h": 8, "w": 8})
    monkeypatch.setattr(engine.context, "execute_async_v3", lambda handle: False)
    with pytest.raises(tb.TensorRTError, match="execution of .* failed"):
        engine.infer(feed)

    def refuse_under_capture(handle):
        if fake_tensorrt.STATE.capturing is None:
            return real(handle)
        fake_tensorrt.STATE.captured.append(lambda: None)  # part of the work was recorded, then it failed
        return False

    monkeypatch.setattr(engine.context, "execute_async_v3", refuse_under_capture)
    for seed in range(4):  # warm-up, capture (refused: plain run instead), then plain runs
        assert_like_ort(engine, ort_engines["unet_adaptor"], sample(engine.spec, {"B": 1, "h": 8, "w": 8}, seed))
    assert fake.captures == 1 and "CUDA graph capture failed" in caplog.text
    assert fake_tensorrt.STATE.replays == 0


def test_graph_is_never_replayed_after_an_input_shape_change(fake, tiny_config, folder, ort_engines):
    """Each input shape has its own graph, and the context's shapes are set back before a replay.

    Checked by hand once (2026-12-06): with `TrtEngine._activate` not setting the input shapes before a
    replay ("the graph has them baked in"), the stand-in's replay assertion fires ("captured with input
    shapes ... replayed while the context has ...")."""
    build(tiny_config, folder, networks=["unet_adaptor"])
    engine = open_trt(tiny_config, folder, networks=["unet_adaptor"], cuda_graphs=True)["unet_adaptor"]
    shapes = [{"B": 1, "h": 8, "w": 16}, {"B": 1, "h": 16, "w": 24}]  # both on the dynamic profile, other shapes
    for step in range(8):
        dims = shapes[(step // 2) % 2]  # a, a, b, b, a, a, b, b: warm-up + capture per shape, then replays
        assert_like_ort(engine, ort_engines["unet_adaptor"], sample(engine.spec, dims, seed=step))
    assert {engine.profiles[s.profile].name for s in engine._slots.values()} == {"dynamic"}
    assert fake.captures == 2 and fake_tensorrt.STATE.replays == 2 + 4  # one per capture, then 4 replays


def test_graph_is_recaptured_after_another_engine_grew_the_arena(fake, tiny_config, folder, ort_engines):
    """A graph records the arena's address; when another engine grows (moves) the shared arena, the
    graph must be dropped and recaptured, never replayed.

    Checked by hand once (2026-12-06): with the arena-generation check removed from
    `TrtEngine._activate`, the replay uses the retired arena and the stand-in asserts ("uses device
    memory ... that the backend freed")."""
    build(tiny_config, folder, networks=["unet_adaptor", "dr_encoder"])
    engines = open_trt(tiny_config, folder, networks=["unet_adaptor", "dr_encoder"], cuda_graphs=True)
    unet, dr = engines["unet_adaptor"], engines["dr_encoder"]
    small = {"B": 1, "h": 8, "w": 8}
    for seed in range(3):
        assert_like_ort(unet, ort_engines["unet_adaptor"], sample(unet.spec, small, seed))
    arena = unet._shared.arena
    before = (arena.ptr, arena.size, fake.captures)
    assert_like_ort(dr, ort_engines["dr_encoder"], sample(dr.spec, {"B": 2, "h": 16, "w": 16}))
    assert arena.size > before[1], "the DR encoder's dynamic profile grew the shared arena"
    for seed in range(3, 6):
        assert_like_ort(unet, ort_engines["unet_adaptor"], sample(unet.spec, small, seed))
    assert fake.captures == before[2] + 1, "recaptured on the new arena"
    assert fake_tensorrt.STATE.retired and fake_tensorrt.STATE.retired[0][0] == before[0]


def test_weight_budget_is_set_before_the_context_exists(fake, tiny_config, folder):
    """TensorRT refuses a weight-streaming budget change while contexts exist (NvInferRuntime.h).

    Checked by hand once (2026-12-06): with the budget set after `create_context` (the two lines of
    `TrtEngine.__init__` / `LoadedPlan` order swapped), opening fails with "did not accept the
    weight-streaming budget"."""
    build(tiny_config, folder, networks=["unet_adaptor"], build=dataclasses.replace(BUILD, weight_streaming=True),
          weight_budget=2048)
    engine = open_trt(tiny_config, folder, networks=["unet_adaptor"])["unet_adaptor"]
    assert engine.engine.weight_streaming_budget_v2 == 2048
    engine.engine.weight_streaming_budget_v2 = 4096  # what a late change does: refused, budget kept
    assert engine.engine.weight_streaming_budget_v2 == 2048


# --------------------------------------------------------------------- issue 20: versions, identity

def test_each_surface_lacks_what_its_version_lacks(fake):
    trt = fake_tensorrt
    if flavour() == "tensorrt" and trt.STATE.version.startswith("10."):
        assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1 and int(trt.BuilderFlag.FP16) == 0
        assert int(trt.BuilderFlag.REFIT_IDENTICAL) == 20 and not hasattr(trt, "ComputeCapability")
        return
    for name in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "WEIGHTLESS"):
        assert not hasattr(trt.BuilderFlag, name), name  # removed in 11.x (NvInfer.h v11.1)
    assert (int(trt.BuilderFlag.STRIP_PLAN), int(trt.BuilderFlag.REFIT_IDENTICAL)) == (18, 19)  # renumbered
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    engine_cls, parser = trt.ICudaEngine, trt.OnnxParser(trt.INetworkDefinition(0), trt.Logger())
    engine = engine_cls.__new__(engine_cls)
    for what in (lambda: engine.device_memory_size, lambda: engine.get_device_memory_size_for_profile(0),
                 lambda: engine.create_execution_context_without_device_memory(), lambda: parser.supports_model(b"")):
        with pytest.raises(AttributeError):
            what()
    assert hasattr(trt, "ComputeCapability") == (flavour() == "tensorrt-rtx")


def test_refittable_plans_hold_one_profile_by_default(fake, tiny_config, folder):
    """Default refit "auto": a plan with several profiles is built without refit, a one-profile plan
    with REFIT_IDENTICAL (NvInfer.h allows one profile per refittable engine); the manifest says which
    and why, and asking for refit with several profiles is refused before anything is built."""
    build(tiny_config, folder, networks=["vae_decoder"])
    man = Manifest.read(manifest_path(plan_of(folder, "vae_decoder")))
    assert man.build["refit"] == "none" and "2 profile(s)" in man.build["refit_rule"]
    (_, _, flags), = [c for c in fake_tensorrt.STATE.calls if c[0] == "build"]
    assert not flags & ((1 << int(fake_tensorrt.BuilderFlag.REFIT)) | (1 << int(fake_tensorrt.BuilderFlag.REFIT_IDENTICAL)))
    build(tiny_config, folder, networks=["vae_decoder"], build=ONE)
    man = Manifest.read(manifest_path(plan_of(folder, "vae_decoder")))
    assert man.build["refit"] == "identical" and "at most once when building a refittable engine" in man.build["refit_rule"]
    with pytest.raises(ValueError, match="one optimisation profile only.*--trt-refittable none"):
        build(tiny_config, folder, networks=["vae_decoder"], build=dataclasses.replace(BUILD, refit="full"))


def test_no_precision_flag_is_ever_set(fake, tiny_config, folder):
    build(tiny_config, folder, networks=["text_encoders"])
    (_, _, flags), = [c for c in fake_tensorrt.STATE.calls if c[0] == "build"]
    names = {f.name for f in fake_tensorrt.BuilderFlag if flags & (1 << int(f))}
    assert names.isdisjoint({"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"}) and "TF32" in names


def test_plan_of_the_other_flavour_is_refused(fake, tiny_config, folder, monkeypatch):
    """A TensorRT plan given to TensorRT-RTX (and the reverse): one error with the rebuild command."""
    build(tiny_config, folder, networks=["vae_decoder"])
    built = plan_of(folder, "vae_decoder")
    other = "tensorrt" if flavour() == "tensorrt-rtx" else "tensorrt-rtx"
    use_surface(monkeypatch, "11.4.0.106" if other == "tensorrt" else "1.7.1.116", other)
    with pytest.raises(ArtifactError, match=f"no TensorRT\\S* plan.*{re.escape(built.name)}.*rebuild with: "
                                            f"{re.escape('python export/build_engines.py ' + rebuild_prefix())}"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])
    renamed = plan_of(folder, "vae_decoder")  # the same plan under the other flavour's name
    shutil.copy(built, renamed)
    shutil.copy(manifest_path(built), manifest_path(renamed))
    man = Manifest.read(manifest_path(renamed))
    dataclasses.replace(man, files={renamed.name: file_sha256(renamed)}).write(manifest_path(renamed))
    with pytest.raises(ArtifactError, match=f"flavour is '{man.build['flavour']}', expected '{other}'"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])
    edit_plan(renamed, lambda d: None)
    man = Manifest.read(manifest_path(renamed))
    target = fake_tensorrt.FakeCuda().target(fake_tensorrt.STATE.version, other)
    dataclasses.replace(man, kind=other, build={**man.build, **target.fields()}).write(manifest_path(renamed))
    with pytest.raises(tb.TensorRTError, match="could not deserialize.*another TensorRT flavour.*rebuild with"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])


def test_staleness_hashes_the_onnx_files_themselves(fake, tiny_config, folder):
    """An ONNX file changed behind its manifest's back makes the plan stale (the bytes are hashed)."""
    build(tiny_config, folder, networks=["vae_decoder"])
    onnx = folder / onnx_name("vae_decoder", PREC)
    detach(onnx)
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=f"is stale.*{onnx.name}.*rebuild with: python export/build_engines.py "
                                            f"{rebuild_prefix()}"):
        open_trt(tiny_config, folder, networks=["vae_decoder"])
    open_trt(tiny_config, folder, networks=["vae_decoder"], verify_hash=False)  # the cheap check trusts manifests


@pytest.mark.parametrize("gone", ["onnx", "manifest"])
def test_plan_folder_without_its_onnx_fails_loudly(fake, tiny_config, folder, gone):
    build(tiny_config, folder, networks=["text_encoders"])
    onnx = folder / onnx_name("text_encoders", PREC)
    (onnx if gone == "onnx" else manifest_path(onnx)).unlink()
    with pytest.raises(ArtifactError, match="the ONNX artifact it was built from is not beside it.*--trt"):
        open_trt(tiny_config, folder, networks=["text_encoders"])


def test_output_buffers_are_checked_against_tensorrt_shapes(fake, tiny_config, folder, monkeypatch):
    build(tiny_config, folder, networks=["vae_decoder"])
    engine = open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"]
    feed = sample(engine.spec, {"B": 1, "h": 8, "w": 16})
    real = engine.context.get_tensor_shape
    assert tuple(real("image")) == (-1, 3, -1, -1)  # unknown until the input shapes are set
    monkeypatch.setattr(engine.context, "get_tensor_shape",
                        lambda name: fake_tensorrt.Dims((1, 3, 64, 64)) if name == "image" else real(name))
    with pytest.raises(tb.TensorRTError, match=r"computes image as \(1, 3, 64, 64\).*spec as \(1, 3, 64, 128\)"):
        engine.infer(feed)


@pytest.mark.parametrize("fake", ["rtx"], indirect=True)
def test_rtx_runtime_cache_is_kept_beside_the_plan(fake, tiny_config, folder, caplog):
    caplog.set_level(logging.INFO)
    build(tiny_config, folder, networks=["vae_decoder"])
    cache = plan_of(folder, "vae_decoder").with_name(plan_of(folder, "vae_decoder").name + ".runtime.cache")
    assert not cache.exists()
    open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"].close()
    assert cache.is_file() and fake_tensorrt.STATE.jit_compiles == 1 and "no TensorRT-RTX runtime cache" in caplog.text
    open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"].close()
    assert fake_tensorrt.STATE.jit_compiles == 1, "the second launch compiles nothing"
    for bad in (b"garbage", cache.read_bytes().replace(b"[8, 9]", b"[8, 6]")):  # corrupt; another GPU's
        cache.write_bytes(bad)
        open_trt(tiny_config, folder, networks=["vae_decoder"])["vae_decoder"].close()
        assert "does not fit this GPU or version" in caplog.text
    assert fake_tensorrt.STATE.jit_compiles == 3 and b"[8, 9]" in cache.read_bytes()  # replaced
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "written atomically"
