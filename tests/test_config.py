"""Config presets and reading an official options YAML (layout of options/SUPIR_v0.yaml, doc §1)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from supir_rt.config import ModelConfig, UNetConfig, model_config

UNET_PARAMS = dict(
    mode="XL-base", project_type="ZeroSFT", project_channel_scale=2, adm_in_channels=2816, num_classes="sequential",
    use_checkpoint=True, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
    num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
    spatial_transformer_attn_type="softmax-xformers", legacy=False,
)


def official_yaml(**overrides) -> dict:
    """The structure of options/SUPIR_v0.yaml with its values (reference doc §1.1-1.7)."""
    control = {k: v for k, v in UNET_PARAMS.items() if k not in ("mode", "project_type", "project_channel_scale")}
    control["input_upscale"] = 1
    unet = dict(UNET_PARAMS, **overrides)
    emb = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 11}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ] + [{"is_trainable": False, "input_key": k, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
          "params": {"outdim": 256}} for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    return {"model": {"target": "SUPIR.models.SUPIR_model.SUPIRModel", "params": {
        "ae_dtype": "bf16", "diffusion_dtype": "fp16", "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "network_wrapper": "sgm.modules.diffusionmodules.wrappers.ControlWrapper",
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiserWithControl",
                            "params": {"num_idx": 1000, "discretization_config": {
                                "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "control_stage_config": {"target": "SUPIR.modules.SUPIR_v0.GLVControl", "params": control},
        "network_config": {"target": "SUPIR.modules.SUPIR_v0.LightGLVUNet", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditionerWithControl", "params": {"emb_models": emb}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "ckpt_path": None, "embed_dim": 4, "monitor": None,
            "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 256,
                         "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "p_p": "positive words", "n_p": "negative words",
    }}}


def test_official_yaml_reads_to_the_official_preset(tmp_path):
    path = tmp_path / "SUPIR_v0.yaml"
    path.write_text(yaml.safe_dump(official_yaml()))
    cfg = ModelConfig.from_official_yaml(path)
    ref = ModelConfig.official()
    assert cfg.network_config == ref.network_config
    assert cfg.control_stage_config == ref.control_stage_config
    assert cfg.first_stage_config == ref.first_stage_config
    assert cfg.conditioner_config == ref.conditioner_config
    assert (cfg.p_p, cfg.n_p) == ("positive words", "negative words")


def test_yaml_variant_builds_with_its_own_values(tmp_path):
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(official_yaml(transformer_depth=[1, 1, 4])))
    assert ModelConfig.from_official_yaml(path).network_config.transformer_depth == (1, 1, 4)


@pytest.mark.parametrize(
    ("override", "message"),
    [({"model_channels": 330}, "multiple of 32"), ({"frobnicate": 3}, "unknown parameter network_config.frobnicate"),
     ({"legacy": True}, "legacy=True is not supported"), ({"project_type": "ZeroConv"}, "only 'ZeroSFT'")],
)
def test_bad_yaml_values_are_named(tmp_path, override, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(official_yaml(**override)))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_official_yaml(path)


def test_not_an_options_file(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("foo: 1\n")
    with pytest.raises(ValueError, match="no model.params"):
        ModelConfig.from_official_yaml(path)
    with pytest.raises(FileNotFoundError, match="options YAML not found"):
        ModelConfig.from_official_yaml(tmp_path / "missing.yaml")


def test_presets_are_consistent_and_frozen():
    tiny = model_config("tiny")
    assert tiny.network_config.context_dim == tiny.conditioner_config.context_dim == 64
    assert tiny.network_config.adm_in_channels == tiny.conditioner_config.vector_dim == 1600
    assert ModelConfig.official().conditioner_config.vector_dim == 2816
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.name = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")


def test_mismatched_widths_are_refused():
    with pytest.raises(ValueError, match="context_dim"):
        ModelConfig(network_config=UNetConfig(context_dim=64))
