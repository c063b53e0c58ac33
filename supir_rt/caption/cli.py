"""``supir-rt caption IMAGE...``: LLaVA or transformers-model captions on their own (printed, or written as
``.txt`` sidecars)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from supir_rt.caption import layout
from supir_rt.caption.prompt import DEFAULT_QUESTION
from supir_rt.errors import UserError

log = logging.getLogger(__name__)


def add_caption_parser(subparsers: Any) -> None:
    """Register the ``caption`` sub-command (its handler is ``run_caption``)."""
    p = subparsers.add_parser(
        "caption",
        help="caption images with LLaVA-1.5 over ONNX Runtime or a local transformers vision-language model",
        description="Caption images with LLaVA-1.5 (exported with export/export_llava.py) or, with --captioner hf, "
        "a local transformers image-text-to-text model folder (SmolVLM, Qwen2-VL, ...; see docs/captions.md). "
        "With one image the caption is printed; with several, 'PATH<TAB>caption' lines; with -o, "
        "<stem>.txt files are written into the folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  supir-rt caption photo.jpg --model-dir llava-onnx/          print the caption\n"
        "  supir-rt caption scans/*.png --model-dir llava-onnx/ -o captions/   one <stem>.txt per image\n"
        "  supir-rt restore photo.jpg --caption \"$(supir-rt caption photo.jpg --model-dir llava-onnx/)\"",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                   help="image file(s) to caption (PNG, JPEG, WebP, TIFF, BMP)")
    p.add_argument("--captioner", choices=("llava", "hf"), default="llava",
                   help="llava (default: an exported LLaVA folder) or hf (a transformers model folder)")
    p.add_argument("--model-dir", "--caption-model", type=Path, default=None,
                   help=f"the model folder (llava default: ${layout.ENV_MODEL_DIR})")
    p.add_argument("--precision", choices=layout.PRECISIONS, default="int4",
                   help="llava: decoder to use (default int4; int8 is the safer fallback if int4 captions degrade)")
    p.add_argument("--device", default=None, help="hf: cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="hf: model precision (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--greedy", action="store_true", help="llava: greedy decoding instead of SUPIR's sampling "
                   "(hf always decodes greedily)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, applied per image (default 0; -1: random)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="caption length limit (default 512 for llava, as SUPIR; 256 for hf)")
    p.add_argument("--question", default=None,
                   help="the instruction given with the image (default: SUPIR's for llava, a content prompt per "
                        "model family for hf)")
    p.add_argument("--threads", type=int, default=None, help="llava: ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("-o", "--output", type=Path, default=None, help="write <stem>.txt captions into this folder")
    p.set_defaults(func=run_caption)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_paths(images: list[Path], out_dir: Path) -> list[Path]:
    """``<out_dir>/<stem>.txt`` per image; refuses collisions and overwriting an input."""
    targets = [out_dir / (img.stem + ".txt") for img in images]
    seen: dict[Path, Path] = {}
    inputs = {img.resolve() for img in images}
    for img, target in zip(images, targets):
        key = target.resolve()
        if key in seen:
            raise UserError(f"{img} and {seen[key]} would both write {target}; caption them into different folders")
        if key in inputs:
            raise UserError(f"refusing to overwrite input {target}")
        seen[key] = img
    return targets


def _make(args: argparse.Namespace) -> Any:
    from supir_rt.caption import make_captioner

    optional = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    if args.captioner == "hf":
        return make_captioner("hf", model_dir=args.model_dir, device=args.device, dtype=args.dtype,
                              prompt=args.question, **optional)
    return make_captioner(
        "llava", model_dir=args.model_dir or os.environ.get(layout.ENV_MODEL_DIR), precision=args.precision,
        seed=None if args.seed == -1 else args.seed, sample=not args.greedy,
        question=args.question or DEFAULT_QUESTION, threads=args.threads, **optional,
    )


def run_caption(args: argparse.Namespace) -> int:
    from PIL import Image

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        log.error("image(s) not found: %s", ", ".join(missing))
        return 2
    targets = None
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        try:
            targets = output_paths(list(args.images), args.output)
        except UserError as err:
            log.error("%s", err)
            return 2
    try:
        captioner = _make(args)
    except UserError as err:  # ModelDirError, CaptionModelError, a bad --precision
        log.error("%s", err)
        return 2
    try:
        for i, path in enumerate(args.images):
            with Image.open(path) as img:
                text = captioner.caption(img, source=path)
            if targets is not None:
                write_atomic(targets[i], text + "\n")
                log.info("%s -> %s", path, targets[i])
            elif len(args.images) == 1:
                print(text)
            else:
                print(f"{path}\t{text}")
            sys.stdout.flush()
    except UserError as err:
        log.error("%s", err)
        return 2
    finally:
        captioner.close()
    return 0
