"""Export LLaVA-1.5 (7B/13B; llava-hf or original liuhaotian layout) for supir-rt's ONNX Runtime captioner.

    python export/export_llava.py --source ~/models/llava-v1.5-13b --clip-dir ~/models/clip-vit-large-patch14-336 \
        --out ~/models/supir-rt-llava-13b --precision int4 int8

See docs/captions.md for the folder layout and the trade-offs between precisions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    from supir_rt.caption.layout import PRECISIONS

    p = argparse.ArgumentParser(
        prog="export_llava.py",
        description="Convert a local LLaVA-1.5 folder to the supir-rt ONNX Runtime layout, layer by layer.",
    )
    p.add_argument("--source", required=True, type=Path, help="local LLaVA-1.5 folder (llava-hf or liuhaotian layout)")
    p.add_argument("--out", required=True, type=Path, help="output model folder (created; reused to add precisions)")
    p.add_argument("--clip-dir", type=Path, default=None,
                   help="local openai/clip-vit-large-patch14-336 folder (needed for the original liuhaotian layout)")
    p.add_argument("--precision", nargs="+", default=["int4"], choices=PRECISIONS,
                   help="decoder precision(s) to write (default: int4; int8 is the safer CPU fallback)")
    p.add_argument("--block-size", type=int, default=32, help="int4/int8 quantization block size along K (default 32)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=[1, 2, 3, 4],
                   help="MatMulNBits accuracy_level (4: int8 activations). Default: unset for int4 weights, 4 for int8 "
                        "weights (ORT's 8-bit CPU kernel is very slow without it)")
    p.add_argument("--lm-head-bits", type=int, default=8, choices=[4, 8], help="bits for lm_head in int4 decoders (default 8)")
    p.add_argument("--skip-vision", action="store_true", help="keep the vision.onnx already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from export.llava.build import QuantConfig, export_llava
    from export.llava.checkpoint import CheckpointError

    quant = QuantConfig(block_size=args.block_size, accuracy_level=args.accuracy_level, lm_head_bits=args.lm_head_bits)
    try:
        export_llava(args.source, args.out, args.precision, clip_dir=args.clip_dir, quant=quant,
                     skip_vision=args.skip_vision, progress=not args.quiet)
    except (CheckpointError, FileNotFoundError) as err:
        logging.getLogger("export_llava").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
