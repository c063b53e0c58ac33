"""Connector formulas written out by hand (reference doc §2.4, §2.5) and the s = 0 identity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from supir_rt.model.control import ZeroCrossAttn, ZeroSFT


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def test_zero_sft_matches_hand_formula_with_decoder_state():
    torch.manual_seed(0)
    sft = ZeroSFT(label_nc=32, norm_nc=32, concat_channels=64)
    _randomise(sft)
    c, h, h_dec = torch.randn(2, 32, 6, 5), torch.randn(2, 32, 6, 5), torch.randn(2, 64, 6, 5)
    s = 0.6
    raw = torch.cat([h_dec, h], 1)
    u = torch.cat([h_dec, h + F.conv2d(c, sft.zero_conv.weight, sft.zero_conv.bias)], 1)
    a = F.silu(F.conv2d(c, sft.mlp_shared[0].weight, sft.mlp_shared[0].bias, padding=1))
    gamma = F.conv2d(a, sft.zero_mul.weight, sft.zero_mul.bias, padding=1)
    beta = F.conv2d(a, sft.zero_add.weight, sft.zero_add.bias, padding=1)
    # GroupNorm over the whole 96-channel concatenation: groups of 3 channels straddle nothing here,
    # but the statistics are over (decoder, injected skip) together, as upstream.
    g = u.reshape(2, 32, -1)
    normed = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape_as(u)
    normed = normed * sft.param_free_norm.weight[:, None, None] + sft.param_free_norm.bias[:, None, None]
    expected = s * (normed * (1 + gamma) + beta) + (1 - s) * raw
    torch.testing.assert_close(sft(c, h, h_dec, control_scale=s), expected, rtol=1e-5, atol=1e-5)


def test_zero_sft_group_norm_spans_decoder_and_skip():
    """960 = 640 + 320 channels in 32 groups of 30: normalising the parts separately must differ."""
    torch.manual_seed(0)
    sft = ZeroSFT(label_nc=32, norm_nc=32, concat_channels=64)
    h, h_dec = torch.randn(1, 32, 4, 4) * 5 + 3, torch.randn(1, 64, 4, 4)
    c = torch.randn(1, 32, 4, 4)
    whole = sft(c, h, h_dec, control_scale=1.0)
    with torch.no_grad():
        sft.zero_mul.weight.zero_(), sft.zero_mul.bias.zero_(), sft.zero_add.weight.zero_(), sft.zero_add.bias.zero_()
        sft.zero_conv.weight.zero_(), sft.zero_conv.bias.zero_()
    normed = sft(c, h, h_dec, control_scale=1.0)
    expected = F.group_norm(torch.cat([h_dec, h], 1), 32, sft.param_free_norm.weight, sft.param_free_norm.bias)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, normed)  # γ/β/zero_conv act when non-zero: not an identity


def test_zero_sft_middle_block_has_no_concat_and_scale_zero_is_identity():
    torch.manual_seed(0)
    sft = ZeroSFT(label_nc=64, norm_nc=64, concat_channels=0)
    _randomise(sft)
    c, h = torch.randn(2, 64, 3, 3), torch.randn(2, 64, 3, 3)
    assert torch.equal(sft(c, h, control_scale=0.0), h)
    assert not torch.allclose(sft(c, h, control_scale=1.0), h)


def test_zero_cross_attn_matches_hand_formula():
    torch.manual_seed(0)
    zca = ZeroCrossAttn(context_dim=32, query_dim=128)  # 2 heads of 64
    _randomise(zca)
    c, h = torch.randn(2, 32, 4, 3), torch.randn(2, 128, 4, 3)
    s = 0.8
    q_tok = F.group_norm(h, 32, zca.norm1.weight, zca.norm1.bias).flatten(2).transpose(1, 2)  # (2, 12, 128)
    kv_tok = F.group_norm(c, 32, zca.norm2.weight, zca.norm2.bias).flatten(2).transpose(1, 2)  # (2, 12, 32)
    q, k, v = q_tok @ zca.attn.to_q.weight.T, kv_tok @ zca.attn.to_k.weight.T, kv_tok @ zca.attn.to_v.weight.T
    heads = []
    for i in range(2):
        sl = slice(64 * i, 64 * (i + 1))
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(64), dim=-1)
        heads.append(weights @ v[..., sl])
    out = torch.cat(heads, -1) @ zca.attn.to_out[0].weight.T + zca.attn.to_out[0].bias  # (2, 12, 128)
    expected = h + s * out.transpose(1, 2).reshape_as(h)
    torch.testing.assert_close(zca(c, h, control_scale=s), expected, rtol=1e-5, atol=1e-5)


def test_control_scale_zero_reproduces_plain_sdxl_unet(tiny_model, tiny_config):
    torch.manual_seed(2)
    unet, ctrl = tiny_model.model.diffusion_model, tiny_model.model.control_model
    x, lq = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 3])
    ctx = torch.randn(2, 77, tiny_config.network_config.context_dim)
    y = torch.randn(2, tiny_config.network_config.adm_in_channels)
    feats = ctrl(x=lq, timesteps=t, xt=x, context=ctx, y=y)
    plain = unet(x, timesteps=t, context=ctx, y=y, control=None)
    torch.testing.assert_close(unet(x, timesteps=t, context=ctx, y=y, control=feats, control_scale=0.0), plain,
                               rtol=0, atol=0)
    assert not torch.allclose(unet(x, timesteps=t, context=ctx, y=y, control=feats, control_scale=1.0), plain)
    # a per-sample control scale tensor broadcasts over the batch
    mixed = unet(x, timesteps=t, context=ctx, y=y, control=feats, control_scale=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=0)
