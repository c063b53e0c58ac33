"""Per-tile captions (`RestoreConfig.tile_captions`, ``--tile-captions``) on the tiny random model.

A deterministic fake captioner names the mean colour of what it is shown, so the tiles of a four-colour
image get different captions. A recording wrapper around the ``unet_adaptor`` engine keeps the
``context`` / ``vector`` of every UNet call; each tile's must be the text encoder's output for that
tile's own prompt (caption + quality prompt), computed here by a direct ``text_encoders`` call on the
tokenised prompt, with the negative prompt's in the unconditional half.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from supir_rt.caption import join_prompt
from supir_rt.restore_config import RestoreConfig
from supir_rt.tiling.windows import sliding_windows

SIZE = 256  # px: latent 32×32; 128 px tiles at stride 64 -> 3×3 = 9 tiles
TILES = 9
TILED = dict(tiling="on", vae_tiling="none", tile_size=128, tile_stride=64)


def settings(sampler: str = "edm", **extra) -> RestoreConfig:
    more = dict(restore_cfg=2.0) if sampler == "edm" else {}
    return RestoreConfig(num_steps=1, min_size=SIZE, seed=3, sampler=sampler, **more, **TILED, **extra)


def quadrants() -> Image.Image:
    """Four flat colours with a little texture: tiles inside a quadrant and across borders differ."""
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    h = SIZE // 2
    arr[:h, :h], arr[:h, h:], arr[h:, :h], arr[h:, h:] = (200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)
    noise = np.random.default_rng(0).integers(0, 20, arr.shape)
    return Image.fromarray(np.clip(arr.astype(int) + noise, 0, 255).astype(np.uint8), "RGB")


class ColourCaptioner:
    """Caption = the image's mean colour in words (coarse, so it is stable); records what it was shown.
    ``blank``: mean-colour captions for which it returns "" instead."""

    needs_image = True

    def __init__(self, constant: str | None = None, blank: frozenset[int] = frozenset()) -> None:
        self.constant, self.blank = constant, blank
        self.shown: list[Image.Image] = []
        self.batches: list[int] = []

    def describe(self, image: Image.Image) -> str:
        r, g, b = (int(v) // 8 for v in np.asarray(image, np.float64).mean((0, 1)))
        return f"a patch of red {r} green {g} blue {b}"

    def caption(self, image: Image.Image, source=None) -> str:
        self.shown.append(image)
        if self.constant is not None:
            return self.constant
        text = self.describe(image)
        return "" if len(self.shown) - 1 in self.blank else text

    def caption_many(self, images: list[Image.Image]) -> list[str]:
        self.batches.append(len(images))
        return [self.caption(image) for image in images]


class Recording:
    """Wraps a ``unet_adaptor`` engine's ``infer``: keeps (context, vector) of every call."""

    def __init__(self, engine) -> None:
        self.engine, self.infer = engine, engine.infer
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, feed, **kw):
        self.calls.append((feed["context"].clone(), feed["vector"].clone()))
        return self.infer(feed, **kw)


@pytest.fixture(scope="module")
def restorer():
    from supir_rt import Restorer

    with Restorer.tiny_random() as r:
        yield r


