"""Read a LLaVA-1.5 checkpoint tensor by tensor, under the Hugging Face ``llava-hf`` names.

Two published layouts are accepted:

* ``hf``: the ``llava-hf/llava-1.5-{7,13}b-hf`` folders (``LlavaForConditionalGeneration``; also what
  transformers 5 writes with ``save_pretrained``). The vision tower is inside the checkpoint.
* ``original``: the ``liuhaotian/llava-v1.5-{7,13}b`` folders that SUPIR loads (haotian-liu's
  ``LlavaLlamaForCausalLM``). The checkpoint holds the Vicuna language model and the ``mm_projector``;
  the CLIP ViT-L/14-336 vision tower comes from a separate ``openai/clip-vit-large-patch14-336``
  folder (``--clip-dir``), as in the original code, unless the checkpoint carries it.

Every source key is renamed by one table per layout (``ORIGINAL_TO_HF``, ``HF_TO_HF``, ``CLIP_TO_HF``:
source prefix -> canonical prefix, ``None`` = deliberately dropped), and the reader records which keys
were used so the exporter can fail on anything left over (style G7). Tensors are read lazily from the
shards (safetensors via ``safe_open``; ``.bin`` via ``torch.load(mmap=True)``), so converting a 13B
model never holds more than one layer in memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Canonical names are those of the llava-hf checkpoint files:
#   language_model.model.{embed_tokens,layers.N.*,norm}.weight, language_model.lm_head.weight,
#   multi_modal_projector.linear_{1,2}.{weight,bias}, vision_tower.vision_model.*
ORIGINAL_TO_HF: dict[str, str | None] = {
    "model.embed_tokens.": "language_model.model.embed_tokens.",
    "model.layers.": "language_model.model.layers.",
    "model.norm.": "language_model.model.norm.",
    "lm_head.": "language_model.lm_head.",
    "model.mm_projector.0.": "multi_modal_projector.linear_1.",
    "model.mm_projector.2.": "multi_modal_projector.linear_2.",
    "model.vision_tower.vision_tower.vision_model.": "vision_tower.vision_model.",
}
HF_TO_HF: dict[str, str | None] = {
    # transformers 5 in-memory / partially-converted names first (longest prefixes first).
    "model.language_model.": "language_model.model.",
    "model.vision_tower.vision_model.": "vision_tower.vision_model.",
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
    "language_model.": "language_model.",
    "vision_tower.vision_model.": "vision_tower.vision_model.",
    "vision_tower.": "vision_tower.vision_model.",
    "multi_modal_projector.": "multi_modal_projector.",
}
CLIP_TO_HF: dict[str, str | None] = {
    "vision_model.": "vision_tower.vision_model.",
    "text_model.": None,
    "text_projection.": None,
    "visual_projection.": None,
    "logit_scale": None,
}
# Buffers some checkpoints carry that the model recomputes.
DROPPED = re.compile(r"(\.rotary_emb\.inv_freq|\.embeddings\.position_ids)$")

LAYOUTS = ("hf", "original")
EXPORT_CMD = "python export/export_llava.py --source <llava folder> --out <model dir>"


class CheckpointError(ValueError):
    """A LLaVA source folder is missing, incomplete or in an unknown layout."""


def rename(key: str, table: dict[str, str | None]) -> str | None:
    """Canonical name for ``key`` under ``table`` (first matching prefix wins); None if dropped."""
    if DROPPED.search(key):
        return None
    for src, dst in table.items():
        if key.startswith(src):
            return None if dst is None else dst + key[len(src):]
    raise KeyError(key)


def detect_layout(config: dict[str, Any], folder: Path) -> str:
    """``hf`` or ``original`` from a checkpoint's config.json."""
    archs = config.get("architectures") or []
    if "text_config" in config or "LlavaForConditionalGeneration" in archs:
        return "hf"
    if "mm_vision_tower" in config or "mm_projector_type" in config or "LlavaLlamaForCausalLM" in archs:
        return "original"
    raise CheckpointError(
        f"{folder / 'config.json'}: not a LLaVA-1.5 config (architectures={archs}); expected a llava-hf "
        "folder (LlavaForConditionalGeneration) or a liuhaotian/llava-v1.5 folder (LlavaLlamaForCausalLM)"
    )


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; point --source at a downloaded LLaVA-1.5 model folder")
    return json.loads(path.read_text())


def shard_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, from its index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: {index_name} lists shards that are missing: {missing}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


