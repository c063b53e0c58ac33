"""The VAE's encoder and decoder as *walks*: generators that run the reference modules and yield at each
GroupNorm, so that one description of the forward serves every tiled schedule of `supir_rt.tiling.vae`
(the caller answers each yield with the normalised activation). Also the receptive-field halos of the
tiled parts. Mirrors `supir_rt.model.vae` and must follow it.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import nn

from supir_rt.model import blocks
from supir_rt.model.vae import AttnBlock, Decoder, Encoder, ResnetBlock

ALIGN_PX = 8  # encoder tiles start on multiples of 8 px so that the three stride-2 downsamples line up

# A norm request yielded by the network walk: (the GroupNorm module, activation, zoom), answered with
# the normalised activation. ``zoom`` = activation px per px of the tiled part's input.
_Request = tuple[nn.GroupNorm, torch.Tensor, float]
_Walk = Generator[_Request, torch.Tensor, torch.Tensor]


def _norm(gn: nn.GroupNorm, h: torch.Tensor, zoom: float) -> _Walk:
    return (yield gn, h, zoom)


def _resblock(block: ResnetBlock, x: torch.Tensor, zoom: float) -> _Walk:
    # the normalised tensors are fresh (`_apply_norm`), so SiLU may overwrite them
    h = block.conv1(F.silu((yield from _norm(block.norm1, x, zoom)), inplace=True))
    h = block.conv2(F.silu((yield from _norm(block.norm2, h, zoom)), inplace=True))
    return (block.nin_shortcut(x) if hasattr(block, "nin_shortcut") else x) + h


def _attn(attn: AttnBlock, x: torch.Tensor, zoom: float) -> _Walk:
    b, c, h, w = x.shape
    n = yield from _norm(attn.norm, x, zoom)
    # contiguous (B, HW, C): PyTorch's CPU flash kernel needs it; a transposed view falls back to the
    # math kernel, which stores the HW x HW score matrix (17 GB at a 256x256 latent)
    q, k, v = (conv(n).reshape(b, c, h * w).transpose(1, 2).contiguous() for conv in (attn.q, attn.k, attn.v))
    out = blocks.attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
    return x + attn.proj_out(out)


def _mid(mid: nn.Module, h: torch.Tensor, zoom: float) -> _Walk:
    h = yield from _resblock(mid.block_1, h, zoom)
    h = yield from _attn(mid.attn_1, h, zoom)
    return (yield from _resblock(mid.block_2, h, zoom))


def encoder_walk(enc: Encoder, x: torch.Tensor, *, whole: bool) -> _Walk:
    """The encoder on an image tile. ``whole=False`` stops before the last level (the input of the
    latent-resolution part, see `encoder_tail`); ``whole=True`` runs everything (official mode)."""
    h, zoom = enc.conv_in(x), 1.0
    last = len(enc.down) - 1
    for level, stage in enumerate(enc.down):
        if level == last and not whole:
            return h
        for block in stage.block:
            h = yield from _resblock(block, h, zoom)
        if hasattr(stage, "downsample"):
            h, zoom = stage.downsample(h), zoom / 2
    h = yield from _mid(enc.mid, h, zoom)
    h = yield from _norm(enc.norm_out, h, zoom)
    return enc.conv_out(F.silu(h, inplace=True))


def _plain(walk: _Walk) -> torch.Tensor:
    """Run a walk untiled: every norm is the GroupNorm module itself."""
    try:
        gn, h, _ = next(walk)
        while True:
            gn, h, _ = walk.send(gn(h))
    except StopIteration as done:
        return done.value


def encoder_tail(enc: Encoder, h: torch.Tensor) -> torch.Tensor:
    """The encoder's latent-resolution part on the whole latent (the reference resblocks; the mid
    block through `_mid`, whose attention takes the memory-efficient kernel)."""
    for block in enc.down[-1].block:
        h = block(h)
    h = _plain(_mid(enc.mid, h, 1.0))
    return enc.conv_out(F.silu(enc.norm_out(h)))


def decoder_head(dec: Decoder, z: torch.Tensor) -> torch.Tensor:
    """The decoder's latent-resolution part on the whole latent: conv_in, mid, lowest level's blocks."""
    h = _plain(_mid(dec.mid, dec.conv_in(z), 1.0))
    for block in dec.up[-1].block:
        h = block(h)
    return h


def decoder_walk(dec: Decoder, z: torch.Tensor, *, whole: bool) -> _Walk:
    """The decoder on a latent tile: from the lowest level's upsample on (``whole=False``, input from
    `decoder_head`), or everything from ``conv_in`` (``whole=True``, official mode)."""
    zoom = 1.0
    if whole:
        h = dec.conv_in(z)
        h = yield from _mid(dec.mid, h, zoom)
    else:
        h = z
    lowest = len(dec.up) - 1
    for level in reversed(range(len(dec.up))):
        stage = dec.up[level]
        if whole or level != lowest:
            for block in stage.block:
                h = yield from _resblock(block, h, zoom)
        if hasattr(stage, "upsample"):
            h, zoom = stage.upsample(h), zoom * 2
    h = yield from _norm(dec.norm_out, h, zoom)
    return dec.conv_out(F.silu(h, inplace=True))


def encoder_halo(enc: Encoder) -> int:
    """Receptive-field radius (image px) of `encoder_walk(whole=False)`, rounded up to `ALIGN_PX`.

    conv_in: 1 px; per level ℓ below the last (scale 2^ℓ): 2 convs per resblock reach 1 px each, and
    the downsample (pad right/bottom, stride-2 3x3) reaches 2 px to the right/bottom.
    """
    levels = len(enc.down) - 1
    blocks_per_level = len(enc.down[0].block)
    radius = 1 + sum((2 * blocks_per_level + 2) * 2**level for level in range(levels))
    return math.ceil(radius / ALIGN_PX) * ALIGN_PX


def decoder_halo(dec: Decoder) -> int:
    """Receptive-field radius (latent px, rounded up) of `decoder_walk(whole=False)`: each 3x3 conv
    at zoom z (after the upsamples) reaches 1/z latent px."""
    blocks_per_level = len(dec.up[0].block)
    radius, zoom = 0.0, 1.0
    for level in reversed(range(len(dec.up))):
        if level != len(dec.up) - 1:
            radius += 2 * blocks_per_level / zoom
        if hasattr(dec.up[level], "upsample"):
            zoom *= 2
            radius += 1 / zoom
    radius += 1 / zoom  # conv_out
    return math.ceil(radius)


__all__ = ["ALIGN_PX", "decoder_halo", "decoder_head", "decoder_walk", "encoder_halo", "encoder_tail", "encoder_walk"]
