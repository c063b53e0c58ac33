"""Export SUPIR's networks to ONNX (and optionally build TensorRT plans), each with a manifest.

    python export/build_engines.py --tiny-random --out engines/tiny                   # tests, smoke runs
    python export/build_engines.py --sdxl sd_xl_base_1.0_0.9vae.safetensors --supir SUPIR-v0Q.ckpt \\
        --precision fp32 --out engines/official                                      # CPU (ONNX Runtime)
    python export/build_engines.py --sdxl ... --supir ... --precision fp16 --trt     # GPU (TensorRT)

A thin command line over `supir_rt.backends.onnx_export.export_all` and `export/build_trt.py`; see
docs/engines.md. fp16 artifacts keep the VAE networks in fp32 (the SDXL VAE overflows in fp16).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from supir_rt.backends.manifest import PRECISIONS, file_sha256  # noqa: E402
from supir_rt.backends.specs import DEFAULT_RANGES, NETWORKS, DimRange  # noqa: E402
from supir_rt.config import ModelConfig  # noqa: E402

log = logging.getLogger("build_engines")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engines.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny-random", action="store_true", help="the tiny configuration with seeded random weights")
    src.add_argument("--official-random", action="store_true",
                     help="the official architecture with random weights (for export/engine tests)")
    src.add_argument("--sdxl", type=Path, help="SDXL base checkpoint (e.g. sd_xl_base_1.0_0.9vae.safetensors)")
    src.add_argument("--contract", choices=("official", "tiny"),
                     help="print the engine I/O contract (Markdown, from the specs) for a configuration and exit")
    p.add_argument("--supir", type=Path, help="SUPIR checkpoint (SUPIR-v0Q.ckpt or SUPIR-v0F.ckpt); with --sdxl")
    p.add_argument("--options", type=Path, help="an official options YAML (default: SUPIR_v0 built in)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--out", type=Path, help="artifact folder (default: engines/<config name>)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (CPU) or fp16 (GPU; VAE networks stay fp32) (default fp32)")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, help="export only these (default: all)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default torchscript: 13x faster here, same accuracy)")
    p.add_argument("--optimize", action="store_true", help="save ONNX Runtime's basic-level optimised graph")
    p.add_argument("--reuse", action="store_true", help="skip networks whose artifact already matches")
    p.add_argument("--trt", action="store_true", help="also build TensorRT plans from the ONNX files (needs a GPU)")
    p.add_argument("--trt-only", action="store_true", help="build TensorRT plans from existing ONNX files")
    p.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), help="TensorRT profile for B")
    p.add_argument("--latent", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT profile for latent h and w (pixels / 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_model(args: argparse.Namespace, dtype: torch.dtype):
    """(config, model, source description) for the command-line choice of weights."""
    from supir_rt.model.supir import build_model

    if args.tiny_random:
        config = ModelConfig.tiny()
    elif args.options:
        config = ModelConfig.from_official_yaml(args.options)
    else:
        config = ModelConfig.official()
    if args.sdxl is None:
        torch.manual_seed(args.seed)
        return config, build_model(config, dtype=dtype), {"kind": "random-init", "seed": args.seed}
    if args.supir is None:
        raise SystemExit("--sdxl needs --supir too (the SUPIR-v0Q/v0F checkpoint)")
    from supir_rt.weights import load_checkpoints

    log.info("hashing the checkpoints")
    source = {"kind": "checkpoint",
              "sdxl": {"path": str(args.sdxl), "sha256": file_sha256(args.sdxl)},
              "supir": {"path": str(args.supir), "sha256": file_sha256(args.supir)}}
    model = build_model(config, dtype=dtype, init=False)
    load_checkpoints(model, sdxl=args.sdxl, supir=args.supir)
    return config, model, source


def trt_ranges(args: argparse.Namespace) -> dict[str, DimRange]:
    ranges = dict(DEFAULT_RANGES)
    if args.batch:
        ranges["B"] = DimRange(*args.batch)
    if args.latent:
        ranges["h"] = ranges["w"] = DimRange(*args.latent)
    return ranges


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.contract:
        from supir_rt.backends.manifest import contract_markdown
        from supir_rt.backends.specs import network_specs

        config = ModelConfig.official() if args.contract == "official" else ModelConfig.tiny()
        print(contract_markdown(network_specs(config)), end="")
        return 0
    t0 = time.perf_counter()
    if args.trt or args.trt_only:  # fail before the long export, with the reason
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from build_trt import gpu_capability, import_tensorrt

        try:
            import_tensorrt()
            gpu_capability()
        except (ImportError, RuntimeError) as err:
            log.error("cannot build TensorRT plans: %s", err)
            return 2
    config = None
    if not args.trt_only:
        from supir_rt.backends.onnx_export import export_all

        # The model is built in the precision's dtype (fp16 halves the memory; VAE networks are cast
        # back to fp32 one at a time during export).
        config, model, source = load_model(args, torch.float16 if args.precision == "fp16" else torch.float32)
        out = args.out or Path("engines") / config.name
        export_all(model, out, precision=args.precision, networks=args.networks, progress=not args.quiet,
                   source=source, exporter=args.exporter, optimize=args.optimize, reuse=args.reuse)
        del model
    if args.trt or args.trt_only:
        from build_trt import build_all

        config = config or (ModelConfig.tiny() if args.tiny_random else
                            ModelConfig.from_official_yaml(args.options) if args.options else ModelConfig.official())
        out = args.out or Path("engines") / config.name
        build_all(config, out, precision=args.precision, networks=args.networks, ranges=trt_ranges(args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("done in %.0f s, peak RSS %.1f GiB; artifacts in %s", time.perf_counter() - t0, peak, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
