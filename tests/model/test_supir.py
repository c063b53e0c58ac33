"""The assembled model: official keys, shapes and parameter counts; the network call contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from supir_rt.config import ModelConfig
from supir_rt.model.supir import build_model

KEYS_TSV = Path(__file__).resolve().parents[3] / "shared" / "reference" / "supir_state_dict_keys.tsv"


def _official_keys() -> dict[str, tuple[int, ...]]:
    if not KEYS_TSV.is_file():
        pytest.skip(f"reference key table not found at {KEYS_TSV}")
    keys = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, _source = line.split("\t")
        keys[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return keys


def _sdxl_conditioner_keys() -> dict[str, tuple[int, ...]]:
    """The standard SDXL single-file conditioner keys: CLIP-L in HF layout, bigG in open_clip layout."""
    keys: dict[str, tuple[int, ...]] = {}
    p = "conditioner.embedders.0.transformer.text_model."
    keys[p + "embeddings.token_embedding.weight"] = (49408, 768)
    keys[p + "embeddings.position_embedding.weight"] = (77, 768)
    for i in range(12):
        lp = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{lp}self_attn.{proj}.weight"], keys[f"{lp}self_attn.{proj}.bias"] = (768, 768), (768,)
        for ln in ("layer_norm1", "layer_norm2"):
            keys[f"{lp}{ln}.weight"] = keys[f"{lp}{ln}.bias"] = (768,)
        keys[lp + "mlp.fc1.weight"], keys[lp + "mlp.fc1.bias"] = (3072, 768), (3072,)
        keys[lp + "mlp.fc2.weight"], keys[lp + "mlp.fc2.bias"] = (768, 3072), (768,)
    keys[p + "final_layer_norm.weight"] = keys[p + "final_layer_norm.bias"] = (768,)
    p = "conditioner.embedders.1.model."
    keys[p + "token_embedding.weight"] = (49408, 1280)
    keys[p + "positional_embedding"] = (77, 1280)
    keys[p + "text_projection"] = (1280, 1280)
    keys[p + "logit_scale"] = ()
    keys[p + "ln_final.weight"] = keys[p + "ln_final.bias"] = (1280,)
    for i in range(32):
        rp = f"{p}transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            keys[f"{rp}{ln}.weight"] = keys[f"{rp}{ln}.bias"] = (1280,)
        keys[rp + "attn.in_proj_weight"], keys[rp + "attn.in_proj_bias"] = (3840, 1280), (3840,)
        keys[rp + "attn.out_proj.weight"], keys[rp + "attn.out_proj.bias"] = (1280, 1280), (1280,)
        keys[rp + "mlp.c_fc.weight"], keys[rp + "mlp.c_fc.bias"] = (5120, 1280), (5120,)
        keys[rp + "mlp.c_proj.weight"], keys[rp + "mlp.c_proj.bias"] = (1280, 5120), (1280,)
    return keys


@pytest.fixture(scope="module")
def official_meta():
    return build_model(ModelConfig.official(), device="meta")


def test_official_model_has_exactly_the_official_keys_and_shapes(official_meta):
    expected = _official_keys()
    expected.pop("model.control_model.mask_LQ")  # in the SUPIR file, read by nothing (doc §3.2)
    expected |= _sdxl_conditioner_keys()
    ours = {k: tuple(v.shape) for k, v in official_meta.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}


def test_official_parameter_counts_match_reference(official_meta):
    def count(module):
        return sum(p.numel() for p in module.parameters())

    unet = official_meta.model.diffusion_model
    vae = official_meta.first_stage_model
    assert count(unet) - count(unet.project_modules) == 2_567_463_684
    assert count(unet.project_modules) == 54_797_440
    assert count(official_meta.model.control_model) == 1_243_378_880
    assert count(vae.encoder) == count(vae.denoise_encoder) == 34_163_592
    assert count(vae.decoder) == 49_490_179
    assert all(p.is_meta for p in official_meta.parameters())


def test_connector_order_matches_official_table(official_meta):
    """Reference doc §2.2: ZeroCrossAttn at final indices 3 and 7, ZeroSFT elsewhere, with GN widths."""
    pm = official_meta.model.diffusion_model.project_modules
    kinds = [type(m).__name__ for m in pm]
    assert kinds == ["ZeroSFT"] * 3 + ["ZeroCrossAttn"] + ["ZeroSFT"] * 3 + ["ZeroCrossAttn"] + ["ZeroSFT"] * 4
    gn = {i: m.param_free_norm.num_channels for i, m in enumerate(pm) if kinds[i] == "ZeroSFT"}
    assert gn == {0: 640, 1: 640, 2: 960, 4: 960, 5: 1280, 6: 1920, 8: 1920, 9: 2560, 10: 2560, 11: 1280}


def test_network_call_contract_on_tiny(tiny_model, tiny_config):
    """control_model returns 10 features of the documented shapes; the UNet returns eps of x's shape."""
    torch.manual_seed(1)
    b, h, w = 2, 8, 12
    mc = tiny_config.network_config.model_channels
    x = torch.randn(b, 4, h, w)
    lq = torch.randn(b, 4, h, w)
    t = torch.tensor([999, 10])
    ctx = torch.randn(b, 77, tiny_config.network_config.context_dim)
    y = torch.randn(b, tiny_config.network_config.adm_in_channels)
    feats = tiny_model.model.control_model(x=lq, timesteps=t, xt=x, context=ctx, y=y)
    shapes = [tuple(f.shape) for f in feats]
    expected = [(b, mc, h, w)] * 3 + [(b, mc, h // 2, w // 2)] + [(b, 2 * mc, h // 2, w // 2)] * 2
    expected += [(b, 2 * mc, h // 4, w // 4)] + [(b, 4 * mc, h // 4, w // 4)] * 3
    assert shapes == expected
    eps = tiny_model.model.diffusion_model(x, timesteps=t, context=ctx, y=y, control=feats, control_scale=0.7)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_network_routes_the_lq_latent_only_through_the_hint_block(tiny_config):
    """`SUPIRModel.network(x_in, t, cond, s)`: cond["control"] (the LQ latent) must reach the adaptor
    only through `input_hint_block`, x_in both trunks, and s the connectors. With the hint block zeroed,
    changing the LQ latent changes nothing, while changing x_in does; at s = 0 the adaptor is off."""
    torch.manual_seed(3)
    model = build_model(tiny_config)
    b, h, w = 2, 8, 8
    x, lq, lq2 = torch.randn(b, 4, h, w), torch.randn(b, 4, h, w), torch.randn(b, 4, h, w)
    t = torch.tensor([700, 50])
    cond = {"crossattn": torch.randn(b, 77, tiny_config.network_config.context_dim),
            "vector": torch.randn(b, tiny_config.network_config.adm_in_channels), "control": lq}
    base = model.network(x, t, cond, 1.0)
    assert not torch.allclose(model.network(x, t, cond | {"control": lq2}, 1.0), base)  # the LQ latent matters
    with torch.no_grad():
        model.model.control_model.input_hint_block[0].weight.zero_()
        model.model.control_model.input_hint_block[0].bias.zero_()
    hintless = model.network(x, t, cond, 1.0)
    torch.testing.assert_close(model.network(x, t, cond | {"control": lq2}, 1.0), hintless, rtol=0, atol=0)
    assert not torch.allclose(model.network(x + 0.5, t, cond, 1.0), hintless)
    plain = model.model.diffusion_model(x, timesteps=t, context=cond["crossattn"], y=cond["vector"], control=None)
    torch.testing.assert_close(model.network(x, t, cond, 0.0), plain, rtol=0, atol=0)


def test_build_model_casts_without_fp32_copy_and_inits_all():
    torch.manual_seed(0)
    model = build_model(ModelConfig.tiny(), dtype=torch.float16)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float16}
    assert not any(p.requires_grad for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    assert not model.training
