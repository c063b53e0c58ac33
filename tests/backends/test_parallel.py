"""CFG-parallel (`supir_rt.backends.parallel.CFGParallelEngine`) on CPU engines.

The expected value is the single engine's own batch-2B call. CFG-parallel computes it as two batch-B
calls, and the tiny network itself is not bit-for-bit batch-size invariant on CPU (oneDNN/MKL block
convolutions and GEMMs by batch): a batch-B call differs from the same rows of a batch-2B call by up to
1.4e-6 absolute at |eps| ~ 1.3 (1.1e-6 of the output's scale; measured). So the test asserts
(a) closeness to the batch-2B call at float32 tolerance (|d| <= 1e-6 + 1e-5·|eps|), and (b) bitwise
equality with the single engine's own two batch-B calls: all the difference is the network's, none the
wrapper's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from supir_rt.backends.parallel import CFGParallelEngine
from supir_rt.backends.torch_backend import TorchEngine, open_torch_engines


@pytest.fixture(scope="module")
def two_unets(tiny_model):
    """Two unet_adaptor engines over two separate copies of the same tiny weights."""
    first = open_torch_engines(model=tiny_model, networks=["unet_adaptor"])["unet_adaptor"]
    second = open_torch_engines(model=copy.deepcopy(tiny_model), networks=["unet_adaptor"])["unet_adaptor"]
    return first, second


@pytest.mark.parametrize("images", [1, 2])
def test_cfg_parallel_equals_the_batch_2b_call(two_unets, tiny_config, images):
    first, second = two_unets
    spec = first.spec
    feed = spec.sample_inputs({"B": images, "h": 8, "w": 8}, generator=torch.Generator().manual_seed(images))
    want = first.infer(feed)["eps"].clone()  # one call on the whole [uncond, cond] batch
    parallel = CFGParallelEngine(first, second, owns_engines=False)
    got = parallel.infer(feed)["eps"]
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    halves = [first.infer({k: (v[i * images:(i + 1) * images] if v.shape[0] == 2 * images else v)
                           for k, v in feed.items()}, check_inputs=False)["eps"].clone() for i in (0, 1)]
    torch.testing.assert_close(got, torch.cat(halves), rtol=0, atol=0)


def test_cfg_parallel_restore_matches_one_engine():
    """A whole tiny restore with the unet_adaptor swapped for CFG-parallel over two engines gives the
    image of the plain restore (uint8, at most 1 level off from the ~1e-7 batch-size differences)."""
    from PIL import Image

    from supir_rt import Restorer
    from supir_rt.restore_config import RestoreConfig

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")
    config = RestoreConfig(num_steps=3, seed=5, upscale=1, min_size=64)
    with Restorer.tiny_random() as r:
        want = r.restore(image, config).image
        engines = r.pipeline.engines
        single = engines["unet_adaptor"]
        other = TorchEngine(copy.deepcopy(single.module.inner), single.spec, "cpu", torch.float32)  # a second copy
        engines["unet_adaptor"] = CFGParallelEngine(single, other, owns_engines=False)
        try:
            got = r.restore(image, config).image
        finally:
            engines["unet_adaptor"] = single
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1, diff.max()


def test_cfg_parallel_refuses_an_odd_batch_and_other_networks(two_unets, tiny_model):
    first, second = two_unets
    parallel = CFGParallelEngine(first, second, owns_engines=False, validate=False)
    feed = first.spec.sample_inputs({"B": 1, "h": 8, "w": 8})
    feed = {k: (v[:1] if v.shape[0] == 2 else v) for k, v in feed.items()}
    with pytest.raises(ValueError, match="even batch"):
        parallel.infer(feed)
    decoder = open_torch_engines(model=tiny_model, networks=["vae_decoder"])["vae_decoder"]
    with pytest.raises(ValueError, match="two unet_adaptor engines"):
        CFGParallelEngine(first, decoder)
