"""Captioners: where SUPIR's positive prompt comes from.

``make_captioner(kind, ...)`` returns one of:

* ``none``: no caption (SUPIR's ``--no_llava``; the prompt is just the quality prompt);
* ``text``: the same given caption for every image;
* ``sidecar``: the contents of ``<image>.txt`` beside each image (``IMAGE.png`` -> ``IMAGE.txt``);
* ``llava``: LLaVA-1.5 over ONNX Runtime from an exported folder (``llava.py``; heavy imports are lazy);
* ``hf``: any local transformers image-text-to-text folder (SmolVLM, Qwen2-VL, llava-hf, ...; ``hf.py``).

The pipeline captions the stage-1 image and joins caption and quality prompt with
``join_prompt``; ``check_truncation`` reports when CLIP's 77-token window cuts the quality prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from supir_rt.caption.prompt import check_truncation, clean_caption, join_prompt
from supir_rt.errors import UserError

__all__ = [
    "CAPTIONERS",
    "Captioner",
    "NoCaptioner",
    "SidecarCaptioner",
    "SidecarMissingError",
    "TextCaptioner",
    "check_truncation",
    "clean_caption",
    "join_prompt",
    "make_captioner",
]


@runtime_checkable
class Captioner(Protocol):
    """Produces the caption for one image. ``source`` is the input file, when there is one."""

    def caption(self, image: Image.Image, source: Path | None = None) -> str: ...

    def close(self) -> None: ...


class SidecarMissingError(UserError, FileNotFoundError):
    """An image's caption sidecar (IMAGE.txt) does not exist."""


class NoCaptioner:
    """Always the empty caption."""

    def caption(self, image: Image.Image, source: Path | None = None) -> str:
        return ""

    def close(self) -> None:
        pass


class TextCaptioner:
    """The same caption for every image."""

    def __init__(self, text: str) -> None:
        self.text = text

    def caption(self, image: Image.Image, source: Path | None = None) -> str:
        return self.text

    def close(self) -> None:
        pass


class SidecarCaptioner:
    """Reads ``<source without suffix>.txt`` (UTF-8); newlines become spaces, as for LLaVA captions."""

    def __init__(self, suffix: str = ".txt") -> None:
        self.suffix = suffix

    def path_for(self, source: Path) -> Path:
        return Path(source).with_suffix(self.suffix)

    def caption(self, image: Image.Image, source: Path | None = None) -> str:
        if source is None:
            raise ValueError("the sidecar captioner needs the image's file path (source=...) to find its .txt")
        path = self.path_for(source)
        if not path.is_file():
            raise SidecarMissingError(
                f"caption sidecar {path} is missing for {source}; write the caption there, or choose another "
                "captioner (--captioner none|text|llava)"
            )
        return clean_caption(path.read_text(encoding="utf-8"))

    def close(self) -> None:
        pass


CAPTIONERS = ("none", "text", "sidecar", "llava", "hf")


def make_captioner(
    kind: str,
    *,
    text: str | None = None,
    model_dir: str | Path | None = None,
    precision: str = "int4",
    seed: int | None = 0,
    sample: bool = True,
    **kw: Any,
) -> Captioner:
    """A captioner by name (``CAPTIONERS``). ``llava`` extra keywords go to ``LlavaCaptioner``
    (question, max_new_tokens, threads, temperature, top_p, top_k); ``hf`` ones to ``HfCaptioner``
    (device, dtype, prompt, max_new_tokens); ``hf`` decodes greedily (``sample`` is LLaVA's setting)."""
    if kind == "none":
        return NoCaptioner()
    if kind == "text":
        if text is None:
            raise UserError("captioner 'text' needs text=... (the caption to use; --caption TEXT on the command line)")
        return TextCaptioner(text)
    if kind == "sidecar":
        return SidecarCaptioner(**kw)
    if kind == "llava":
        from supir_rt.caption.llava import LlavaCaptioner

        return LlavaCaptioner(model_dir, precision, seed=seed, sample=sample, **kw)
    if kind == "hf":
        from supir_rt.caption.hf import HfCaptioner

        return HfCaptioner(model_dir, seed=seed, **kw)
    raise UserError(f"unknown captioner {kind!r}; choose one of {', '.join(CAPTIONERS)}")
