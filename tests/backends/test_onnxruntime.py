"""Tiny model exported to ONNX and run through the ONNX Runtime backend on CPU == the torch backend.

Tolerances: fp32 graphs are compared with atol = rtol = 1e-4 (observed max abs difference <= 5e-6
on outputs of magnitude ~1-5: only the order of float32 operations differs). fp16 graphs are
compared with the fp32 reference at atol = rtol = 2e-2 (observed <= 2e-3: fp16 rounding of weights
and activations, 11-bit mantissa).
"""

from __future__ import annotations

import onnx
import pytest
import torch

from supir_rt.backends import open_engines, resolve_backend
from supir_rt.backends.manifest import Manifest, manifest_path, onnx_name
from supir_rt.backends.onnx_export import check_graph_io, export_all
from supir_rt.backends.specs import NETWORKS

FP32_TOL = dict(atol=1e-4, rtol=1e-4)
FP16_TOL = dict(atol=2e-2, rtol=2e-2)
# Batch 1 and 2 (the UNet sees 2B = 2 and 4), non-square and square latents, including sizes other
# than the tracing shape (B=1, 8x16) and a side (12) that is not a power of two.
SHAPES = [{"B": 1, "h": 8, "w": 16}, {"B": 2, "h": 12, "w": 8}, {"B": 1, "h": 16, "w": 16}]


def _feed(engine, dims, seed=1):
    return engine.spec.sample_inputs(dims, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: f"B{d['B']}-{d['h']}x{d['w']}")
@pytest.mark.parametrize("network", NETWORKS)
def test_network_matches_torch_backend(network, dims, ort_engines, torch_engines):
    feed = _feed(ort_engines[network], dims)
    got = ort_engines[network].infer(feed)
    want = torch_engines[network].infer(feed)
    assert set(got) == set(ort_engines[network].spec.output_names)
    for name in got:
        assert got[name].shape == ort_engines[network].spec.output(name).resolve(dims)
        torch.testing.assert_close(got[name], want[name], **FP32_TOL)


@pytest.mark.parametrize("network", NETWORKS)
def test_exported_graph_io_is_the_spec(network, tiny_onnx_dir, ort_engines):
    check_graph_io(tiny_onnx_dir / onnx_name(network, "fp32"), ort_engines[network].spec)  # raises on mismatch


def test_output_buffers_are_engine_owned_and_reused(ort_engines):
    engine = ort_engines["vae_decoder"]
    a = engine.infer(_feed(engine, {"B": 1, "h": 8, "w": 8}, seed=1))["image"]
    first = a.clone()
    b = engine.infer(_feed(engine, {"B": 1, "h": 8, "w": 8}, seed=2))["image"]
    assert b.data_ptr() == a.data_ptr(), "same shape: the preallocated buffer is reused"
    assert not torch.equal(a, first), "so the previous result is overwritten, as the protocol says"
    c = engine.infer(_feed(engine, {"B": 1, "h": 8, "w": 16}))["image"]
    assert c.shape == (1, 3, 64, 128)


def test_non_contiguous_inputs_are_accepted(ort_engines, torch_engines):
    engine = ort_engines["vae_decoder"]
    latent = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(3)).transpose(2, 3)
    assert not latent.is_contiguous()
    torch.testing.assert_close(engine.infer({"latent": latent})["image"],
                               torch_engines["vae_decoder"].infer({"latent": latent})["image"], **FP32_TOL)


def test_feed_is_validated(ort_engines):
    engine = ort_engines["unet_adaptor"]
    feed = _feed(engine, {"B": 1, "h": 8, "w": 8})
    with pytest.raises(TypeError, match="timesteps"):
        engine.infer({**feed, "timesteps": feed["timesteps"].float()})
    with pytest.raises(ValueError, match="missing"):
        engine.infer({k: v for k, v in feed.items() if k != "control_scale"})
    with pytest.raises(ValueError, match="disagrees"):
        engine.infer({**feed, "lq_latent": torch.zeros(2, 4, 8, 16)})


def test_engines_follow_the_protocol(ort_engines, tiny_onnx_dir):
    assert set(ort_engines) == set(NETWORKS)
    for name, engine in ort_engines.items():
        assert engine.spec.name == name and engine.device == torch.device("cpu")
        assert engine.backend == "onnxruntime"
    man = Manifest.read(manifest_path(tiny_onnx_dir / onnx_name("unet_adaptor", "fp32")))
    assert man.source == {"kind": "random-init", "seed": 0} and man.build["opset"] == 17


