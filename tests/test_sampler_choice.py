"""The few-step path: ``sampler="dpmpp2m-sde"`` through `RestoreConfig`, the pipeline, the API and the CLI,
and the ``lightning`` preset.

The main check runs a whole restore over toy engines whose UNet is a closed-form function of its inputs,
and compares the latent handed to the decoder with a DPM++ 2M SDE loop written out below in float64
numpy from the published formulas (Karras et al. 2022 eq. 5 for the schedule; Lu et al. 2022 /
k-diffusion `sample_dpmpp_2m_sde` for the update; the legacy DDPM table and ε-parameterisation of SDXL):
none of supir-rt's schedule, denoiser or sampler code is used for the expected value. The noise is drawn
from a plain seeded `torch.Generator` in the documented order (posterior draw, initial noise, one draw
per noised step).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

import toys

from supir_rt import cli
from supir_rt.api import Restorer
from supir_rt.config import ModelConfig
from supir_rt.errors import SettingError, UserError
from supir_rt.images import read_metadata
from supir_rt.pipeline import Pipeline
from supir_rt.restore_config import RESTORE_PRESETS, RestoreConfig, restore_preset

A, B, C = 0.45, 0.3, 0.2  # toy UNet: eps = A·x_in + B·control_scale·lq_latent + C·mean(context)


def toy_engines():
    """The shared toy engines with this file's closed-form UNet, every feed logged."""
    log = defaultdict(list)

    def unet(x_in, timesteps, context, vector, lq_latent, control_scale):
        return {"eps": A * x_in + B * control_scale * lq_latent + C * context.mean((1, 2)).reshape(-1, 1, 1, 1)}

    engines, _ = toys.toy_engines(unet=unet, log=log)
    return engines, log


def image(w=48, h=40) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 5 % 256, y * 6 % 256, (x + y) * 3 % 256], -1).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------ the written-out reference