def encode(restorer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's (crossattn, vector[:text part]) for ``prompt``: the engine called directly."""
    cc = restorer.pipeline.model_config.conditioner_config
    tok = restorer.pipeline.tokenizer
    out = restorer.engines["text_encoders"].infer(dict(
        clip_l_ids=tok([prompt], pad_token=cc.clip_l_pad_token, context_length=cc.clip_l.context_length),
        bigg_ids=tok([prompt], pad_token=cc.bigg_pad_token, context_length=cc.bigg.context_length)))
    return out["crossattn"][0].clone(), out["pooled"][0].clone()


def restore(restorer, captioner, config, monkeypatch):
    engine = restorer.engines["unet_adaptor"]
    rec = Recording(engine)
    monkeypatch.setattr(engine, "infer", rec)
    monkeypatch.setattr(restorer, "captioner", captioner)
    restored = restorer.restore(quadrants(), config)
    monkeypatch.undo()
    return restored, rec


def per_tile_text(rec: Recording, config: RestoreConfig) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per tile, per call: (uncond context, cond context, uncond vector, cond vector), from the batches
    [uncond × n, cond × n] of ``tile_batch`` tiles the engine saw."""
    tiles: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(TILES)]
    batches = [list(range(i, min(i + config.tile_batch, TILES))) for i in range(0, TILES, config.tile_batch)]
    assert len(rec.calls) % len(batches) == 0
    for j, (context, vector) in enumerate(rec.calls):
        batch = batches[j % len(batches)]
        n = len(batch)
        for i, k in enumerate(batch):
            tiles[k].append((context[i], context[n + i], vector[i], vector[n + i]))
    return tiles


@pytest.mark.parametrize("sampler, tile_batch", [("edm", 1), ("dpmpp2m-sde", 2), ("edm", 4)])
def test_each_tile_is_conditioned_on_its_own_caption(restorer, monkeypatch, sampler, tile_batch):
    config = settings(sampler, tile_batch=tile_batch, tile_captions=True)
    captioner = ColourCaptioner()
    restored, rec = restore(restorer, captioner, config, monkeypatch)
    stage1 = np.asarray(restorer.stage1_image(quadrants(), config))
    # the global caption first (`caption`), then the tiles in window order, in batches of up to 8
    tile_images = captioner.shown[1:]
    assert len(tile_images) == TILES and captioner.batches == [8, 1]
    windows = [tuple(8 * v for v in w) for w in sliding_windows(SIZE // 8, SIZE // 8, (16, 16), 8)]
    meta = restored.metadata["tile_captions"]
    assert [m["box"] for m in meta] == [[left, top, right, bottom] for top, bottom, left, right in windows]
    negative, negative_pooled = encode(restorer, config.n_prompt)
    captions = []
    for k, ((top, bottom, left, right), shown) in enumerate(zip(windows, tile_images)):
        assert np.array_equal(np.asarray(shown), stage1[top:bottom, left:right])  # tile k's region, stage 1
        captions.append(captioner.describe(shown))
        assert meta[k]["caption"] == captions[k]
    assert len(set(captions)) >= 4  # the test can tell tiles apart
    texts = per_tile_text(rec, config)
    for k, calls in enumerate(texts):
        want, pooled = encode(restorer, join_prompt(captions[k], config.a_prompt))
        assert len(calls) == config.num_steps
        for u_ctx, c_ctx, u_vec, c_vec in calls:  # vector = [pooled text, size conditioning]
            assert torch.equal(c_ctx, want) and torch.equal(c_vec[:pooled.numel()], pooled), k
            assert torch.equal(u_ctx, negative) and torch.equal(u_vec[:pooled.numel()], negative_pooled), k


@pytest.mark.parametrize("sampler", ["edm", "dpmpp2m-sde"])
def test_equal_tile_captions_give_todays_tiled_output(restorer, monkeypatch, sampler):
    """Every tile captioned like the whole image: bit for bit the tiled restore without tile captions."""
    with_tiles, _ = restore(restorer, ColourCaptioner(constant="a photo of a wall"),
                            settings(sampler, tile_batch=2, tile_captions=True), monkeypatch)
    today, _ = restore(restorer, ColourCaptioner(constant="a photo of a wall"), settings(sampler, tile_batch=2),
                       monkeypatch)
    assert today.metadata["tile_captions"] is None
    assert [m["caption"] for m in with_tiles.metadata["tile_captions"]] == ["a photo of a wall"] * TILES
    assert np.array_equal(np.asarray(with_tiles.image), np.asarray(today.image))
    different, _ = restore(restorer, ColourCaptioner(), settings(sampler, tile_batch=2, tile_captions=True),
                           monkeypatch)
    assert not np.array_equal(np.asarray(different.image), np.asarray(today.image))  # captions do matter


def test_empty_tile_caption_falls_back_to_the_global_caption(restorer, monkeypatch):
    config = settings(tile_captions=True)
    captioner = ColourCaptioner(blank=frozenset({1, 5}))  # call 0 is the global caption: tiles 0 and 4
    restored, rec = restore(restorer, captioner, config, monkeypatch)
    captions = [m["caption"] for m in restored.metadata["tile_captions"]]
    assert captions[0] == captions[4] == "" and all(captions[k] for k in (1, 2, 3, 5, 6, 7, 8))
    global_prompt = join_prompt(restored.result.caption, config.a_prompt)
    assert restored.result.caption and restored.metadata["prompt"] == global_prompt
    texts = per_tile_text(rec, config)
    want = encode(restorer, global_prompt)[0]
    for k in (0, 4):
        assert all(torch.equal(c_ctx, want) for _, c_ctx, _, _ in texts[k])
    assert not torch.equal(texts[1][0][1], want)


def test_long_tile_caption_warns_and_restores(restorer, monkeypatch, caplog):
    long = " ".join(["a very detailed description of many things"] * 20)
    with caplog.at_level(logging.WARNING):
        restored, _ = restore(restorer, ColourCaptioner(constant=long), settings(tile_captions=True), monkeypatch)
    assert restored.metadata["tile_captions"][0]["caption"] == long
    assert any("tile 0" in r.getMessage() and "cut off" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_no_op_untiled_or_without_pixels(restorer, monkeypatch, caplog):
    """Untiled, or with a captioner that does not look at the image: a log note and today's output."""
    from supir_rt.caption import TextCaptioner

    untiled = dict(tiling="off")
    base = RestoreConfig(num_steps=1, min_size=SIZE, seed=3, **untiled)
    with caplog.at_level(logging.INFO):
        on, _ = restore(restorer, ColourCaptioner(), base.with_overrides(tile_captions=True), monkeypatch)
    off, _ = restore(restorer, ColourCaptioner(), base, monkeypatch)
    assert on.metadata["tile_captions"] is None and np.array_equal(np.asarray(on.image), np.asarray(off.image))
    assert any("not tiled" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        text, _ = restore(restorer, TextCaptioner("a wall"), settings(tile_captions=True), monkeypatch)
    assert text.metadata["tile_captions"] is None
    assert any("does not look at the image" in r.getMessage() for r in caplog.records)


def test_cli_flag(restorer, monkeypatch, tmp_path):
    """``supir-rt restore --tile-captions`` with the tiling flags: the metadata holds every tile's caption
    and the image is the API's."""
    from supir_rt.cli import main
    from supir_rt.images import read_metadata

    class Shared:  # the module's restorer (with the fake captioner set below), not closed by the command
        def __getattr__(self, name):
            return getattr(restorer, name)

        def close(self) -> None:
            pass

    src, out = tmp_path / "in.png", tmp_path / "out.png"
    quadrants().save(src)
    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", lambda args, file_cfg: Shared())
    monkeypatch.setattr(restorer, "captioner", ColourCaptioner())
    flags = ["--steps", "1", "--min-size", str(SIZE), "--seed", "3", "--restore-cfg", "2", "--tiling", "on",
             "--tile-size", "128", "--tile-stride", "64", "--vae-tiling", "none", "--tile-batch", "3",
             "--tile-captions"]
    assert main(["restore", str(src), "-o", str(out), "-q", *flags]) == 0
    meta = read_metadata(out)
    assert meta["settings"]["tile_captions"] is True and len(meta["tile_captions"]) == TILES
    monkeypatch.undo()
    api, _ = restore(restorer, ColourCaptioner(), settings(tile_batch=3, tile_captions=True), monkeypatch)
    assert meta["tile_captions"] == api.metadata["tile_captions"]
    with Image.open(out) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(api.image))


def test_tiny_hf_captioner(restorer, monkeypatch, tmp_path):
    """The tiny transformers captioner of tests/caption captions the tiles, batched."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "caption"))
    import tiny_vlm

    from supir_rt.caption.hf import HfCaptioner

    captioner = HfCaptioner(tiny_vlm.build_llava(tmp_path / "llava"), device="cpu", max_new_tokens=4)
    seen: list[int] = []
    many = captioner.caption_many
    monkeypatch.setattr(captioner, "caption_many", lambda images: seen.append(len(images)) or many(images))
    restored, _ = restore(restorer, captioner, settings(tile_captions=True), monkeypatch)
    assert seen == [1, 8, 1]  # the global caption (`caption` calls `caption_many`), then the tiles
    assert len(restored.metadata["tile_captions"]) == TILES
