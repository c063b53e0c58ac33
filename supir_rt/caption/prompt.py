"""Prompts around the captioner: LLaVA's vicuna_v1 template and tokenization, caption clean-up, and
joining a caption with SUPIR's quality prompt (with the CLIP 77-token truncation check).

Sources: SUPIR ``llava/llava_agent.py`` and ``test.py``; LLaVA's
``conv_vicuna_v1`` template and ``tokenizer_image_token``.
"""

from __future__ import annotations

from typing import Protocol

IMAGE_TOKEN = "<image>"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# SUPIR test.py's question; the Gradio demo uses a longer one.
DEFAULT_QUESTION = "Describe this image and its style in a very detailed manner."
CLIP_CONTENT_TOKENS = 75  # 77 minus start/end tokens


def vicuna_prompt(question: str = DEFAULT_QUESTION) -> str:
    """The vicuna_v1 conversation (separators " " and "</s>") with one user turn holding the image."""
    return f"{SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


class PieceTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def tokenize_with_image(prompt: str, tokenizer: PieceTokenizer, bos_id: int) -> list[list[int]]:
    """Token ids of the text around each ``<image>``, tokenized in pieces as LLaVA does.

    LLaVA's ``tokenizer_image_token`` tokenizes every chunk between ``<image>`` markers separately
    (each with a BOS), keeps the first BOS and drops the others. Returns the chunks (the first one
    starting with BOS); the image features go between consecutive chunks. Tokenizing the whole string
    at once gives different ids at the chunk boundaries.
    """
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    chunks[0] = [bos_id, *chunks[0]]
    return chunks


def clean_caption(text: str) -> str:
    """SUPIR's post-processing: strip, drop a trailing ``</s>``, newlines to spaces."""
    text = text.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")]
    return text.replace("\n", " ")


def join_prompt(caption: str, quality_prompt: str, *, quality_first: bool = False) -> str:
    """The positive prompt SUPIR encodes.

    Official: ``caption + quality_prompt`` with **no separator** ("...a red car.Cinematic, ...").
    With ``quality_first`` the quality prompt comes first (joined by a space) so that it survives the
    77-token CLIP truncation when captions are long.
    """
    if not quality_first:
        return caption + quality_prompt
    if not caption:
        return quality_prompt
    if not quality_prompt:
        return caption
    return f"{quality_prompt} {caption}"


class ClipTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def check_truncation(
    text: str,
    tokenizer: ClipTokenizer,
    *,
    quality_prompt: str | None = None,
    limit: int = CLIP_CONTENT_TOKENS,
) -> str | None:
    """A warning when CLIP's 77-token window (``limit`` content tokens) cuts ``text``, else None.

    ``tokenizer.encode`` must return ids without start/end tokens (``supir_rt.tokenizer``). When
    ``quality_prompt`` is given, only a cut that reaches it is reported (a cut inside the caption alone
    is what SUPIR always did and costs nothing extra); otherwise any cut is.
    """
    n_total = len(tokenizer.encode(text))
    if n_total <= limit:
        return None
    if quality_prompt:
        pos = text.find(quality_prompt)
        if pos >= 0:
            upto = len(tokenizer.encode(text[: pos + len(quality_prompt)]))
            if upto <= limit:
                return None
            start = len(tokenizer.encode(text[:pos])) if pos else 0
            lost = min(upto - limit, upto - start)
            return (
                f"prompt is {n_total} CLIP tokens but the text encoders keep {limit}: {lost} of the quality "
                f"prompt's {upto - start} tokens are cut off. Shorten the caption (--max-new-tokens) or put "
                "the quality prompt first (--quality-first)."
            )
    return f"prompt is {n_total} CLIP tokens but the text encoders keep {limit}; {n_total - limit} tokens are cut off."

