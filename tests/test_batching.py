"""Batched restores (`Restorer.restore_many`: one unet_adaptor call per step for several requests) against
single restores, and the grouping of `supir_rt.batching`.

Equality is to the uint8 output of the single run, up to the rounding a batched convolution may add on CPU:
at most 1 grey level on at most 0.1 % of the values (a wrong noise stream or conditioning changes most
pixels by far more).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from PIL import Image

from supir_rt.api import Request as BatchItem
from supir_rt.batching import batch_key, group_by_key
from supir_rt.restore_config import RestoreConfig

FAST = dict(num_steps=3, min_size=128)


def assert_same_image(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def restorer():
    from supir_rt import Restorer

    with Restorer.tiny_random() as r:
        yield r


@contextlib.contextmanager
def unet_batch_sizes(restorer):
    """The batch size of every `unet_adaptor` call made inside the block, in order."""
    calls: list[int] = []
    unet = restorer.engines["unet_adaptor"]
    original = unet.infer
    unet.infer = lambda feed, **kw: calls.append(feed["x_in"].shape[0]) or original(feed, **kw)
    try:
        yield calls
    finally:
        unet.infer = original


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_batched_outputs_equal_single_restores(restorer):
    """Each request keeps its own seed, prompt, colour fix and output size: equal to its single run."""
    items = [
        BatchItem(_image(0), RestoreConfig(seed=11, **FAST)),
        BatchItem(_image(1), RestoreConfig(seed=22, a_prompt="sharp", color_fix_type="adain", **FAST)),
        BatchItem(_image(2), RestoreConfig(seed=11, n_prompt="blurry", **FAST), caption="a cat"),
    ]
    with unet_batch_sizes(restorer) as calls:
        batched = [r.result for r in restorer.restore_many(items)]
    assert calls == [6] * FAST["num_steps"]  # one call per step, CFG pairs of 3 requests
    for item, got in zip(items, batched):
        want = restorer.restore(item.image, item.config, caption=item.caption)
        assert_same_image(got.image, np.asarray(want.image))
        assert got.seed == item.config.seed and got.prompt == want.result.prompt
    # different seeds give different images (the noise streams really are per request)
    assert not np.array_equal(batched[0].image, batched[1].image)


def test_restoration_guidance_batches(restorer):
    cfg = dict(FAST, restore_cfg=4.0)
    items = [BatchItem(_image(3), RestoreConfig(seed=5, **cfg)), BatchItem(_image(4), RestoreConfig(seed=6, **cfg))]
    for item, got in zip(items, [r.result for r in restorer.restore_many(items)]):
        assert_same_image(got.image, np.asarray(restorer.restore(item.image, item.config).image))


def test_batch_key_and_grouping():
    a = RestoreConfig(seed=1, **FAST)
    assert batch_key((48, 40), a) == batch_key((48, 40), dataclasses.replace(a, seed=9, a_prompt="x"))
    assert batch_key((48, 40), a) != batch_key((48, 40), dataclasses.replace(a, cfg_scale=5.0))
    assert batch_key((48, 40), a) != batch_key((96, 40), a)  # another processing size
    items = [BatchItem(_image(0), a), BatchItem(_image(0), dataclasses.replace(a, num_steps=2)),
             BatchItem(_image(0), a), BatchItem(_image(0), a)]
    assert group_by_key(items, max_batch=2) == [[0, 2], [1], [3]]
    with pytest.raises(ValueError, match="batch_key"):
        restorer_free_check([items[0], items[1]])


def restorer_free_check(items):
    from supir_rt.pipeline import check_batch

    return check_batch(items)


def test_a_setting_added_later_is_shared_by_default():
    """A field added to RestoreConfig later is in the batch key: requests that differ in it never share a loop."""
    Extended = dataclasses.make_dataclass(
        "Extended", [("future_setting", str, dataclasses.field(default="plain"))], bases=(RestoreConfig,), frozen=True)
    assert batch_key((48, 40), Extended(**FAST)) != batch_key((48, 40), Extended(future_setting="other", **FAST))


def test_the_few_step_sampler_batches(restorer):
    """The batch runs the same composition as a single restore, so a DPM++ batch equals its single runs."""
    cfg = dict(FAST, sampler="dpmpp2m-sde")
    items = [BatchItem(_image(5), RestoreConfig(seed=1, **cfg)), BatchItem(_image(6), RestoreConfig(seed=2, **cfg))]
    with unet_batch_sizes(restorer) as calls:
        got = restorer.restore_many(items)
    assert calls == [4] * FAST["num_steps"]
    for item, restored in zip(items, got):
        assert_same_image(np.asarray(restored.image), np.asarray(restorer.restore(item.image, item.config).image))


def test_sizes_the_memory_policy_tiles_run_alone(restorer, monkeypatch):
    """`tiling=auto` tiles when the untiled estimate exceeds the device's memory; the shared loop is untiled,
    so such a group runs request by request through the tiled path (never one untiled batch)."""
    import supir_rt.tiling.policy as memory

    # a device of 8 GiB on which the untiled VAE would need 9 GiB: the policy tiles the VAE
    monkeypatch.setattr(memory, "available_memory", lambda device: 8 * memory.GiB)
    monkeypatch.setattr(memory, "vae_bytes", lambda *args, **kwargs: 9 * memory.GiB)
    items = [BatchItem(_image(0), RestoreConfig(seed=11, **FAST)), BatchItem(_image(1), RestoreConfig(seed=22, **FAST))]
    assert batch_key(items[0].image.size, items[0].config) == batch_key(items[1].image.size, items[1].config)
    with unet_batch_sizes(restorer) as calls:
        got = [r.result for r in restorer.restore_many(items)]
    assert calls == [2] * (2 * FAST["num_steps"])  # one request (one CFG pair) per call
    assert all(r.tiling["vae_tiled"] and not r.tiling["sampler_tiled"] for r in got)


def test_a_batch_converts_the_conditioning_once():
    """The batch runs under no_grad like a single restore (not inference_mode, which hides the version
    counters the torch engine recognises unchanged inputs by): in bf16 the UNet's constant conditioning is
    converted once per batch, only x_in and the control scale every step. Checked by hand to fail with
    `torch.inference_mode()` around the batch (every input converted every step)."""
    from supir_rt import Restorer

    with Restorer.tiny_random(dtype="bf16") as r:
        unet = r.engines["unet_adaptor"]
        items = [BatchItem(_image(7), RestoreConfig(seed=1, **FAST)), BatchItem(_image(8), RestoreConfig(seed=2, **FAST))]
        r.restore_many(items)
    assert unet.conversions["x_in"] == FAST["num_steps"]
    assert unet.conversions["context"] == unet.conversions["vector"] == unet.conversions["lq_latent"] == 1
