"""Fixtures for the captioning tests: a tiny random LLaVA (transformers), a sentencepiece tokenizer
trained here, offline, and the tiny model exported by export/export_llava.py."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # makes export/ importable

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "Describe this image and its style in a very detailed manner.",
    "USER: ASSISTANT: a red car parked on a street, photo, sunny day, high contrast.",
    "The image shows a cat sitting on a wooden table next to a window, soft light.",
]


@pytest.fixture(scope="session")
def tokenizer_bytes() -> bytes:
    """A Llama-style sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback), ~0.05 s to train."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=320, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_llava(tokenizer_bytes: bytes):
    """A tiny random LlavaForConditionalGeneration (GQA 4/2 heads, 3-layer CLIP at 56 px -> 16 features)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = 320
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=vocab + 4, max_position_embeddings=512, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=None,
        ),
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, image_size=56, patch_size=14, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, projection_dim=32,
        ),
        image_token_index=vocab,  # first id past the sentencepiece vocabulary, like llava-hf's 32000
        image_seq_length=16,
    )
    return transformers.LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, tiny_llava, tokenizer_bytes: bytes) -> Path:
    folder = tmp_path_factory.mktemp("llava-hf")
    tiny_llava.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer_bytes)
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, hf_folder: Path) -> Path:
    from export.llava.build import export_llava

    out = tmp_path_factory.mktemp("exported")
    export_llava(hf_folder, out, ["fp32", "int8", "int4"], progress=False)
    return out


@pytest.fixture()
def image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
