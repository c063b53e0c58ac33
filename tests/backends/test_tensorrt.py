"""TensorRT backend: plans built from the tiny fp16 ONNX graphs == the torch backend (needs TensorRT
and an NVIDIA GPU; skipped otherwise with the reason). Without TensorRT the backend and the build
command must say why they cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from supir_rt.backends import available_backends, open_engines
from supir_rt.backends.specs import DimRange

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "export"))

REASON = available_backends()["tensorrt"]
requires_tensorrt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT backend unavailable: {REASON}")
FP16_TOL = dict(atol=2e-2, rtol=2e-2)  # fp16 plan vs the fp32 reference (see test_onnxruntime.py)
RANGES = {"B": DimRange(1, 1, 2), "h": DimRange(8, 16, 32), "w": DimRange(8, 16, 32)}


def test_unavailable_backend_says_why():
    if REASON is None:
        pytest.skip("TensorRT is available here")
    assert "tensorrt" in REASON.lower() or "CUDA" in REASON
    with pytest.raises(RuntimeError, match="not available here"):
        open_engines("tensorrt", config=None, artifact_dir=".")


def test_build_command_explains_missing_tensorrt(tmp_path, caplog):
    if REASON is None:
        pytest.skip("TensorRT is available here")
    import build_engines

    assert build_engines.main(["--tiny-random", "--trt", "--out", str(tmp_path), "--quiet"]) == 2
    assert "cannot build TensorRT plans" in caplog.text
    assert not list(tmp_path.iterdir()), "it fails before exporting anything"


@requires_tensorrt
@pytest.mark.requires_tensorrt
@pytest.mark.parametrize("network", ["text_encoders", "unet_adaptor", "vae_decoder"])
def test_plan_matches_torch_backend(network, tiny_model, tiny_config, tmp_path, torch_engines):
    from build_trt import build_all

    from supir_rt.backends.onnx_export import export_all

    export_all(tiny_model, tmp_path, precision="fp16", networks=[network], progress=False)
    build_all(tiny_config, tmp_path, precision="fp16", networks=[network], ranges=RANGES)
    engine = open_engines("tensorrt", config=tiny_config, artifact_dir=tmp_path, ranges=RANGES,
                          networks=[network])[network]
    for dims in ({"B": 1, "h": 16, "w": 24}, {"B": 2, "h": 8, "w": 16}):
        feed = engine.spec.sample_inputs(dims, generator=torch.Generator().manual_seed(1))
        want = torch_engines[network].infer(feed)
        got = engine.infer({k: v.cuda() for k, v in feed.items()})
        for name in want:
            torch.testing.assert_close(got[name].cpu(), want[name], **FP16_TOL)
