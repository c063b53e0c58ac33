"""Tiled VAE (supir_rt.tiling.vae): exact mode equals the untiled reference VAE within float rounding,
official mode follows the documented official tile split, and memory stays bounded by the tile."""

from __future__ import annotations

import pytest
import torch

from supir_rt.tiling import vae as vt

# Exact mode's stated tolerance (docs/tiling.md): relative L2 distance to the untiled VAE below 1e-5.
# What is left is float32 rounding (convolutions on tiles, pooled statistics summed in another order).
EXACT_REL_L2 = 1e-5
# The official tiled VAE on the tiny model at this size (measured: 0.08-0.10 on the encoder moments).
OFFICIAL_MIN_REL_L2 = 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def vae(tiny_model):
    return tiny_model.first_stage_model


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 192, 320, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_exact_encoder_matches_untiled_official_does_not(vae, image):
    with torch.inference_mode():
        ref = vae.encoder(image)
        exact = vt.tiled_encode(vae.encoder, image, tile_px=128)
        official = vt.tiled_encode(vae.encoder, image, tile_px=128, mode="official")
    assert exact.shape == ref.shape == official.shape
    assert _rel(exact, ref) < EXACT_REL_L2
    assert _rel(official, ref) > OFFICIAL_MIN_REL_L2  # per-tile attention and averaged variances


def test_exact_decoder_matches_untiled(vae):
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = vae.decoder(z)
        exact = vt.tiled_decode(vae.decoder, z, tile_px=128)
        kept = vt.tiled_decode(vae.decoder, z, tile_px=128, keep=3)  # 2 x 3 tiles, 3 kept between passes
        official = vt.tiled_decode(vae.decoder, z, tile_px=128, mode="official")
    assert _rel(exact, ref) < EXACT_REL_L2
    assert torch.equal(kept, exact)  # keeping activations changes time and memory, not the result
    assert _rel(official, ref) > OFFICIAL_MIN_REL_L2


def test_halo_below_the_receptive_field_is_visibly_wrong(vae, image, monkeypatch):
    # The halo is what makes exact mode exact: one conv's worth too small and tile seams appear.
    monkeypatch.setattr(vt, "encoder_halo", lambda enc: 8)
    with torch.inference_mode():
        assert _rel(vt.tiled_encode(vae.encoder, image, tile_px=128), vae.encoder(image)) > 100 * EXACT_REL_L2


def test_pooled_variance_is_the_variance_of_the_union():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 64, 3, 5, generator=g) + i for i in range(3)]  # different means per part
    pooled = vt._Pooled()
    for p in parts:
        pooled.add(p, 32)
    mean, var = pooled.result(torch.float64)
    whole = torch.cat([p.reshape(2, 32, -1) for p in parts], dim=-1).double()
    torch.testing.assert_close(mean, whole.mean(-1))
    torch.testing.assert_close(var, whole.var(-1, unbiased=False))


def test_official_split_follows_the_documented_rule():
    # side 700 px, tile 256, pad 32: n = ceil(636/256) = 3, real = ceil(636/3) = 212 -> 224 (multiple of
    # 32, <= 256); cores 32..256, 256..480, 480..700; output boxes snap to 0 / 700 at the borders.
    tiles = vt.official_tiles(700, 300, 256, 32)
    rows = sorted({(t.core[0], t.core[1], t.box[0], t.box[1]) for t in tiles})
    assert rows == [(0, 256, 0, 288), (256, 480, 224, 512), (480, 700, 448, 700)]
    # 300 px: n = ceil(236/256) = 1 -> one column covering everything
    assert sorted({(t.core[2], t.core[3], t.box[2], t.box[3]) for t in tiles}) == [(0, 300, 0, 300)]
    assert vt._best_tile_size(212, 256) == 224 and vt._best_tile_size(250, 251) == 250


def test_halos_cover_the_receptive_field(vae):
    # encoder: conv_in 1 + per level (2 convs per resblock x 2 resblocks + 2 for the downsample) at
    # scales 1, 2, 4 -> 1 + 6 + 12 + 24 = 43 px -> 48 (multiple of 8)
    assert vt.encoder_halo(vae.encoder) == 48
    # decoder, in latent px: levels at zoom 2, 4, 8 with 3 resblocks (6 convs) and upsample convs:
    # 1/2 + 6/2 + 1/4 + 6/4 + 1/8 + 6/8 + 1/8 (conv_out) = 6.25 -> 7
    assert vt.decoder_halo(vae.decoder) == 7


def _largest_full_res_activation(vae, run) -> int:
    """Largest tensor produced by a module of the two full-resolution levels (where untiled memory
    grows with the image); the latent-resolution part is run whole by design."""
    largest = [0]
    hooks = []
    levels = [vae.encoder.down[0], vae.encoder.down[1], vae.decoder.up[0], vae.decoder.up[1]]
    for level in levels:
        for module in level.modules():
            hooks.append(module.register_forward_hook(
                lambda m, i, o: largest.__setitem__(0, max(largest[0], o.numel()))))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return largest[0]


@pytest.mark.parametrize("mode", ["exact"])
def test_memory_is_bounded_by_the_tile_not_the_image(vae, mode):
    tile = 64
    sizes = [(192, 192), (192, 320)]  # 3x3 and 3x5 tiles; both have interior tiles with a full halo
    tiled, untiled = [], []
    for h, w in sizes:
        x = torch.zeros(1, 3, h, w)
        z = torch.zeros(1, 4, h // 8, w // 8)
        tiled.append(_largest_full_res_activation(vae, lambda: (vt.tiled_encode(vae.encoder, x, tile_px=tile, mode=mode),
                                                                 vt.tiled_decode(vae.decoder, z, tile_px=tile, mode=mode))))
        untiled.append(_largest_full_res_activation(vae, lambda: (vae.encoder(x), vae.decoder(z))))
    assert 3 * untiled[1] == 5 * untiled[0]  # untiled grows with the image
    assert tiled[1] == tiled[0]  # tiled: the largest activation is one tile with its halo, at both sizes
    # decoder tile: (128 px + 2 x 7 latent px halo)^2 at 2·ch channels after the level-1 upsample
    assert tiled[0] <= 2 * vae.encoder.conv_in.out_channels * (tile + 2 * 8 * vt.decoder_halo(vae.decoder)) ** 2


def test_bad_tile_size_is_named():
    with pytest.raises(ValueError, match="vae_tile_size=100"):
        vt.check_vae_tile(100)
