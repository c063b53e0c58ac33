"""Export SUPIR's networks to ONNX (and optionally build TensorRT plans), each with a manifest.

    python export/build_engines.py --tiny-random --out engines/tiny                   # tests, smoke runs
    python export/build_engines.py --sdxl sd_xl_base_1.0_0.9vae.safetensors --supir SUPIR-v0Q.ckpt \\
        --precision fp32 --out engines/official                                      # CPU (ONNX Runtime)
    python export/build_engines.py --sdxl ... --supir ... --precision fp16 --trt     # GPU (TensorRT)
    python export/build_engines.py --trt-only --precision fp16 --out engines/official  # plans from ONNX there
    python export/build_engines.py --trt-only --trt-rtx --precision fp16 --out engines/official  # TensorRT-RTX
    python export/build_engines.py --sdxl ... --supir SUPIR-v0F.ckpt --precision fp16 --trt --refit
                                                                          # swap weights into "full" plans

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
from supir_rt.backends.specs import (  # noqa: E402
    DEFAULT_RANGES, NETWORKS, SAMPLER_TILE_BATCH, SAMPLER_TILE_LATENT, STATIC_LATENT, DimRange, default_profiles,
)
from supir_rt.config import ModelConfig  # noqa: E402

log = logging.getLogger("build_engines")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _r(sym: str) -> str:
    r = DEFAULT_RANGES[sym]
    return f"{r.min} {r.opt} {r.max}"


def parse_size(text: str) -> int:
    """'6GiB', '4000MB', '123456' -> bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"--trt-weight-budget {text!r}: give a size such as 6GiB, 4000MB or a number of bytes")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engines.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
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
    t = p.add_argument_group("TensorRT (GPU; see docs/engines.md)")
    t.add_argument("--trt", action="store_true", help="also build TensorRT plans from the ONNX files")
    t.add_argument("--trt-rtx", action="store_true",
                   help="build TensorRT-RTX plans (GeForce/RTX workstation GPUs; pip install tensorrt-rtx) instead of "
                        "TensorRT ones; with --trt or --trt-only")
    t.add_argument("--trt-only", action="store_true",
                   help="build TensorRT plans from the ONNX files already in --out (no weights needed; "
                        "--tiny-random / --options choose the configuration, default official)")
    t.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"),
                   help=f"dynamic profile: images per request (default {_r('B')})")
    t.add_argument("--latent", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"),
                   help=f"dynamic profile: latent height and width, pixels / 8 (default {_r('h')})")
    t.add_argument("--no-dynamic-profile", action="store_true", help="leave out the dynamic fallback profile")
    t.add_argument("--static-latent", type=int, nargs="+", metavar="N", default=[STATIC_LATENT],
                   help=f"static profile for one image of latent size H or H W (default {STATIC_LATENT}: 1024 px)")
    t.add_argument("--no-static-profile", action="store_true", help="leave out the static profile")
    t.add_argument("--tile-latent", type=int, default=SAMPLER_TILE_LATENT,
                   help=f"sampler tile profile: latent tile side (default {SAMPLER_TILE_LATENT})")
    t.add_argument("--tile-batch", type=int, default=SAMPLER_TILE_BATCH,
                   help=f"sampler tile profile: most tiles per call (default {SAMPLER_TILE_BATCH})")
    t.add_argument("--tile-profile", action=argparse.BooleanOptionalAction, default=True,
                   help="the sampler tile profile (default on)")
    t.add_argument("--no-tf32", action="store_true", help="no TF32 tactics for fp32 layers (TensorRT's default is on)")
    t.add_argument("--trt-opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    t.add_argument("--trt-workspace-gib", type=float, default=8.0, help="builder workspace limit (default 8)")
    t.add_argument("--trt-refittable", choices=("auto", "none", "identical", "full"), default="auto",
                   help="auto (default): 'identical' for plans with one profile, 'none' for plans with several "
                        "(TensorRT allows one profile per refittable plan); identical: refit only with the same "
                        "weights (no speed cost; needed by --trt-strip); full: any weights of the same architecture "
                        "(for --refit); identical/full need one profile (e.g. --no-static-profile --no-tile-profile)")
    t.add_argument("--trt-strip", action="store_true",
                   help="plans without weights (small); the runtime loads them from the ONNX files beside")
    t.add_argument("--trt-weight-budget", metavar="SIZE",
                   help="weight streaming for the UNet + adaptor plan: keep SIZE of its weights on the GPU "
                        "(e.g. 6GiB, 4000MB); for 8-12 GB GPUs")
    t.add_argument("--refit", action="store_true",
                   help="when only the weights changed (re-exported ONNX, same architecture), refit the existing "
                        "'full' plans instead of rebuilding")
    t.add_argument("--no-reuse", action="store_true", help="rebuild plans even when their manifest matches")
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


def trt_build_config(args: argparse.Namespace):
    """The frozen BuildConfig for the TensorRT options (ValueError with the option to fix)."""
    from build_trt import BuildConfig

    dynamic = None
    if not args.no_dynamic_profile:
        dynamic = dict(DEFAULT_RANGES)
        if args.batch:
            dynamic["B"] = DimRange(*args.batch)
        if args.latent:
            dynamic["h"] = dynamic["w"] = DimRange(*args.latent)
    static = None
    if not args.no_static_profile:
        if len(args.static_latent) > 2:
            raise ValueError("--static-latent takes H or H W")
        static = (args.static_latent[0], args.static_latent[-1])
    profiles = default_profiles(static_latent=static, tile_latent=args.tile_latent if args.tile_profile else None,
                                tile_batch=args.tile_batch, dynamic=dynamic)
    return BuildConfig(optimization_level=args.trt_opt_level, workspace_gib=args.trt_workspace_gib,
                       tf32=not args.no_tf32, profiles=profiles, refit=args.trt_refittable,
                       strip_weights=args.trt_strip, weight_streaming=args.trt_weight_budget is not None)


def _config(args: argparse.Namespace) -> ModelConfig:
    """The model configuration the options name (without loading weights)."""
    if args.tiny_random:
        return ModelConfig.tiny()
    return ModelConfig.from_official_yaml(args.options) if args.options else ModelConfig.official()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


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
    trt = args.trt or args.trt_only
    flavour = "tensorrt-rtx" if args.trt_rtx else "tensorrt"
    if args.trt_rtx and not trt:
        return _fail("--trt-rtx chooses the TensorRT flavour of a plan build: add --trt or --trt-only")
    if not args.trt_only and not (args.tiny_random or args.official_random or args.sdxl):
        return _fail("choose the weights: --tiny-random, --official-random or --sdxl/--supir "
                     "(or --trt-only to build plans from existing ONNX files)")
    if trt:  # fail before the long export, with the reason
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from build_trt import check_build, current_target, require_tensorrt

        try:
            build = trt_build_config(args)
            check_build(build, _config(args), args.networks)
            budget = parse_size(args.trt_weight_budget) if args.trt_weight_budget is not None else None
            current_target(require_tensorrt(flavour), flavour=flavour)
        except ValueError as err:
            return _fail(str(err))
        except (ImportError, RuntimeError) as err:
            return _fail(f"cannot build {'TensorRT-RTX' if args.trt_rtx else 'TensorRT'} plans: {err}")
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
    if trt:
        from build_trt import build_all

        from supir_rt.backends.manifest import ArtifactError

        config = config or _config(args)
        out = args.out or Path("engines") / config.name
        try:
            build_all(config, out, precision=args.precision, networks=args.networks, build=build,
                      reuse=not args.no_reuse, refit=args.refit, weight_budget=budget, flavour=flavour)
        except (ArtifactError, ValueError) as err:
            return _fail(str(err))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("done in %.0f s, peak RSS %.1f GiB; artifacts in %s", time.perf_counter() - t0, peak, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
