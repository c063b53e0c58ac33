"""`Restorer`'s public surface over toy engines: a restore is planned once (sizes and tiling, the device's
free memory read once), batches, captions and prompt warnings."""

from __future__ import annotations

import numpy as np
import pytest

from supir_rt.api import Request, Restorer
from supir_rt.config import ModelConfig
from supir_rt.images import ImageError
from supir_rt.restore_config import RestoreConfig
from toys import gradient_image, toy_engines

FAST = RestoreConfig(num_steps=2, min_size=64)


@pytest.fixture()
def restorer():
    engines, _ = toy_engines()
    return Restorer(engines, ModelConfig.tiny())


def test_a_restore_is_planned_once(restorer, monkeypatch):
    import supir_rt.tiling.policy as policy

    reads = []
    monkeypatch.setattr(policy, "available_memory", lambda device: reads.append(device) or 8 * policy.GiB)
    plan = restorer.plan(gradient_image(64, 48), FAST)
    assert plan.sizes.processing == (64, 64) and len(reads) == 1
    restorer.restore(gradient_image(64, 48), FAST, plan=plan)
    assert len(reads) == 1  # the plan is used as it is
    restorer.restore(gradient_image(64, 48), FAST)
    assert len(reads) == 2  # without a plan: planned once, here


def test_plan_refuses_what_cannot_work_before_any_work(restorer):
    restorer.max_processing_pixels = 100
    with pytest.raises(ImageError, match="above the limit of 100 pixels"):
        restorer.plan(gradient_image(64, 48), FAST)


def test_restore_many_equals_single_restores(restorer):
    requests = [Request(gradient_image(64, 48), FAST.with_overrides(seed=s)) for s in (1, 2)]
    many = restorer.restore_many(requests)
    for request, got in zip(requests, many):
        want = restorer.restore(request.image, request.config)
        np.testing.assert_array_equal(np.asarray(got.image), np.asarray(want.image))
        assert got.metadata["settings"]["seed"] == request.config.seed


def test_prompt_warnings_and_caption_without_captioner(restorer):
    assert restorer.prompt_warnings("a cat.", "sharp.", "blurry") == (None, None)
    long_quality = " ".join(["highly detailed photograph"] * 40)  # far beyond CLIP's 77 tokens
    positive, negative = restorer.prompt_warnings("a cat.", long_quality, long_quality)
    assert positive and negative
    assert restorer.caption(gradient_image(64, 48)) == ""
