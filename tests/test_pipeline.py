"""The restore pipeline: sizes (§4.2), stage wiring, the random stream (§5.4), skipping unused work,
conditioning once per prompt, captions, colour fix, non-finite outputs and the presets.

Most tests run the whole pipeline over *toy engines*: cheap, deterministic functions behind the real
Engine contract (feeds validated against `network_specs`), so the composition is tested at the real
processing sizes in milliseconds. A few tests run the tiny random model through the torch backend.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from supir_rt.backends import open_engines
from supir_rt.backends.specs import network_specs
from supir_rt.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_POSITIVE_PROMPT, ModelConfig
from supir_rt.denoiser import LinearCFG
from supir_rt.noise import NoiseSource
from supir_rt.pipeline import (
    NonFiniteOutputError, Pipeline, postprocess, preprocess, processing_sizes, snap,
)
from supir_rt.restore_config import RESTORE_PRESETS, RestoreConfig, restore_preset

from toys import gradient_image, toy_engines

FAST = RestoreConfig(num_steps=3, min_size=64)


@pytest.fixture()
def toy():
    engines, calls = toy_engines()
    return Pipeline(engines, ModelConfig.tiny()), calls


# --------------------------------------------------------------------------------------------------
# §4.2 sizes, preprocessing, output conversion
# --------------------------------------------------------------------------------------------------


def test_processing_size_of_the_reference_example():
    sizes = processing_sizes(300, 400, upscale=1, min_size=1024)  # §4.2: 1365.3 snaps to 1344
    assert sizes.processing == (1024, 1344)
    assert sizes.output == (300, 400)
    assert sizes.latent == (168, 128)


def test_snapping_is_round_half_even():
    assert snap(96) == 128 and snap(160) == 128 and snap(224) == 256  # 1.5 -> 2, 2.5 -> 2, 3.5 -> 4
    assert processing_sizes(800, 600, upscale=2, min_size=1024).processing == (1600, 1216)  # 1200/64 = 18.75


def test_upscale_sets_the_output_and_min_size_only_the_processing_size():
    sizes = processing_sizes(100, 50, upscale=4, min_size=1024)
    assert sizes.output == (400, 200)
    assert sizes.processing == (2048, 1024)


def test_caption_size_has_short_side_512():
    sizes = processing_sizes(300, 400, 1, 1024, fix_resize=512)
    assert sizes.output == (512, 683)
    assert sizes.processing == (512, 704)


def test_too_small_processing_size_names_the_fix():
    with pytest.raises(ValueError, match="min-size"):
        processing_sizes(20, 20, upscale=1, min_size=0)


def test_preprocess_is_pil_bicubic_through_uint8():
    img = gradient_image(30, 40)
    sizes = processing_sizes(30, 40, 1, 64)
    x = preprocess(img, sizes)
    assert x.shape == (1, 3, 64, 64)  # 64 x 85.3 snaps to 64 x 64
    expected = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC)).astype(np.float32) / 255 * 2 - 1
    torch.testing.assert_close(x[0].permute(1, 2, 0), torch.from_numpy(expected), rtol=0, atol=0)


def test_postprocess_truncates():
    image = torch.full((1, 3, 8, 8), (10.9 - 127.5) / 127.5)
    image[0, 0, 0, 0] = 2.0  # clipped to 255
    out = postprocess(image, (8, 8))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert out[1, 1, 0] == 10 and out[0, 0, 0] == 255


# --------------------------------------------------------------------------------------------------
# the composition over toy engines
# --------------------------------------------------------------------------------------------------


def test_reference_example_end_to_end(toy):
    pipe, calls = toy
    result = pipe.run(gradient_image(300, 400), RestoreConfig(num_steps=2))
    assert result.sizes.processing == (1024, 1344)
    assert result.image.shape == (400, 300, 3) and result.image.dtype == np.uint8
    # one DR pass, one decode of stage 1 and one of the sample, no x_center pass (τ_r <= 0), one UNet call per step
    assert calls == Counter(dr_encoder=1, vae_decoder=2, text_encoders=2, unet_adaptor=2)


def test_same_seed_same_output_different_seed_different_output(toy):
    pipe, _ = toy
    img = gradient_image(48, 40)
    a = pipe.run(img, FAST)
    b = pipe.run(img, FAST)
    c = pipe.run(img, RestoreConfig(num_steps=3, min_size=64, seed=FAST.seed + 1))
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_random_seed_is_reported():
    engines, _ = toy_engines()
    result = Pipeline(engines, ModelConfig.tiny()).run(gradient_image(40, 40), RestoreConfig(num_steps=1, min_size=64, seed=-1))
    assert 0 <= result.seed <= 65535


def test_skipping_the_unused_x_center_pass_is_bit_identical():
    img = gradient_image(48, 40)
    skip_engines, skip_calls = toy_engines()
    full_engines, full_calls = toy_engines()
    skipped = Pipeline(skip_engines, ModelConfig.tiny(), skip_unused_work=True).run(img, FAST)
    computed = Pipeline(full_engines, ModelConfig.tiny(), skip_unused_work=False).run(img, FAST)
    assert skip_calls["vae_encoder"] == 0 and full_calls["vae_encoder"] == 1
    assert np.array_equal(skipped.image, computed.image)


def test_restoration_guidance_encodes_x_center_once(toy):
    """(Its values are checked against the independent composition in test_pipeline_reference.py.)"""
    pipe, calls = toy
    img = gradient_image(48, 40)
    pipe.run(img, FAST)
    assert calls["vae_encoder"] == 0
    pipe.run(img, RestoreConfig(num_steps=3, min_size=64, restore_cfg=4.0))
    assert calls["vae_encoder"] == 1


def test_random_stream_follows_the_official_order():
    """posterior draw (CPU) -> initial noise -> one churn draw per step: check by replaying the stream."""
    engines, _ = toy_engines()
    pipe = Pipeline(engines, ModelConfig.tiny())
    seen = []
    pipe.run(gradient_image(64, 64), FAST, callback=lambda info: seen.append(info.x.clone()))
    noise = NoiseSource(FAST.seed)
    noise.posterior((1, 4, 8, 8))
    initial = noise.randn_like(torch.zeros(1, 4, 8, 8))
    first_churn = noise.randn_like(initial)
    from supir_rt.schedule import restore_sigmas

    sigmas = restore_sigmas(FAST.num_steps)
    gamma = min(FAST.s_churn / FAST.num_steps, 2**0.5 - 1)
    x0 = initial * torch.sqrt(1 + sigmas[0] ** 2)
    sigma_hat = sigmas[0] * (1 + gamma)
    expected = x0 + first_churn * FAST.s_noise * (sigma_hat**2 - sigmas[0] ** 2) ** 0.5
    torch.testing.assert_close(seen[0], expected)


def test_linear_cfg_and_control_scale_reach_the_sampler(toy):
    pipe, _ = toy
    infos = []
    cfg = RestoreConfig(num_steps=4, min_size=64, use_linear_control_scale=True, control_scale_start=0.5)
    pipe.run(gradient_image(40, 40), cfg, callback=infos.append)
    first = infos[0]
    assert first.cfg_scale == pytest.approx(float(LinearCFG(1.0, 4.0)(torch.tensor(first.sigma_hat))), rel=1e-5)
    assert first.control_scale == pytest.approx((first.sigma / 14.6146) * (0.5 - 1.0) + 1.0, rel=1e-5)


def test_text_embeddings_are_computed_once_per_prompt(toy):
    pipe, calls = toy
    img = gradient_image(40, 40)
    pipe.run(img, RestoreConfig(num_steps=1, min_size=64))
    pipe.run(img, RestoreConfig(num_steps=1, min_size=64, seed=7))
    assert calls["text_encoders"] == 2  # positive and negative, once each across both images
    pipe.run(img, RestoreConfig(num_steps=1, min_size=64), caption="a cat.")
    assert calls["text_encoders"] == 3


def test_caption_is_joined_without_separator(toy):
    pipe, _ = toy
    result = pipe.run(gradient_image(40, 40), RestoreConfig(num_steps=1, min_size=64), caption="a red car.")
    assert result.prompt == "a red car." + DEFAULT_POSITIVE_PROMPT
    assert result.negative_prompt == DEFAULT_NEGATIVE_PROMPT


def test_text_captioner_needs_no_stage1_512_pass(toy):
    from supir_rt.caption import make_captioner

    pipe, calls = toy
    result = pipe.run(gradient_image(40, 40), RestoreConfig(num_steps=1, min_size=64),
                      captioner=make_captioner("text", text="a dog."))
    assert result.caption == "a dog."
    assert calls["dr_encoder"] == 1


def test_image_captioner_sees_the_stage1_image_at_short_side_512(toy):
    pipe, calls = toy
    seen = []

    class ImageCaptioner:
        needs_image = True

        def caption(self, image, source=None):
            seen.append(image.size)
            return "seen."

        def close(self):
            pass

    result = pipe.run(gradient_image(300, 400), RestoreConfig(num_steps=1), captioner=ImageCaptioner())
    assert seen == [(512, 683)]
    assert result.caption == "seen."
    assert calls["dr_encoder"] == 2  # the 512 pass and the main pass


def test_non_finite_output_is_an_error_not_an_image():
    engines, _ = toy_engines(nan=True)
    with pytest.raises(NonFiniteOutputError, match="--dtype fp32"):
        Pipeline(engines, ModelConfig.tiny()).run(gradient_image(40, 40), RestoreConfig(num_steps=1, min_size=64))


def test_missing_engine_is_named():
    engines, _ = toy_engines()
    del engines["vae_encoder"]
    with pytest.raises(ValueError, match="vae_encoder"):
        Pipeline(engines, ModelConfig.tiny())


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------


def test_default_is_the_official_test_py_configuration():
    c = RestoreConfig()
    assert (c.num_steps, c.cfg_scale, c.cfg_scale_start, c.use_linear_cfg) == (50, 4.0, 1.0, True)
    assert (c.control_scale, c.restore_cfg, c.s_churn, c.s_noise, c.seed) == (1.0, -1.0, 5.0, 1.01, 1234)
    assert (c.upscale, c.min_size, c.color_fix_type) == (1.0, 1024, "wavelet")
    assert restore_preset("official") == c


def test_presets_are_data():
    paper = restore_preset("paper")
    assert (paper.num_steps, paper.cfg_scale, paper.restore_cfg) == (100, 7.5, 4.0)
    quality = restore_preset("quality")
    assert (quality.cfg_scale, quality.cfg_scale_start, quality.s_noise, quality.control_scale) == (6.0, 3.0, 1.02, 0.93)
    fidelity = restore_preset("fidelity")
    assert (fidelity.cfg_scale, fidelity.cfg_scale_start, fidelity.s_noise, fidelity.control_scale) == (4.0, 1.0, 1.01, 1.0)
    assert set(RESTORE_PRESETS) == {"official", "paper", "quality", "fidelity", "lightning"}
    with pytest.raises(ValueError, match="choose one of"):
        restore_preset("best")


def test_overrides_and_validation():
    c = RestoreConfig().with_overrides(num_steps=10, cfg_scale=None)
    assert c.num_steps == 10 and c.cfg_scale == 4.0
    with pytest.raises(ValueError, match="num_steps"):
        RestoreConfig(num_steps=0)
    with pytest.raises(ValueError, match="color_fix_type"):
        RestoreConfig(color_fix_type="Wavelet")
    with pytest.raises(ValueError, match="unknown restore setting"):
        RestoreConfig().with_overrides(steps=3)


# --------------------------------------------------------------------------------------------------
# the tiny random model through the torch backend
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engines():
    torch.manual_seed(0)
    from supir_rt.model.supir import build_model

    config = ModelConfig.tiny()
    return open_engines("torch", model=build_model(config)), config


def test_tiny_model_same_seed_identical_skip_identical_other_seed_different(tiny_engines):
    engines, config = tiny_engines
    img = gradient_image(64, 64)
    cfg = RestoreConfig(num_steps=1, min_size=64)
    skipped = Pipeline(engines, config, skip_unused_work=True).run(img, cfg)
    computed = Pipeline(engines, config, skip_unused_work=False).run(img, cfg)
    other = Pipeline(engines, config).run(img, RestoreConfig(num_steps=1, min_size=64, seed=99))
    assert np.array_equal(skipped.image, computed.image)
    assert not np.array_equal(skipped.image, other.image)
