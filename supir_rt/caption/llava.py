"""LLaVA-1.5 captioning over plain ONNX Runtime sessions (an exported folder, see ``layout.py``).

One caption: preprocess the image (``preprocess.py``), run ``vision.onnx`` -> 576 image features,
build the prompt embeddings (vicuna_v1 template tokenized in pieces around ``<image>``, rows of
``embed_tokens.npy``, the image features spliced in), then prefill + decode the Llama decoder with its
KV cache preallocated once per caption and appended in place (IO binding of the same ORT values as the
decoder's past and present; on the CUDA execution provider the buffers live on the GPU). Token choice is
greedy or SUPIR's sampling (temperature 0.2, top-k 50 (transformers' default), top-p 0.7), drawn from a
numpy generator seeded per caption so a seed reproduces a caption. Stops at EOS or max_new_tokens.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from supir_rt.caption import layout
from supir_rt.caption.preprocess import preprocess_image
from supir_rt.caption.prompt import DEFAULT_QUESTION, clean_caption, tokenize_with_image, vicuna_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """SUPIR's generate() call: do_sample, temperature 0.2, top_p 0.7, max_new_tokens 512 (+ top_k 50)."""

    sample: bool = True
    temperature: float = 0.2
    top_k: int = 50
    top_p: float = 0.7
    max_new_tokens: int = 512


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def choose_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Next token from last-position logits ``[V]``, in transformers' warper order."""
    if not cfg.sample:
        return int(np.argmax(logits))
    scores = logits.astype(np.float32) / np.float32(cfg.temperature)
    if 0 < cfg.top_k < scores.size:  # TopKLogitsWarper
        kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if cfg.top_p < 1.0:  # TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1
        order = np.argsort(scores, kind="stable")  # ascending
        cum = np.cumsum(_softmax(scores[order]))
        remove = cum <= (1 - cfg.top_p)
        remove[-1] = False
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    probs = _softmax(scores.astype(np.float64))
    return int(rng.choice(probs.size, p=probs))


