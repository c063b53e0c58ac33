"""NoiseSource: seeded, ordered, and skipping the posterior does not shift the stream (doc §5.4)."""

from __future__ import annotations

import pytest
import torch

from supir_rt.noise import NoiseSource

SHAPE = (1, 4, 8, 8)


def _run(source: NoiseSource, skip: bool = False) -> list[torch.Tensor]:
    if skip:
        source.skip_posterior(SHAPE)
        draws = []
    else:
        draws = [source.posterior(SHAPE)]
    x = torch.zeros(SHAPE)
    return draws + [source.randn_like(x) for _ in range(3)]  # initial noise + two churn draws


def test_same_seed_same_draws() -> None:
    a, b = _run(NoiseSource(7)), _run(NoiseSource(7))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_different_seed_different_draws() -> None:
    a, b = _run(NoiseSource(7)), _run(NoiseSource(8))
    assert all(not torch.equal(x, y) for x, y in zip(a, b))


def test_skip_posterior_keeps_later_draws() -> None:
    full, skipped = _run(NoiseSource(1234)), _run(NoiseSource(1234), skip=True)
    assert len(skipped) == len(full) - 1
    for x, y in zip(full[1:], skipped):
        assert torch.equal(x, y)


def test_cpu_default_is_the_global_rng_stream_of_an_official_cpu_run() -> None:
    # seed_everything(seed) + torch.randn (posterior) + torch.randn_like (noise) on one CPU generator.
    torch.manual_seed(1234)
    post, init = torch.randn(SHAPE), torch.randn_like(torch.zeros(SHAPE))
    source = NoiseSource(1234)
    assert torch.equal(source.posterior(SHAPE), post)
    assert torch.equal(source.randn_like(torch.zeros(SHAPE)), init)


def test_randn_like_follows_dtype_and_posterior_casts() -> None:
    source = NoiseSource(0)
    assert source.posterior(SHAPE, dtype=torch.float64).dtype == torch.float64
    assert source.randn_like(torch.zeros(SHAPE, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.requires_cuda  # the CUDA noise stream needs a CUDA device
def test_cuda_noise_stream_matches_a_seeded_cuda_generator() -> None:
    source = NoiseSource(1234, device="cuda")
    post = source.posterior(SHAPE, device="cuda")
    init = source.randn_like(torch.zeros(SHAPE, device="cuda"))
    assert torch.equal(post.cpu(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)))
    expected = torch.randn(SHAPE, generator=torch.Generator("cuda").manual_seed(1234), device="cuda")
    assert init.device.type == "cuda" and torch.equal(init, expected)
