"""supir_rt.tokenizer against two independent references, both built offline from the packaged BPE file:

* transformers.CLIPTokenizer constructed from a vocab.json / merges.txt that this test writes itself;
  transformers 5.x's CLIPTokenizer has no ftfy/HTML clean-up step, so it is fed the cleaned text;
* a small pure-Python BPE written here from the description of OpenAI CLIP's SimpleTokenizer
  (clean-up, split regex, byte symbols, lowest-rank-first merging, ``</w>`` on the last symbol).
"""

from __future__ import annotations

import gzip
import html
import json
import math
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from supir_rt.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_POSITIVE_PROMPT, ConditionerConfig
from supir_rt.tokenizer import BPE_PATH, EOT_ID, SOT_ID, CLIPTokenizer, load_tokenizer

SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)

LONG_CAPTION = (
    "The image shows a weathered wooden fishing boat pulled up on a pebble beach at dusk, its blue and "
    "white paint peeling in long strips. Behind it, a row of small stone cottages with slate roofs lines "
    "the harbour wall, and a few windows glow warm yellow. Gulls circle above the mast, nets are piled "
    "on the hull, and low clouds streak the orange sky over a calm, grey-green sea. In the distance, a tall "
    "lighthouse stands on the rocky point, its white tower catching the very last light as the evening "
    "tide turns."
)  # 109 tokens

TEXTS = [
    "a photo of a cat",
    "A PHOTO of a Cat!!!",
    "It's 2024: 3.14159 apples, 42 pears & 7 kiwis...",
    "he'll say we've seen they're here, I'm sure you'd know; don't",
    "Tom &amp; Jerry &lt;3 &amp;amp; friends &quot;quoted&quot;",
    "café naïve résumé Ünïcödé 日本語 emoji 🙂🎉",
    "mojibake: cafÃ© and â€œsmart quotesâ€\x9d",
    "  multiple   spaces\tand\nnew\r\nlines  ",
    "hello<|endoftext|>world",
    "",
    DEFAULT_POSITIVE_PROMPT,
    DEFAULT_NEGATIVE_PROMPT,
    LONG_CAPTION,
]


def _byte_table() -> list[tuple[int, str]]:
    """(byte, symbol) in vocabulary order: printable Latin-1 bytes as themselves, then the other 68
    bytes, in byte order, as chr(256), chr(257), ..."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(rest)]


@pytest.fixture(scope="module")
def reference_tables() -> tuple[dict[str, int], list[tuple[str, str]], dict[int, str]]:
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith('"bpe_simple_vocab_16e6.txt#version')
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = [s for _, s in _byte_table()]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408
    return vocab, merges, dict(_byte_table())


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _reference_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int],
                      byte_sym: dict[int, str]) -> list[int]:
    ids: list[int] = []
    for piece in SPLIT.findall(_clean(text).lower()):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        word = [byte_sym[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            rank, pair = min((ranks.get(p, math.inf), p) for p in zip(word, word[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[w] for w in word)
    return ids


@pytest.fixture(scope="module")
def reference(reference_tables):
    vocab, merges, byte_sym = reference_tables
    ranks = {m: r for r, m in enumerate(merges)}
    return lambda text: _reference_encode(text, vocab, ranks, byte_sym)


@pytest.fixture(scope="module")
def hf_tokenizer(reference_tables, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab, merges, _ = reference_tables
    d: Path = tmp_path_factory.mktemp("clip_bpe")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return load_tokenizer()


def test_known_ids(tok):
    assert tok(["a photo of a cat"], pad_token=0)[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("Hello, world!") == [3306, 267, 1002, 256]
    assert tok.encode("") == []
    assert tok.vocab_size == 49408


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_pure_python_bpe(tok, reference, text):
    assert tok.encode(text) == reference(text)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tokenizer, text):
    expected = hf_tokenizer(_clean(text), add_special_tokens=False).input_ids
    assert tok.encode(text) == expected


def test_clean_up_matters(tok, hf_tokenizer):
    """HTML entities and mojibake are fixed before BPE, as CLIP does (transformers 5 does not)."""
    text = "Tom &amp;amp; Jerry cafÃ©"
    assert tok.encode(text) == tok.encode("tom & jerry café")
    assert tok.encode(text) != hf_tokenizer(text, add_special_tokens=False).input_ids


def test_long_caption_truncation_keeps_eot(tok, reference, hf_tokenizer):
    assert len(reference(LONG_CAPTION)) == 109  # a LLaVA-length caption, 34 tokens too long
    ids = tok([LONG_CAPTION], pad_token=0)[0]
    assert ids.shape == (77,)
    assert ids[0] == SOT_ID and ids[76] == EOT_ID
    assert ids[1:76].tolist() == reference(LONG_CAPTION)[:75]
    hf = hf_tokenizer([_clean(LONG_CAPTION)], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.tolist() == hf[0]


@pytest.mark.parametrize("pad_token", [ConditionerConfig().clip_l_pad_token, ConditionerConfig().bigg_pad_token])
def test_batch_padding(tok, hf_tokenizer, pad_token):
    texts = [_clean(t) for t in TEXTS]
    ids = tok(TEXTS, pad_token=pad_token)  # (B, 77)
    assert ids.dtype == torch.long and ids.shape == (len(TEXTS), 77)
    hf = torch.tensor(
        hf_tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
    )  # HF pads with <|endoftext|> = 49407
    # SOT at 0, the first EOT where the sequence ends, pad_token after it
    lengths = [min(len(tok.encode(t)), 75) + 2 for t in TEXTS]
    for row, n in enumerate(lengths):
        assert ids[row, :n].tolist() == hf[row, :n].tolist()
        assert ids[row, n - 1] == EOT_ID
        assert (ids[row, n:] == pad_token).all()
    assert (ids[:, 0] == SOT_ID).all()
    if pad_token == EOT_ID:
        assert torch.equal(ids, hf)


def test_context_length_and_errors(tok):
    ids = tok(["a photo of a cat"], pad_token=0, context_length=4)
    assert ids.tolist() == [[SOT_ID, 320, 1125, EOT_ID]]
    with pytest.raises(TypeError, match="list of strings"):
        tok("a photo", pad_token=0)
    with pytest.raises(ValueError, match="pad_token"):
        tok(["a"], pad_token=49408)
    with pytest.raises(ValueError, match="context_length"):
        tok(["a"], pad_token=0, context_length=1)


def test_decode_round_trip(tok):
    assert tok.decode(tok.encode("Hello, World! café 日本")) == "hello , world ! café 日本"


def test_load_tokenizer_is_cached():
    assert load_tokenizer() is load_tokenizer()