class SentencePieceTokenizer:
    """The model folder's ``tokenizer.model`` (sentencepiece; never fetched from a hub)."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.special = {i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id(), self.sp.pad_id()) if i >= 0}
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        """Like transformers' ``decode(skip_special_tokens=True)``; ids past the sentencepiece vocabulary
        (llava-hf's added ``<image>``/``<pad>`` rows) are special tokens too and are skipped."""
        return self.sp.decode([i for i in ids if i not in self.special and i < self.vocab_size])


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return so


class LlavaOnnx:
    """The three exported LLaVA parts in ONNX Runtime, and a generate loop."""

    def __init__(
        self,
        model_dir: str | Path,
        precision: str = "int4",
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir).expanduser()
        self.manifest = layout.read_manifest(self.model_dir)
        decoders = self.manifest.get("decoders", {})
        if precision not in decoders:
            raise layout.ModelDirError(
                f"{self.model_dir} has no {precision} decoder (it has: {sorted(decoders) or 'none'}); add one with:\n"
                f"  {layout.export_command(self.model_dir, precision)} --skip-vision"
            )
        self.precision = precision
        self.text = self.manifest["text"]
        self.vision_cfg = self.manifest["vision"]
        decoder_path = layout.require_file(self.model_dir, decoders[precision]["file"], precision)
        vision_path = layout.require_file(self.model_dir, layout.VISION, precision)
        embed_path = layout.require_file(self.model_dir, self.manifest["embed"]["file"], precision)
        tok_path = layout.require_file(self.model_dir, layout.TOKENIZER, precision)
        self.tokenizer = SentencePieceTokenizer(tok_path)
        self.embed = np.load(embed_path, mmap_mode="r")
        self.io_dtype = np.dtype(decoders[precision]["io_dtype"])
        providers = providers or ["CPUExecutionProvider"]
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]  # a name or (name, options)
        self.device = "cuda" if first == "CUDAExecutionProvider" else "cpu"
        t0 = time.perf_counter()
        so = _session_options(threads)
        self.vision = ort.InferenceSession(str(vision_path), so, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder_path), so, providers=providers)
        self.load_seconds = time.perf_counter() - t0
        log.info("LLaVA %s loaded from %s in %.1f s", precision, self.model_dir, self.load_seconds)
        self.n_layers = self.text["num_layers"]
        self._ort = ort

    def close(self) -> None:
        """Release the sessions (and the memory they hold)."""
        self.vision = None  # type: ignore[assignment]
        self.decoder = None  # type: ignore[assignment]
        self.embed = None  # type: ignore[assignment]

    # -- parts -------------------------------------------------------------------------------------
    def image_features(self, image: Image.Image) -> np.ndarray:
        v = self.vision_cfg
        pixels = preprocess_image(image, v["image_size"], v["image_mean"], v["image_std"])
        return self.vision.run(["image_features"], {"pixel_values": pixels})[0]  # (1, 576, H)

    def prompt_embeddings(self, chunks: list[list[int]], features: np.ndarray) -> np.ndarray:
        """Embeddings of ``chunk0, image, chunk1, ...`` -> ``[1, S, H]`` in the decoder's dtype."""
        parts = []
        for i, ids in enumerate(chunks):
            if i:
                parts.append(features[0].astype(self.io_dtype))
            if ids:
                parts.append(np.asarray(self.embed[np.asarray(ids)], dtype=self.io_dtype))
        return np.concatenate(parts, axis=0)[None]

    # -- decode loop -------------------------------------------------------------------------------
    def kv_cache(self, capacity: int) -> dict[str, Any]:
        """One preallocated buffer per layer and key/value, ``[1, kv heads, capacity, head_dim]``, on the
        decoder's device (uninitialised: the attention reads only the first ``seqlens_k + 1`` rows)."""
        shape = [1, self.text["num_kv_heads"], capacity, self.text["head_dim"]]
        return {
            f"{i}.{kind}": self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self.io_dtype, self.device, 0)
            for i in range(self.n_layers) for kind in ("key", "value")
        }

    def generate_from_embeddings(
        self,
        embeds: np.ndarray,
        cfg: SamplingConfig,
        seed: int | None = 0,
        forced: list[int] | None = None,
        on_logits: Any = None,
        cache: dict[str, Any] | None = None,
    ) -> list[int]:
        """Prefill ``embeds`` then decode; returns the new token ids (EOS excluded).

        The KV cache is one buffer per layer and key/value, sized for the prompt plus ``max_new_tokens``
        and bound as both ``past_key_values.*`` and ``present.*`` of one IO binding made once: the decoder's
        GroupQueryAttention appends each step's keys/values in place, so nothing is copied per token but
        the new rows (and, from a GPU, the logits). ``forced`` teacher-forces the given ids (for measuring
        agreement); ``on_logits(step, logits)`` sees every step's last-position logits; ``cache``
        (from ``kv_cache``, large enough) lets a caller keep or inspect the buffers.
        """
        rng = np.random.default_rng(seed)
        prompt = embeds.shape[1]
        limit = self.text["max_position_embeddings"] - prompt
        max_new = min(cfg.max_new_tokens, limit) if forced is None else len(forced)
        cache = cache if cache is not None else self.kv_cache(prompt + max_new)
        binding = self.decoder.io_binding()
        for name, buffer in cache.items():
            binding.bind_ortvalue_input(f"past_key_values.{name}", buffer)
            binding.bind_ortvalue_output(f"present.{name}", buffer)
        logits_out = self._ort.OrtValue.ortvalue_from_shape_and_type([1, self.text["vocab_size"]], np.float32, "cpu", 0)
        binding.bind_ortvalue_output("logits", logits_out)
        step_input = np.ascontiguousarray(embeds, dtype=self.io_dtype)
        length = 0  # tokens in the cache
        new: list[int] = []
        for step in range(max_new):
            length += step_input.shape[1]
            seqlens_k = np.array([length - 1], dtype=np.int32)
            total = np.array(length, dtype=np.int32)
            binding.bind_cpu_input("inputs_embeds", step_input)
            binding.bind_cpu_input("seqlens_k", seqlens_k)
            binding.bind_cpu_input("total_sequence_length", total)
            self.decoder.run_with_iobinding(binding)
            logits = logits_out.numpy()[0]
            if on_logits is not None:
                on_logits(step, logits)
            token = forced[step] if forced is not None else choose_token(logits, cfg, rng)
            if forced is None and token == self.tokenizer.eos_id:
                break
            new.append(token)
            step_input = np.asarray(self.embed[[token]], dtype=self.io_dtype)[None]  # (1, 1, H)
        return new

    def prompt_chunks(self, question: str = DEFAULT_QUESTION) -> list[list[int]]:
        return tokenize_with_image(vicuna_prompt(question), self.tokenizer, self.tokenizer.bos_id)

    def caption_ids(self, image: Image.Image, question: str, cfg: SamplingConfig, seed: int | None) -> list[int]:
        t0 = time.perf_counter()
        features = self.image_features(image)
        t1 = time.perf_counter()
        embeds = self.prompt_embeddings(self.prompt_chunks(question), features)
        ids = self.generate_from_embeddings(embeds, cfg, seed)
        t2 = time.perf_counter()
        log.info("caption: vision %.2f s, %d prompt + %d new tokens in %.2f s", t1 - t0, embeds.shape[1], len(ids), t2 - t1)
        return ids

    def caption(self, image: Image.Image, question: str = DEFAULT_QUESTION, cfg: SamplingConfig = SamplingConfig(),
                seed: int | None = 0) -> str:
        return clean_caption(self.tokenizer.decode(self.caption_ids(image, question, cfg, seed)))


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    if model_dir is None:
        env = os.environ.get(layout.ENV_MODEL_DIR)
        if not env:
            raise layout.ModelDirError(
                f"no LLaVA model folder given: pass --model-dir / model_dir= or set {layout.ENV_MODEL_DIR}; "
                f"export one with:\n  {layout.export_command('<model dir>')}"
            )
        model_dir = env
    return Path(model_dir).expanduser()


class LlavaCaptioner:
    """Captioner over ``LlavaOnnx``; loaded on first use, released by ``close()``."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        precision: str = "int4",
        *,
        seed: int | None = 0,
        sample: bool = True,
        question: str = DEFAULT_QUESTION,
        max_new_tokens: int = 512,
        threads: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.7,
        top_k: int = 50,
    ) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        layout.decoder_file(precision)
        self.precision = precision
        self.seed = seed
        self.question = question
        self.threads = threads
        self.cfg = SamplingConfig(sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  max_new_tokens=max_new_tokens)
        self._model: LlavaOnnx | None = None
        layout.read_manifest(self.model_dir)  # fail early on a wrong folder

    @property
    def model(self) -> LlavaOnnx:
        if self._model is None:
            self._model = LlavaOnnx(self.model_dir, self.precision, threads=self.threads)
        return self._model

    def caption(self, image: Image.Image, source: Path | None = None) -> str:
        return self.model.caption(image, self.question, self.cfg, self.seed)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None