class _Shard:
    """One weight file, opened lazily; ``get`` returns a CPU tensor (a view of the mmap when possible)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self._st = safe_open(str(path), framework="pt")
            self._sd: dict[str, torch.Tensor] | None = None
            self.keys = list(self._st.keys())
        else:
            self._st = None
            try:
                self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                log.warning("%s cannot be memory-mapped; loading it whole", path)
                self._sd = torch.load(path, map_location="cpu", weights_only=True)
            self.keys = list(self._sd.keys())

    def get(self, key: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.get_tensor(key)
        assert self._sd is not None
        return self._sd[key]


class _Source:
    """A folder of shards plus its rename table."""

    def __init__(self, folder: Path, table: dict[str, str | None]) -> None:
        self.shards = [_Shard(p) for p in shard_files(folder)]
        self.table = table
        self.names: dict[str, tuple[_Shard, str]] = {}
        self.dropped: list[str] = []
        unknown = []
        for shard in self.shards:
            for key in shard.keys:
                try:
                    name = rename(key, table)
                except KeyError:
                    unknown.append(key)
                    continue
                if name is None:
                    self.dropped.append(key)
                else:
                    self.names[name] = (shard, key)
        if unknown:
            raise CheckpointError(
                f"{folder}: {len(unknown)} keys match no rule of the key map, e.g. {unknown[:5]}; "
                "is this a LLaVA-1.5 checkpoint in the layout its config.json claims?"
            )


@dataclass(frozen=True)
class LlavaSpec:
    """The dimensions the exporter and runtime need, from the source configs."""

    layout: str
    text: dict[str, Any]  # hidden_size, num_layers, num_heads, num_kv_heads, head_dim, ...
    vision_config: dict[str, Any]  # a CLIPVisionConfig as a dict
    feature_layer: int
    image_token_id: int | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _text_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """Llama dimensions from a (llava-hf text_config or Vicuna/LLaVA) config dict via LlamaConfig."""
    from transformers import LlamaConfig

    keep = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")}
    c = LlamaConfig(**keep)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    scaling = getattr(c, "rope_scaling", None) or {}
    if rope_type != "default" or scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise CheckpointError(f"rope scaling {rope} is not supported (LLaVA-1.5 uses plain RoPE)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise CheckpointError("attention/MLP biases are not supported (LLaVA-1.5's Llama has none)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    return {
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads or c.num_attention_heads,
        "head_dim": head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": float(c.rms_norm_eps),
        "rope_theta": theta,
        "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": 1 if c.bos_token_id is None else c.bos_token_id,
        "eos_token_id": 2 if eos is None else eos,
    }


def _preprocessor(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = folder / "preprocessor_config.json"
    if path.is_file():
        p = json.loads(path.read_text())
        return tuple(p.get("image_mean", CLIP_MEAN)), tuple(p.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


class LlavaCheckpoint:
    """Lazy, renamed access to a LLaVA-1.5 checkpoint (plus, for the original layout, a CLIP folder)."""

    def __init__(self, source: str | Path, clip_dir: str | Path | None = None) -> None:
        self.folder = Path(source)
        if not self.folder.is_dir():
            raise CheckpointError(f"LLaVA source folder {self.folder} does not exist")
        config = read_json(self.folder / "config.json")
        self.layout = detect_layout(config, self.folder)
        sources = []
        if self.layout == "hf":
            sources.append(_Source(self.folder, HF_TO_HF))
            vision_cfg = dict(config.get("vision_config") or {})
            text_cfg = dict(config.get("text_config") or {})
            text_cfg.setdefault("vocab_size", 32064)
            image_token = config.get("image_token_index", config.get("image_token_id"))
            feature_layer = config.get("vision_feature_layer", -2)
            strategy = config.get("vision_feature_select_strategy", "default")
            mean, std = _preprocessor(self.folder)
        else:
            sources.append(_Source(self.folder, ORIGINAL_TO_HF))
            text_cfg = dict(config)
            image_token = None
            feature_layer = config.get("mm_vision_select_layer", -2)
            strategy = "default" if config.get("mm_vision_select_feature", "patch") == "patch" else "full"
            if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
                raise CheckpointError(f"mm_projector_type {config.get('mm_projector_type')!r} is not mlp2x_gelu")
            has_vision = any(n.startswith("vision_tower.") for n in sources[0].names)
            vision_cfg = {}
            mean, std = CLIP_MEAN, CLIP_STD
            if clip_dir is not None:
                clip = Path(clip_dir)
                clip_config = read_json(clip / "config.json")
                vision_cfg = dict(clip_config.get("vision_config", clip_config))
                mean, std = _preprocessor(clip)
                if not has_vision:
                    sources.append(_Source(clip, CLIP_TO_HF))
            elif not has_vision:
                raise CheckpointError(
                    f"{self.folder} is in the original LLaVA layout, whose checkpoint has no vision tower; "
                    f"download {config.get('mm_vision_tower', 'openai/clip-vit-large-patch14-336')} and pass "
                    "its folder with --clip-dir"
                )
        if strategy != "default":
            raise CheckpointError(f"vision feature strategy {strategy!r} is not supported (LLaVA-1.5: default)")
        for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            vision_cfg.pop(key, None)
        self.spec = LlavaSpec(
            layout=self.layout,
            text=_text_spec(text_cfg),
            vision_config=vision_cfg,
            feature_layer=int(feature_layer if not isinstance(feature_layer, list) else feature_layer[0]),
            image_token_id=image_token,
            image_mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in std),  # type: ignore[arg-type]
        )
        self._names: dict[str, tuple[_Shard, str]] = {}
        self.dropped: list[str] = []
        for src in sources:
            self._names.update(src.names)
            self.dropped.extend(src.dropped)
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under canonical ``name`` (marked as used)."""
        try:
            shard, key = self._names[name]
        except KeyError:
            raise CheckpointError(
                f"{self.folder}: tensor {name!r} (canonical llava-hf name) is missing from the checkpoint"
            ) from None
        self.used.add(name)
        return shard.get(key)

    def prefixed(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors whose canonical name starts with ``prefix``, with the prefix removed."""
        for name in sorted(n for n in self._names if n.startswith(prefix)):
            yield name[len(prefix):], self.get(name)

    def unused(self) -> list[str]:
        return sorted(set(self._names) - self.used)

    def tokenizer_file(self) -> Path:
        path = self.folder / "tokenizer.model"
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the captioner needs the sentencepiece tokenizer.model that ships with "
                "LLaVA-1.5 (download it with the model)"
            )
        return path
