"""Offline CLIP tokenizer for both SDXL text encoders (CLIP-L and OpenCLIP bigG).

Reproduces the behaviour of OpenAI CLIP's `SimpleTokenizer` (as used by `open_clip.tokenize`, and
matched by Hugging Face's `CLIPTokenizer` for openai/clip-vit-large-patch14) from these facts only:

* vocabulary (49408 ids) = the 256 byte-level symbols (GPT-2 byte-to-unicode order), the same 256
  with the end-of-word suffix ``</w>``, the 48894 merges of ``bpe_simple_vocab_16e6.txt.gz``
  (lines 1..48894; line 0 is a header), then ``<|startoftext|>`` (49406), ``<|endoftext|>`` (49407);
* text clean-up before tokenizing: ``ftfy.fix_text``, HTML unescape twice, strip, whitespace collapse,
  lowercase;
* pre-tokenizer: CLIP's split regex, then byte-level symbols (no prefix space);
* a sequence is ``SOT + ids + EOT``, cut so that EOT stays at position ``context_length - 1``, then
  padded with a caller-chosen pad id (CLIP-L in SDXL pads with 49407, bigG with 0).

The BPE file ships in ``supir_rt/assets`` (MIT, OpenAI; see ``assets/LICENSE-CLIP-BPE.txt``). The
`tokenizers` library does the merging; nothing touches the network.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
from collections.abc import Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
END_OF_WORD = "</w>"

# CLIP's split pattern: special tokens, English contractions, letter runs, single digits, and runs of
# anything that is neither space, letter nor digit.
CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)

_WHITESPACE = re.compile(r"\s+")


def byte_to_symbol() -> dict[int, str]:
    """Byte value -> byte-level symbol (the GPT-2 byte-to-unicode table), in vocabulary order.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and come
    first, in byte order; the remaining 68 bytes follow in byte order, mapped to chr(256 + n).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in vocabulary order (ids 0..255)."""
    return list(byte_to_symbol().values())


def read_bpe_merges(path: str | Path = BPE_PATH) -> list[tuple[str, str]]:
    """The 48894 merges CLIP uses, in rank order (header line skipped)."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found at {path}; it ships with the supir_rt package "
            "(supir_rt/assets/bpe_simple_vocab_16e6.txt.gz)"
        ) from None
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge lines of two symbols each after the header")
    return merges  # type: ignore[return-value]


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id, 49408 entries, in CLIP's order."""
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def clean_text(text: str) -> str:
    """CLIP's clean-up: ftfy fix, HTML unescape twice, strip, collapse whitespace (lowercasing is
    done by the tokenizer's normalizer)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class CLIPTokenizer:
    """CLIP BPE tokenizer; `encode` gives bare ids, calling it gives padded [B, context_length] ids."""

    def __init__(self, bpe_path: str | Path = BPE_PATH) -> None:
        merges = read_bpe_merges(bpe_path)
        vocab = build_vocab(merges)
        bpe = models.BPE(
            vocab=vocab,
            merges=list(merges),
            end_of_word_suffix=END_OF_WORD,
            continuing_subword_prefix="",
            unk_token=EOT_TOKEN,
            fuse_unk=False,
        )
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # keep the regex matches, drop what lies between them (whitespace)
                pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # Literal "<|startoftext|>" / "<|endoftext|>" in a prompt map to their ids, as in CLIP.
        tok.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
        if tok.token_to_id(SOT_TOKEN) != SOT_ID or tok.token_to_id(EOT_TOKEN) != EOT_ID:
            raise RuntimeError("CLIP special tokens did not land on ids 49406/49407")
        self._tok = tok
        self._symbol_to_byte = {sym: b for b, sym in byte_to_symbol().items()}
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text after CLIP's clean-up, without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        return self._tok.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str], pad_token: int, context_length: int = 77) -> torch.Tensor:
        """[B] texts -> LongTensor [B, context_length]: SOT, ids, EOT, then `pad_token`.

        Too-long texts keep their first `context_length - 2` ids so that EOT sits at the last position.
        """
        if isinstance(texts, str):
            raise TypeError("CLIPTokenizer(...) expects a list of strings, got a single str")
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for SOT and EOT")
        if not 0 <= pad_token < self.vocab_size:
            raise ValueError(f"pad_token={pad_token} is outside the vocabulary [0, {self.vocab_size})")
        out = torch.full((len(texts), context_length), pad_token, dtype=torch.long)  # (B, L)
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text)[: context_length - 2], EOT_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (for debugging): special tokens dropped, each ``</w>`` read as a space."""
        tokens = [self._tok.id_to_token(int(i)) for i in ids if int(i) not in (SOT_ID, EOT_ID)]
        words = "".join(t for t in tokens if t is not None).split(END_OF_WORD)
        return " ".join(
            bytes(self._symbol_to_byte[ch] for ch in word).decode("utf-8", errors="replace") for word in words if word
        )


@functools.cache
def load_tokenizer() -> CLIPTokenizer:
    """The shared CLIP tokenizer built from the packaged BPE file (built once, ~0.1 s)."""
    return CLIPTokenizer()


__all__ = [
    "CLIPTokenizer", "load_tokenizer", "clean_text", "read_bpe_merges", "build_vocab", "byte_symbols",
    "byte_to_symbol", "BPE_PATH", "SOT_ID", "EOT_ID", "VOCAB_SIZE",
]
