"""The whole restore (Pipeline.run) against the algorithm written out independently in this file.

`reference_restore` below composes SUPIR's restore from its published definition, step by step, with
no supir_rt code except the tokenizer (checked on its own in test_tokenizer.py) and the toy networks'
functions themselves: PIL bicubic preprocessing, stage 1 (DR-encoder latent, decode), the x_center
posterior sample, the size-conditioning vector, the legacy DDPM σ table, the restore schedule, the
churned Euler EDM loop with ε-prediction (σ snapped to the table), linear CFG, the control scale,
restoration guidance, decoding, the colour fix (tests/formulas.py) and the truncating uint8 output.
The random stream is one CPU generator seeded with the seed, drawn in the official order. A wrong
sign, order, schedule, scale or draw anywhere makes the images differ by many grey levels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from supir_rt import cli
from supir_rt.api import Restorer
from supir_rt.config import ModelConfig
from supir_rt.images import read_metadata
from supir_rt.pipeline import Pipeline
from supir_rt.restore_config import RestoreConfig
from supir_rt.tokenizer import load_tokenizer

from formulas import ddpm_sigma_table, direct_wavelet_fix, sinusoid
from toys import gradient_image, toy_engines

SIGMA_MAX_LITERAL = 14.6146  # the official sampler's and guider's hard-coded σ_max


def reference_restore(image: Image.Image, cfg: RestoreConfig, fns: dict, config: ModelConfig, caption: str = ""):
    """Returns (uint8 image, list of per-step (x after churn, D after guidance)). ``fns`` maps each
    network name to a function of its named inputs returning its named outputs."""
    # sizes: output = round(upscale x input); the short side is raised to min_size; each side is
    # snapped to a multiple of 64 with round-half-even (e.g. 48x40 at min_size 64: 76.8x64 -> 64x64)
    w, h = image.size[0] * cfg.upscale, image.size[1] * cfg.upscale
    out_w, out_h = round(w), round(h)
    if min(w, h) < cfg.min_size:
        w, h = w * cfg.min_size / min(w, h), h * cfg.min_size / min(w, h)
    proc_w, proc_h = int(np.round(w / 64)) * 64, int(np.round(h / 64)) * 64
    lq = np.asarray(image.resize((proc_w, proc_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    lq = torch.from_numpy(lq.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]

    gen = torch.Generator().manual_seed(cfg.seed)
    control = fns["dr_encoder"](image=lq)["latent"]  # 0.13025 x DR posterior mean (the toy's own scale)
    stage1 = fns["vae_decoder"](latent=control)["image"]
    posterior_eps = torch.randn(control.shape, generator=gen)  # drawn even when guidance is off
    mean, logvar = fns["vae_encoder"](image=stage1)["moments"].chunk(2, dim=1)
    x_center = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * posterior_eps) * 0.13025

    tok, cc = load_tokenizer(), config.conditioner_config

    def text(prompt: str):
        ids_l = tok([prompt], pad_token=49407, context_length=77)
        ids_g = tok([prompt], pad_token=0, context_length=77)
        out = fns["text_encoders"](clip_l_ids=ids_l, bigg_ids=ids_g)
        sizes = [1024, 1024, 0, 0, 1024, 1024]  # original size, crop top-left, target size
        emb = torch.tensor([sum((sinusoid(v, cc.size_embed_dim) for v in sizes), [])], dtype=torch.float32)
        return out["crossattn"], torch.cat([out["pooled"], emb], dim=1)

    ctx_c, vec_c = text(caption + cfg.a_prompt)
    ctx_u, vec_u = text(cfg.n_prompt)

    table = ddpm_sigma_table()
    n = cfg.num_steps
    timesteps = [int(999 - k * 999 / n) for k in range(n)]
    sigmas = [float(table[t]) for t in timesteps] + [0.0]
    x = torch.randn(control.shape, generator=gen) * math.sqrt(1 + sigmas[0] ** 2)
    steps = []
    for k in range(n):
        s_k, s_next = sigmas[k], sigmas[k + 1]
        gamma = min(cfg.s_churn / n, math.sqrt(2) - 1)
        s_hat = s_k * (1 + gamma)
        if gamma > 0:  # the churn draw happens only on churned steps
            x = x + cfg.s_noise * torch.randn(x.shape, generator=gen) * math.sqrt(s_hat**2 - s_k**2)
        idx = int((table - s_hat).abs().argmin())
        s_q = float(table[idx])
        if cfg.use_linear_control_scale:
            cs = (s_k / SIGMA_MAX_LITERAL) * (cfg.control_scale_start - cfg.control_scale) + cfg.control_scale
        else:
            cs = cfg.control_scale
        # one call on the CFG batch [uncond, cond]
        eps = fns["unet_adaptor"](x_in=torch.cat([x, x]) / math.sqrt(s_q**2 + 1), timesteps=torch.tensor([idx, idx]),
                                  context=torch.cat([ctx_u, ctx_c]), vector=torch.cat([vec_u, vec_c]),
                                  lq_latent=torch.cat([control, control]), control_scale=torch.tensor([cs]))["eps"]
        denoised = [x - s_q * eps[:1], x - s_q * eps[1:]]
        if cfg.use_linear_cfg:
            s = (cfg.cfg_scale_start - cfg.cfg_scale) * s_hat / SIGMA_MAX_LITERAL + cfg.cfg_scale
        else:
            s = cfg.cfg_scale
        d = denoised[0] + s * (denoised[1] - denoised[0])
        if s_next > 0.05 and cfg.restore_cfg > 0:
            d = d - (d - x_center) * (s_k / SIGMA_MAX_LITERAL) ** cfg.restore_cfg
        steps.append((x, d))
        x = x + (s_next - s_hat) * (x - d) / s_hat
    sample = fns["vae_decoder"](latent=x)["image"]
    if cfg.color_fix_type == "wavelet":
        sample = torch.from_numpy(direct_wavelet_fix(sample.numpy(), stage1.numpy())).float()
    elif cfg.color_fix_type == "adain":
        def stats(t):
            flat = t.double().reshape(3, -1)
            m = flat.mean(1)
            return m[:, None, None], (((flat - m[:, None]) ** 2).sum(1) / (flat.shape[1] - 1) + 1e-5).sqrt()[:, None, None]
        (mc, sc), (ms, ss) = stats(sample[0]), stats(stage1[0])
        sample = ((sample[0].double() - mc) / sc * ss + ms).float()[None]
    out = F.interpolate(sample, size=(out_h, out_w), mode="bicubic", align_corners=False)
    out = (out[0].permute(1, 2, 0) * 127.5 + 127.5).numpy()
    return np.clip(out, 0, 255).astype(np.uint8), steps


CASES = {
    "official-defaults": (RestoreConfig(num_steps=4, min_size=64), ""),
    "guidance-linear-control-adain-caption": (
        RestoreConfig(num_steps=5, min_size=64, restore_cfg=4.0, use_linear_control_scale=True,
                      control_scale_start=0.3, color_fix_type="adain", seed=77), "a red car."),
    "constant-cfg-no-colour-fix": (
        RestoreConfig(num_steps=3, min_size=64, use_linear_cfg=False, cfg_scale=6.0, s_churn=0.0,
                      control_scale=0.6, color_fix_type="none", seed=3), ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_the_independent_composition(case):
    cfg, caption = CASES[case]
    config = ModelConfig.tiny()
    engines, _ = toy_engines(config)
    fns = {name: engine.fn for name, engine in engines.items()}
    image = gradient_image(48, 40)
    seen = []
    result = Pipeline(engines, config).run(image, cfg, caption=caption, callback=seen.append)
    expected, steps = reference_restore(image, cfg, fns, config, caption)
    assert len(seen) == len(steps) == cfg.num_steps
    for info, (x, d) in zip(seen, steps):
        torch.testing.assert_close(info.x, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(info.denoised, d, rtol=1e-5, atol=1e-5)
    assert result.image.shape == expected.shape == (40, 48, 3)
    # the uint8 cast truncates, so float noise can flip a value sitting on an integer by one level
    diff = np.abs(result.image.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.ptp(expected) > 50  # a textured result, not a flat image any composition would produce


# --------------------------------------------------------------------------------------------------
# through the CLI: the saved file holds the independently composed pixels
# --------------------------------------------------------------------------------------------------


def _cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def test_cli_reference_example_equals_the_independent_composition(tmp_path, monkeypatch, capsys):
    """300x400 at --min-size 512 (-> 512x682.7, snapped to 512x704 -> back to 300x400) over toy engines:
    flags reach the run and the PNG holds exactly the composed pixels."""
    config = ModelConfig.tiny()
    engines, _ = toy_engines(config)
    fns = {name: engine.fn for name, engine in engines.items()}
    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", lambda args, file_cfg: Restorer(engines, config, progress=False))
    src = tmp_path / "in.png"
    gradient_image(300, 400).save(src)
    code, err = _cli(["restore", src, "-o", tmp_path / "out.png", "--steps", 2, "--seed", 5, "--cfg", 5.5,
                      "--min-size", 512, "-q"], capsys)
    assert code == 0, err
    expected, _ = reference_restore(gradient_image(300, 400), RestoreConfig(num_steps=2, seed=5, cfg_scale=5.5,
                                                                          min_size=512),
                                    fns, config)
    with Image.open(tmp_path / "out.png") as img:
        assert img.mode == "RGB"
        saved = np.asarray(img)
    assert saved.shape == expected.shape == (400, 300, 3)
    diff = np.abs(saved.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    meta = read_metadata(tmp_path / "out.png")
    assert meta["processing_size"] == [512, 704] and meta["output_size"] == [300, 400]


def test_tiny_random_cli_equals_the_independent_composition_over_its_networks(tmp_path, capsys):
    """`--tiny-random` end to end with the real tiny networks (seed-0 weights): RGB as composed here
    over the same networks, alpha passed through untouched, the not-a-restoration note and metadata."""
    from supir_rt.backends import open_engines
    from supir_rt.model.supir import build_model

    src = tmp_path / "in.png"
    rgb = np.asarray(gradient_image(48, 40))
    Image.fromarray(np.dstack([rgb, np.full((40, 48), 200, np.uint8)]), "RGBA").save(src)
    code, err = _cli(["restore", src, "-o", tmp_path / "out.png", "--tiny-random", "--steps", 2, "--min-size", 64],
                     capsys)
    assert code == 0, err
    assert "NOT a restoration" in err  # the note (-q silences it: tests/test_cli_errors.py)
    with Image.open(tmp_path / "out.png") as img:
        assert img.mode == "RGBA"
        saved = np.asarray(img)
    assert (saved[..., 3] == 200).all()
    assert read_metadata(tmp_path / "out.png")["runtime"]["model"] == "tiny-random"

    config = ModelConfig.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the weights --tiny-random documents (Restorer.tiny_random(seed=0))
        model = build_model(config)
    engines = open_engines("torch", model=model)
    fns = {name: (lambda e: lambda **feed: {k: v.clone() for k, v in e.infer(feed).items()})(engine)
           for name, engine in engines.items()}
    expected, _ = reference_restore(Image.fromarray(rgb), RestoreConfig(num_steps=2, min_size=64), fns, config)
    diff = np.abs(saved[..., :3].astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
