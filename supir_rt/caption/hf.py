"""Captions from any local transformers image-text-to-text model (SmolVLM/Idefics3, Qwen2-VL, llava-hf
LLaVA-1.5, PaliGemma, ...), loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor``.

Local only: every ``from_pretrained`` gets ``local_files_only=True`` (and the hub's offline switches are
set before transformers is imported), so a missing file is an error naming it, never a download.
``trust_remote_code`` stays off: models the installed transformers does not support natively are refused.

One caption: the family's prompt (``PROMPTS``; content, not style) in the processor's chat template with
one image, then ``model.generate`` with greedy decoding by default (the folder's own generation settings
for sampling, beams or penalties are overridden), the new tokens decoded without special tokens and
cleaned as LLaVA captions are. A caption with no letters or digits (an untrained or broken model) is
replaced by the empty caption with a warning: the restore goes on with the quality prompt alone.
"""

from __future__ import annotations

import logging
import os
import time
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image

from supir_rt.caption.prompt import clean_caption
from supir_rt.errors import UserError

log = logging.getLogger(__name__)

# The instruction per model_type (config.json). SUPIR's text encoders want what is in the picture: its
# objects, people, scene and colours, in a sentence or two (CLIP keeps 75 tokens), not its style.
CONTENT_PROMPT = (
    "Describe the content of this image in one or two sentences: the main subjects, what they are doing, "
    "the setting, and their colours. Do not describe the image quality or style."
)
PROMPTS: dict[str, str] = {
    "paligemma": "caption en",  # PaliGemma's task prefix (no chat template)
    "florence2": "<DETAILED_CAPTION>",  # Florence-2's task token (no chat template)
}
# Processor options per model_type. SmolVLM/Idefics3 would split the 512-px caption image into up to
# 16 tiles + a global view (1088 image tokens); a one-or-two-sentence caption needs the global view
# only (64 tokens, ~10x less vision and prefill work).
IMAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "idefics3": {"do_image_splitting": False},
    "smolvlm": {"do_image_splitting": False},
}
DTYPES = ("fp32", "fp16", "bf16")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class CaptionModelError(UserError, FileNotFoundError):
    """The ``--caption-model`` folder is missing, incomplete or not an image-text-to-text model."""


def _fix() -> str:
    return ("save one there with save_pretrained, or download one once with "
            "`hf download <org>/<model> --local-dir DIR` (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")


