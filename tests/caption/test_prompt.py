"""Prompt template, piecewise tokenization, caption clean-up, quality-prompt joining and truncation."""

from __future__ import annotations

import numpy as np
import pytest

from supir_rt.caption import check_truncation, join_prompt
from supir_rt.caption.preprocess import preprocess_image
from supir_rt.caption.prompt import IMAGE_TOKEN, clean_caption, tokenize_with_image, vicuna_prompt

QUALITY = "Cinematic, High Contrast, highly detailed."


def test_vicuna_v1_prompt() -> None:
    assert vicuna_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nDescribe this image and its style "
        "in a very detailed manner. ASSISTANT:"
    )


def test_tokenized_in_pieces_around_image(tokenizer_bytes: bytes) -> None:
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    prompt = vicuna_prompt()
    chunks = tokenize_with_image(prompt, sp, sp.bos_id())
    head, tail = prompt.split(IMAGE_TOKEN)
    assert chunks == [[sp.bos_id(), *sp.encode(head)], sp.encode(tail)]
    # the chunk after <image> is tokenized on its own (leading "▁" piece), unlike the whole string
    assert sp.id_to_piece(chunks[1][0]).startswith("▁")


def test_clean_caption() -> None:
    assert clean_caption("  A red car\non a street.</s>\n") == "A red car on a street."
    assert clean_caption("line one\nline two") == "line one line two"


def test_join_prompt_official_and_quality_first() -> None:
    assert join_prompt("A red car.", QUALITY) == "A red car." + QUALITY  # no separator (§4.5)
    assert join_prompt("A red car.", QUALITY, quality_first=True) == QUALITY + " A red car."
    assert join_prompt("", QUALITY, quality_first=True) == QUALITY
    assert join_prompt("", QUALITY) == QUALITY


class WordTokenizer:
    """Fake CLIP tokenizer: one id per whitespace-separated word."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def test_check_truncation_reports_a_cut_quality_prompt() -> None:
    tok = WordTokenizer()
    short = "word " * 10
    long_caption = "word " * 80
    assert check_truncation(join_prompt(short, QUALITY), tok, quality_prompt=QUALITY) is None
    msg = check_truncation(join_prompt(long_caption, QUALITY), tok, quality_prompt=QUALITY)
    assert msg is not None and "quality prompt" in msg and "--quality-first" in msg
    # quality first: the quality prompt survives, only the caption is cut -> nothing to report
    assert check_truncation(join_prompt(long_caption, QUALITY, quality_first=True), tok, quality_prompt=QUALITY) is None
    # without a quality prompt any cut is reported
    assert "cut off" in check_truncation(long_caption, tok)


def test_check_truncation_with_the_clip_tokenizer() -> None:
    tokenizer = pytest.importorskip("supir_rt.tokenizer")
    from supir_rt.config import DEFAULT_POSITIVE_PROMPT

    tok = tokenizer.load_tokenizer()
    caption = "The image shows a red vintage car parked on a cobblestone street in front of old houses. " * 3
    assert check_truncation(join_prompt("A red car.", DEFAULT_POSITIVE_PROMPT), tok, quality_prompt=DEFAULT_POSITIVE_PROMPT) is None
    assert check_truncation(join_prompt(caption, DEFAULT_POSITIVE_PROMPT), tok, quality_prompt=DEFAULT_POSITIVE_PROMPT)


@pytest.mark.parametrize("size", [(512, 768), (700, 401), (336, 336), (1000, 999)])
def test_preprocess_equals_clip_image_processor(size: tuple[int, int]) -> None:
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = processor.preprocess(img, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(preprocess_image(img), expected)
