"""The I/O contract: ONNX axes, TensorRT profiles, buffer shapes and sample inputs all derive from
one spec per network, and the documented contract (engines/README.md) is the generated one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from supir_rt.backends.manifest import contract_markdown, spec_to_json
from supir_rt.backends.specs import DEFAULT_RANGES, NETWORKS, DimRange, network_specs, validate_feed
from supir_rt.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def official():
    return network_specs(ModelConfig.official())


def test_every_network_has_a_spec(official, tiny_config):
    assert tuple(official) == NETWORKS == tuple(network_specs(tiny_config))


def test_unet_adaptor_axes_and_profile(official):
    spec = official["unet_adaptor"]
    axes = spec.dynamic_axes()
    assert axes["x_in"] == {0: "2B", 2: "h", 3: "w"} and axes["eps"] == {0: "2B", 2: "h", 3: "w"}
    assert axes["context"] == {0: "2B"} and "control_scale" not in axes  # a (1,) runtime input, never baked
    ranges = {"B": DimRange(1, 1, 2), "h": DimRange(8, 64, 128), "w": DimRange(8, 96, 128)}
    prof = spec.profile(ranges)
    assert prof["x_in"] == ((2, 4, 8, 8), (2, 4, 64, 96), (4, 4, 128, 128))  # 2B: the CFG pair
    assert prof["timesteps"] == ((2,), (2,), (4,))
    assert prof["context"][2] == (4, 77, 2048) and prof["control_scale"] == ((1,), (1,), (1,))


def test_image_networks_use_pixel_dims(official):
    assert official["vae_decoder"].output_shapes({"B": 2, "h": 16, "w": 24}) == {"image": (2, 3, 128, 192)}
    assert official["dr_encoder"].profile(DEFAULT_RANGES)["image"][0] == (1, 3, 64, 64)


def test_sample_inputs_satisfy_the_spec(official):
    for spec in official.values():
        if spec.name == "unet_adaptor":
            continue  # same machinery; its official context is large
        dims = {"B": 2, "h": 8, "w": 12}
        feed = spec.sample_inputs(dims, generator=torch.Generator().manual_seed(0))
        validate_feed(spec, feed)
        assert all(dims[k] == v for k, v in spec.infer_dims(feed).items())


def test_validation_names_the_offending_input(tiny_config):
    spec = network_specs(tiny_config)["vae_decoder"]
    with pytest.raises(TypeError, match=r"vae_decoder\.latent: dtype torch.float16"):
        validate_feed(spec, {"latent": torch.zeros(1, 4, 8, 8, dtype=torch.float16)})
    with pytest.raises(ValueError, match=r"vae_decoder\.latent: shape \(1, 3, 8, 8\)"):
        validate_feed(spec, {"latent": torch.zeros(1, 3, 8, 8)})


def test_spec_json_is_stable_and_distinguishes_configs(official, tiny_config):
    tiny = network_specs(tiny_config)
    assert spec_to_json(official["unet_adaptor"])["inputs"][2] == {"name": "context", "dtype": "float32",
                                                                     "shape": ["2B", 77, 2048]}
    assert spec_to_json(tiny["unet_adaptor"]) != spec_to_json(official["unet_adaptor"])


def test_engines_readme_documents_the_generated_contract(official):
    readme = (REPO / "engines" / "README.md").read_text()
    assert contract_markdown(official) in readme, (
        "engines/README.md is out of date: regenerate its contract section with "
        "`python export/build_engines.py --contract official`")


def test_auto_with_engines_never_picks_a_torch_backend(monkeypatch):
    """On a GPU machine without TensorRT/onnxruntime-gpu, `auto` over an engines folder must not pick
    the torch backend (which needs checkpoints, not engines); without engines it may."""
    import supir_rt.backends.registry as backends

    status = {"tensorrt": "absent", "onnxruntime-cuda": "absent", "onnxruntime": None, "torch": None}
    monkeypatch.setattr(backends, "available_backends", lambda: status)
    assert backends.resolve_backend("auto", needs_artifacts=True) == "onnxruntime"
    status["onnxruntime"] = "absent"
    assert backends.resolve_backend("auto") == "torch"
    with pytest.raises(RuntimeError, match="no backend"):
        backends.resolve_backend("auto", needs_artifacts=True)


def test_torch_backend_is_one_backend_for_every_device():
    """There is no separate torch-cuda backend: `--backend torch --device cuda` is the CUDA path."""
    import supir_rt.backends as backends

    assert "torch-cuda" not in backends.available_backends()
    assert "torch-cuda" not in backends.AUTO_ORDER
