"""Stale, altered, foreign or missing artifacts are refused with an error naming the file and the
command that rebuilds it; artifact names and external-data layout are as documented."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from supir_rt.backends import open_engines
from supir_rt.backends.manifest import (
    ArtifactError, Manifest, check_manifest, config_fingerprint, manifest_path, onnx_name, plan_name, profile_tag,
    rebuild_command, tensors_sha256,
)
from supir_rt.backends.specs import DEFAULT_RANGES, network_specs
from supir_rt.config import ModelConfig

NET = "text_encoders"  # the smallest artifact; copied into tmp_path before anything is altered
REBUILD = "python export/build_engines.py"


@pytest.fixture
def artifact_dir(tiny_onnx_dir, tmp_path):
    for name in (onnx_name(NET, "fp32"), manifest_path(tiny_onnx_dir / onnx_name(NET, "fp32")).name):
        shutil.copy(tiny_onnx_dir / name, tmp_path / name)
    return tmp_path


def _open(config, directory, precision="fp32"):
    return open_engines("onnxruntime", config=config, artifact_dir=directory, precision=precision, networks=[NET])


def test_intact_artifact_opens(tiny_config, artifact_dir):
    assert _open(tiny_config, artifact_dir)[NET].spec.name == NET


def test_missing_onnx_file(tiny_config, tmp_path):
    with pytest.raises(ArtifactError, match="not found") as err:
        _open(tiny_config, tmp_path)
    assert str(tmp_path / onnx_name(NET, "fp32")) in str(err.value)
    assert f"{REBUILD} --tiny-random --precision fp32" in str(err.value)


def test_missing_manifest(tiny_config, artifact_dir):
    manifest_path(artifact_dir / onnx_name(NET, "fp32")).unlink()
    with pytest.raises(ArtifactError, match="no manifest .* cannot be trusted") as err:
        _open(tiny_config, artifact_dir)
    assert REBUILD in str(err.value)


def test_changed_onnx_file(tiny_config, artifact_dir):
    with open(artifact_dir / onnx_name(NET, "fp32"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="has changed since it was built") as err:
        _open(tiny_config, artifact_dir)
    assert onnx_name(NET, "fp32") in str(err.value) and REBUILD in str(err.value)


def test_tiny_artifacts_refused_for_the_official_config(artifact_dir):
    with pytest.raises(ArtifactError, match="built for model config 'tiny'.*requested 'official'") as err:
        _open(ModelConfig.official(), artifact_dir)
    assert "I/O spec differs" in str(err.value)
    # the fix is --tiny-random, never a rebuild of the official model into (over) the tiny folder
    assert "--tiny-random" in str(err.value) and REBUILD not in str(err.value)


def test_precision_mismatch(tiny_config, artifact_dir):
    src = artifact_dir / onnx_name(NET, "fp32")
    src.rename(artifact_dir / onnx_name(NET, "fp16"))
    manifest_path(src).rename(manifest_path(artifact_dir / onnx_name(NET, "fp16")))
    with pytest.raises(ArtifactError, match="precision fp32, expected fp16") as err:
        _open(tiny_config, artifact_dir, precision="fp16")
    assert "--precision fp16" in str(err.value)


def test_unsupported_precision(tiny_config, artifact_dir):
    with pytest.raises(ValueError, match="precision 'bf16': ONNX artifacts are built as fp32 or fp16"):
        _open(tiny_config, artifact_dir, precision="bf16")


def test_manifest_spec_edited(tiny_config, artifact_dir):
    path = manifest_path(artifact_dir / onnx_name(NET, "fp32"))
    man = Manifest.read(path)
    man.spec["outputs"][0]["shape"][1] = 99
    man.write(path)
    with pytest.raises(ArtifactError, match="I/O spec differs"):
        check_manifest(artifact_dir / onnx_name(NET, "fp32"), spec=network_specs(tiny_config)[NET],
                       config=tiny_config, precision="fp32")


def test_wrong_backend_name(tiny_config, artifact_dir):
    with pytest.raises(ValueError, match=r"unknown backend 'onnxrt'.*'onnxruntime'"):
        open_engines("onnxrt", config=tiny_config, artifact_dir=artifact_dir)


def test_onnxruntime_cuda_is_unavailable_with_a_reason_here():
    from supir_rt.backends import available_backends

    reason = available_backends()["onnxruntime-cuda"]
    if reason is None:
        pytest.skip("this machine has onnxruntime-gpu and a GPU")
    assert "CUDA" in reason or "onnxruntime" in reason
    with pytest.raises(RuntimeError, match="not available here"):
        open_engines("onnxruntime-cuda", config=ModelConfig.tiny(), artifact_dir=".")


def test_names_and_fingerprints():
    assert onnx_name("unet_adaptor", "fp16") == "unet_adaptor_fp16.onnx"
    assert profile_tag(DEFAULT_RANGES) == "B1-1-4.h8-128-256.w8-128-256"
    # the profiles are in the plan's manifest, not in its name (the runtime must read what the build recorded)
    assert plan_name("unet_adaptor", "fp16", (8, 6), "10.7.0") == "unet_adaptor_fp16_sm86_trt10.7.0.plan"
    assert manifest_path(Path("a/x.plan")) == Path("a/x.plan.json")
    assert manifest_path(Path("a/x_fp32.onnx")) == Path("a/x_fp32.json")
    assert config_fingerprint(ModelConfig.tiny()) != config_fingerprint(ModelConfig.official())
    a = torch.arange(6.0)
    assert tensors_sha256([("w", a)]) != tensors_sha256([("w", a + 1)])
    assert tensors_sha256([("w", a)]) != tensors_sha256([("w", a.half())])
    assert rebuild_command(ModelConfig.tiny(), "fp16", trt=True).endswith("--trt-only --tiny-random --precision fp16")


def test_external_weights_are_streamed_into_one_data_file(tmp_path):
    """The exporter writes one file per tensor above 2 GB; `_move_graph` gathers them into
    ``<name>.onnx.data`` (page-aligned), which ONNX Runtime reads back unchanged."""
    import onnxruntime as ort

    from supir_rt.backends.onnx_export import _move_graph
    from supir_rt.backends.specs import NetworkSpec, TensorSpec

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 8), dtype=np.float32), rng.standard_normal((8, 3), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "n"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src_dir = tmp_path / "raw"
    src_dir.mkdir()
    onnx.save_model(model, str(src_dir / "raw.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(src_dir.iterdir())) == 3  # graph + one file per tensor, like the exporter
    spec = NetworkSpec("toy", (TensorSpec("x", torch.float32, ("B", 8)),), (TensorSpec("y", torch.float32, ("B", 3)),))
    target = tmp_path / "toy_fp32.onnx"
    _move_graph(src_dir / "raw.onnx", target, spec)
    shutil.rmtree(src_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_fp32.onnx", "toy_fp32.onnx.data"]
    out = onnx.load(str(target), load_external_data=False).graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["B", 3]  # declared by the spec
    x = rng.standard_normal((2, 8), dtype=np.float32)
    (y,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5, atol=1e-5)