def legacy_sigmas_f64() -> np.ndarray:
    """SDXL's 1000 discrete σ: β on a linear grid in √β from 0.00085 to 0.012, σ = √((1−ᾱ)/ᾱ)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


def reference_dpmpp_latent(n, seed, lq, ctx_u, ctx_c, cfg_start, cfg_end, control_scale, s_noise):
    table = legacy_sigmas_f64().astype(np.float32).astype(np.float64)
    steps = np.linspace(999, 0, n, endpoint=False).astype(int)  # the n DDPM timesteps, descending
    smax, smin, rho = table[steps[0]], table[steps[-1]], 7.0
    ramp = np.linspace(0, 1, n)
    sigmas = np.append((smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, 0.0)

    gen = torch.Generator().manual_seed(seed)
    shape = tuple(lq.shape)
    torch.randn(shape, generator=gen)  # the x_center posterior draw, made (and unused) first
    draw = lambda: torch.randn(shape, generator=gen).double().numpy()  # noqa: E731

    def denoise(x, sigma):
        q = table[np.argmin(np.abs(table - np.float32(sigma)))]  # snapped σ
        c_in = 1.0 / np.sqrt(q * q + 1.0)
        d = [x - q * (A * x * c_in + B * control_scale * lq + C * ctx.mean()) for ctx in (ctx_u, ctx_c)]
        s = (cfg_start - cfg_end) * sigma / 14.6146 + cfg_end  # linear CFG, evaluated at σ
        return d[0] + s * (d[1] - d[0])

    x = draw() * np.sqrt(1.0 + sigmas[0] ** 2)
    old, h_last = None, None
    for k in range(n):
        d = denoise(x, sigmas[k])
        if sigmas[k + 1] == 0:
            x = d
            break
        h = np.log(sigmas[k] / sigmas[k + 1])  # η = 1
        if old is None:
            x = sigmas[k + 1] / sigmas[k] * np.exp(-h) * x - np.expm1(-2 * h) * d
        else:
            r = h_last / h
            x = sigmas[k + 1] / sigmas[k] * np.exp(-h) * x - np.expm1(-2 * h) * ((1 + 1 / (2 * r)) * d - old / (2 * r))
            x = x + draw() * sigmas[k + 1] * np.sqrt(-np.expm1(-2 * h)) * s_noise
        old, h_last = d, h
    return x


def test_dpmpp_restore_equals_the_written_out_sampler():
    engines, log = toy_engines()
    config = RestoreConfig(sampler="dpmpp2m-sde", num_steps=5, min_size=64, seed=11, cfg_scale=3.0, cfg_scale_start=1.5,
                           control_scale=0.8, use_linear_control_scale=True, control_scale_start=0.0, s_noise=1.02,
                           color_fix_type="none")
    Pipeline(engines, ModelConfig.tiny()).run(image(), config)

    first = log["unet_adaptor"][0]
    lq = first["lq_latent"][:1].double().numpy()
    ctx_u, ctx_c = (first["context"][i].double().numpy() for i in (0, 1))  # the CFG pair is [uncond, cond]
    assert all(float(call["control_scale"]) == pytest.approx(0.8) for call in log["unet_adaptor"])  # constant
    assert len(log["unet_adaptor"]) == 5 and not log["vae_encoder"]  # no x_center pass for DPM++
    got = log["vae_decoder"][-1]["latent"].double().numpy()
    want = reference_dpmpp_latent(5, 11, lq, ctx_u, ctx_c, 1.5, 3.0, 0.8, 1.02)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # measured 2.6e-6 (float32 run)


def test_dpmpp_ignores_restoration_guidance_and_says_so(caplog):
    engines, log = toy_engines()
    pipe = Pipeline(engines, ModelConfig.tiny())
    base = RestoreConfig(sampler="dpmpp2m-sde", num_steps=3, min_size=64)
    plain = pipe.run(image(), base).image
    with caplog.at_level(logging.WARNING, logger="supir_rt"):
        guided = pipe.run(image(), base.with_overrides(restore_cfg=4.0)).image
    np.testing.assert_array_equal(plain, guided)
    assert "restore_cfg" in caplog.text and not log["vae_encoder"]
    edm = pipe.run(image(), base.with_overrides(sampler="edm")).image
    assert np.abs(edm.astype(int) - plain.astype(int)).max() > 0  # the setting reaches the pipeline


def test_lightning_preset_is_the_official_lightning_configuration():
    # options/SUPIR_v0_Juggernautv9_lightning.yaml: RestoreDPMPP2MSampler; default_setting edm_steps 8,
    # s_cfg_Quality 2.0, spt_linear_CFG_Quality 2.0; all other settings as test.py's defaults.
    lightning = restore_preset("lightning")
    assert (lightning.sampler, lightning.num_steps, lightning.cfg_scale, lightning.cfg_scale_start) == \
        ("dpmpp2m-sde", 8, 2.0, 2.0)
    rest = {k: v for k, v in lightning.as_dict().items() if k not in {"sampler", "num_steps", "cfg_scale", "cfg_scale_start"}}
    assert rest == {k: v for k, v in RestoreConfig().as_dict().items() if k in rest}
    assert RESTORE_PRESETS["official"].sampler == "edm" and RestoreConfig().sampler == "edm"


def test_bad_sampler_names_the_field_in_python_and_the_flag_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SettingError, match="sampler='euler'.*edm, dpmpp2m-sde") as err:
        RestoreConfig(sampler="euler")
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["restore", str(tmp_path / "x.png"), "--sampler", "euler"])
    assert exit_.value.code == 2 and "--sampler: invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flags, sampler, steps", [(["--sampler", "dpmpp2m-sde", "--steps", "3"], "dpmpp2m-sde", 3),
                                                    (["--preset", "lightning"], "dpmpp2m-sde", 8),
                                                    (["--steps", "2"], "edm", 2)])
def test_cli_sampler_reaches_the_run_and_the_metadata(tmp_path, monkeypatch, capsys, flags, sampler, steps):
    runs = []

    def build(args, file_cfg):
        engines, log = toy_engines()
        runs.append(log)
        return Restorer(engines, ModelConfig.tiny())

    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", build)
    src = tmp_path / "in.png"
    image().save(src)
    code = cli.main(["restore", str(src), "-o", str(tmp_path / "out.png"), "--min-size", "64", "-q", *flags])
    assert code == 0, capsys.readouterr().err
    assert len(runs[0]["unet_adaptor"]) == steps
    meta = read_metadata(tmp_path / "out.png")
    assert meta["settings"]["sampler"] == sampler
    assert RestoreConfig(**meta["settings"]).sampler == sampler
    json.dumps(meta)
