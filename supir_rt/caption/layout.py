"""The exported LLaVA model folder: file names and ``manifest.json`` (shared by exporter and runtime).

Layout written by ``python export/export_llava.py``::

    <model dir>/
      manifest.json            dimensions, token ids, preprocessing, exported decoders, versions
      tokenizer.model          the model's sentencepiece tokenizer (copied from the source folder)
      vision.onnx (+ .data)    CLIP ViT-L/14-336 + projector: pixel_values [B,3,336,336] -> [B,576,H] fp32
      embed_tokens.npy         token embedding table [vocab, H] (fp16 for the fp16 checkpoints)
      decoder_<precision>.onnx (+ .data)   Llama decoder with an in-place KV cache buffer; precision in
                               int4/int8/fp16/fp32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from supir_rt.errors import UserError

FORMAT = "supir-rt-llava"
FORMAT_VERSION = 2  # 2: decoders with an in-place KV cache (GroupQueryAttention)
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
VISION = "vision.onnx"
EMBED = "embed_tokens.npy"
PRECISIONS = ("int4", "int8", "fp16", "fp32")
ENV_MODEL_DIR = "SUPIR_RT_LLAVA_DIR"


def decoder_file(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    return f"decoder_{precision}.onnx"


def export_command(model_dir: Path | str, precision: str = "int4") -> str:
    return (
        f"python export/export_llava.py --source <downloaded llava-1.5 folder> --out {model_dir} "
        f"--precision {precision}"
    )


class ModelDirError(UserError, FileNotFoundError):
    """The exported model folder is missing, incomplete or from another format version."""


def read_manifest(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ModelDirError(
            f"LLaVA model folder {model_dir} does not exist; export one with:\n  {export_command(model_dir)}\n"
            f"(or point {ENV_MODEL_DIR}, `supir-rt caption --model-dir` or `supir-rt restore --llava-dir` at an "
            "exported folder; see docs/captions.md)"
        )
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ModelDirError(
            f"{path} is missing: {model_dir} is not an exported LLaVA folder. Export one with:\n"
            f"  {export_command(model_dir)}"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}; re-export with:\n  {export_command(model_dir)}"
        )
    return manifest


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(model_dir / MANIFEST)


def require_file(model_dir: Path, name: str, precision: str = "int4") -> Path:
    path = model_dir / name
    if not path.is_file():
        raise ModelDirError(f"{path} is missing from the exported LLaVA folder; export it with:\n  {export_command(model_dir, precision)}")
    return path