def check_model_dir(model_dir: str | Path) -> Path:
    """The folder, after checking it holds a config, weights, an image processor and a tokenizer;
    raises `CaptionModelError` naming the first thing missing."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise CaptionModelError(f"caption model folder {folder} does not exist; {_fix()}")
    if not (folder / "config.json").is_file():
        raise CaptionModelError(f"{folder} is not a transformers model folder: {folder / 'config.json'} is missing; {_fix()}")
    groups = (("model weights", WEIGHT_FILES), ("image processor", PROCESSOR_FILES), ("tokenizer", TOKENIZER_FILES))
    for what, names in groups:
        if not any((folder / name).is_file() for name in names):
            raise CaptionModelError(
                f"{folder} has no {what}: none of {', '.join(names)} is there; copy the complete model folder "
                f"(or {_fix()})"
            )
    return folder


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def usable_caption(text: str) -> str:
    """``text`` cleaned like a LLaVA caption, without control characters or undecodable bytes (U+FFFD);
    the empty string when nothing with a letter or digit is left."""
    text = "".join(" " if unicodedata.category(ch)[0] == "C" or ch == "\ufffd" else ch for ch in clean_caption(text))
    text = " ".join(text.split())
    return text if any(ch.isalnum() for ch in text) else ""


class HfCaptioner:
    """Captioner over a local transformers image-text-to-text folder; loaded on first use, released by
    ``close()``. ``device``: cpu, cuda, cuda:N (default cuda when torch sees one); ``dtype``: fp32/fp16/bf16 (default fp32 on CPU, fp16
    on CUDA). ``prompt`` replaces the family's default instruction."""

    needs_image = True

    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 256,
        sample: bool = False,
        seed: int | None = 0,
    ) -> None:
        if model_dir is None:
            raise CaptionModelError(f"--captioner hf needs --caption-model DIR, a local transformers model folder; {_fix()}")
        self.model_dir = check_model_dir(model_dir)
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or ("fp16" if str(device).startswith("cuda") else "fp32")
        if dtype not in DTYPES:
            raise UserError(f"caption model dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens}: give at least 1")
        self.device, self.dtype = str(device), dtype
        self.max_new_tokens, self.sample, self.seed = max_new_tokens, sample, seed
        self.model_type = self._check_config()
        self.prompt = prompt or PROMPTS.get(self.model_type, CONTENT_PROMPT)
        self._model: Any = None
        self._processor: Any = None

    def _check_config(self) -> str:
        """The folder's model_type, after checking transformers maps it to an image-text-to-text model."""
        _offline()
        from transformers import AutoConfig, AutoModelForImageTextToText

        try:
            config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise CaptionModelError(
                f"{self.model_dir / 'config.json'} is not a model this transformers can load ({err}); "
                "upgrading transformers may help"
            ) from None
        mapping = AutoModelForImageTextToText._model_mapping
        if type(config) not in mapping:
            raise CaptionModelError(
                f"{self.model_dir} holds a {config.model_type!r} model, which transformers cannot use to caption "
                f"images (not an image-text-to-text model: a text-only model cannot see the image); choose a "
                "vision-language model such as SmolVLM, Qwen2-VL or llava-hf LLaVA-1.5"
            )
        return str(config.model_type)

    def _load(self) -> None:
        _offline()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        t0 = time.perf_counter()
        try:
            processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CaptionModelError(f"cannot load the processor of {self.model_dir}: {err}") from None
        if getattr(processor, "image_processor", None) is None:
            raise CaptionModelError(
                f"{self.model_dir}'s processor has no image processor (is it a text-only model?); "
                "an image captioner needs a vision-language model"
            )
        model = AutoModelForImageTextToText.from_pretrained(
            self.model_dir, local_files_only=True, dtype=_torch_dtype(self.dtype)
        )
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        self._model = model.to(self.device).eval()
        self._processor = processor
        log.info("caption model %s (%s, %s on %s) loaded in %.1f s", self.model_dir, self.model_type, self.dtype,
                 self.device, time.perf_counter() - t0)

    @property
    def model(self) -> Any:
        if self._model is None:
            self._load()
        return self._model

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._load()
        return self._processor

    def prompt_text(self) -> str:
        """The text given to the processor: the instruction in the chat template with one image, or the
        bare instruction for families without a template (PaliGemma, Florence-2)."""
        if getattr(self.processor, "chat_template", None) is None:
            return self.prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images: list[Image.Image]) -> Any:
        """Processor outputs for ``images`` (one prompt each), on the model's device and float dtype."""
        text = self.prompt_text()
        rgb = [[im.convert("RGB")] for im in images]
        batch = self.processor(text=[text] * len(images), images=rgb, return_tensors="pt", padding=len(images) > 1,
                               **IMAGE_OPTIONS.get(self.model_type, {}))
        return batch.to(self.model.device, dtype=self.model.dtype)

    def generation_kwargs(self) -> dict[str, Any]:
        """Greedy (or plain sampling) whatever the folder's generation_config.json asks for."""
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample, "num_beams": 1}
        if not self.sample:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    def caption_ids(self, images: list[Image.Image]) -> list[list[int]]:
        """The new token ids per image (prompt removed)."""
        import torch

        inputs = self.inputs(images)
        with torch.inference_mode(), torch.random.fork_rng(enabled=self.sample and self.seed is not None):
            if self.sample and self.seed is not None:
                torch.manual_seed(self.seed)  # inside fork_rng: the caller's random state is left alone
            out = self.model.generate(**inputs, **self.generation_kwargs())
        n_prompt = inputs["input_ids"].shape[1]
        return [row[n_prompt:].tolist() for row in out]

    def caption_many(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, generated as one batch."""
        t0 = time.perf_counter()
        ids = self.caption_ids(images)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        captions = []
        for raw in texts:
            text = usable_caption(raw)
            if not text:
                log.warning("caption model %s returned no usable text (%r); going on without a caption",
                            self.model_dir.name, raw[:80])
            captions.append(text)
        log.info("caption: %d image(s), %d new tokens max, %.2f s", len(images), max(map(len, ids), default=0),
                 time.perf_counter() - t0)
        return captions

    def caption(self, image: Image.Image, source: Path | None = None) -> str:
        return self.caption_many([image])[0]

    def close(self) -> None:
        self._model = None
        self._processor = None


def _offline() -> None:
    """No hub access from transformers/huggingface_hub (they read these when first imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