def test_closed_engine_refuses_to_run(tiny_config, tiny_onnx_dir):
    with open_engines("onnxruntime", config=tiny_config, artifact_dir=tiny_onnx_dir,
                      networks=["text_encoders"])["text_encoders"] as engine:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer(_feed(engine, {"B": 1}))


def test_factory_ignores_torch_backend_kwargs(tiny_config, tiny_onnx_dir, tiny_model):
    engines = open_engines("onnxruntime", config=tiny_config, artifact_dir=tiny_onnx_dir, model=tiny_model,
                           networks=["text_encoders"], validate=False)
    assert list(engines) == ["text_encoders"] and not engines["text_encoders"].validate


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine `auto` prefers a GPU backend")
def test_auto_picks_onnxruntime_on_a_cpu_machine():
    assert resolve_backend("auto") == "onnxruntime"


def test_fp16_graphs_keep_the_vae_in_fp32(tiny_model, tiny_config, tmp_path, torch_engines):
    networks = ["text_encoders", "vae_decoder"]
    export_all(tiny_model, tmp_path, precision="fp16", networks=networks, progress=False)

    def initializer_types(name):
        model = onnx.load(str(tmp_path / onnx_name(name, "fp16")))
        return {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if t.dims}

    assert "FLOAT16" in initializer_types("text_encoders")
    assert initializer_types("vae_decoder") == {"FLOAT"}
    engines = open_engines("onnxruntime", config=tiny_config, artifact_dir=tmp_path, precision="fp16",
                           networks=networks)
    for name, dims in (("text_encoders", {"B": 2}), ("vae_decoder", {"B": 1, "h": 8, "w": 12})):
        feed = _feed(engines[name], dims)
        got, want = engines[name].infer(feed), torch_engines[name].infer(feed)
        for out in got:
            assert got[out].dtype == torch.float32  # graph I/O stays fp32, as the spec says
            torch.testing.assert_close(got[out], want[out], **(FP16_TOL if name == "text_encoders" else FP32_TOL))


def test_optimized_graph_still_matches(tiny_model, tiny_config, tmp_path, torch_engines):
    export_all(tiny_model, tmp_path, networks=["vae_encoder"], progress=False, optimize=True)
    engine = open_engines("onnxruntime", config=tiny_config, artifact_dir=tmp_path, networks=["vae_encoder"])
    feed = _feed(engine["vae_encoder"], {"B": 1, "h": 8, "w": 16})
    torch.testing.assert_close(engine["vae_encoder"].infer(feed)["moments"],
                               torch_engines["vae_encoder"].infer(feed)["moments"], **FP32_TOL)


def test_reuse_skips_up_to_date_artifacts_and_redoes_changed_weights(tiny_model, tmp_path):
    export_all(tiny_model, tmp_path, networks=["text_encoders"], progress=False)
    path = tmp_path / onnx_name("text_encoders", "fp32")
    stamp = path.stat().st_mtime_ns
    export_all(tiny_model, tmp_path, networks=["text_encoders"], progress=False, reuse=True)
    assert path.stat().st_mtime_ns == stamp
    from supir_rt.model.supir import build_model

    torch.manual_seed(1)
    other = build_model(tiny_model.config)
    export_all(other, tmp_path, networks=["text_encoders"], progress=False, reuse=True)
    assert path.stat().st_mtime_ns != stamp


def test_tiny_pipeline_on_onnxruntime_equals_torch(ort_engines, torch_engines, tiny_config):
    """The whole restore (stage 1, conditioning, 2 EDM steps with churn and restoration guidance,
    decode, colour fix) with the same seed: identical 8-bit images (tolerance: 1 level anywhere;
    observed 0 in trial runs at 4 and 10 steps: the engines agree to ~1e-6 before quantisation)."""
    import numpy as np
    from PIL import Image

    from supir_rt.api import Restorer
    from supir_rt.restore_config import RestoreConfig

    image = Image.fromarray((np.random.default_rng(0).random((40, 72, 3)) * 255).astype(np.uint8))
    settings = RestoreConfig(num_steps=2, min_size=64, seed=7, restore_cfg=4.0)
    want = np.asarray(Restorer(torch_engines, tiny_config).restore(image, settings, caption="a cat").image, dtype=int)
    got = np.asarray(Restorer(ort_engines, tiny_config).restore(image, settings, caption="a cat").image, dtype=int)
    assert got.shape == want.shape == (40, 72, 3)
    assert np.abs(got - want).max() <= 1
