"""The ``supir-rt`` command: ``restore``, ``ui`` (`supir_rt.ui`), and ``caption`` when captioning is present.

A thin layer over `supir_rt.api.Restorer`: parse flags into a `RestoreConfig`, find the weights, plan
every output before any work, then restore image by image. A bad option, input or setup (any
`supir_rt.errors.UserError`) gives one ``error: ...`` line naming the flag as typed (exit code 2);
anything else is a bug and shows its traceback. ``--debug`` shows tracebacks for user errors too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supir_rt.api import SDXL_FILE, SUPIR_FILES, SetupError
from supir_rt.errors import SettingError, UserError
from supir_rt.images import OUTPUT_FORMATS, ImageError, check_output_path, check_writable_folder, is_image_file
from supir_rt.progress import Progress
from supir_rt.progress import active as active_progress
from supir_rt.restore_config import (
    RESTORE_PRESETS, SAMPLERS, TILINGS, VAE_TILING_MODES, RestoreConfig, normalise_color_fix, restore_preset,
)

log = logging.getLogger("supir_rt")

ENV_SDXL = "SUPIR_RT_SDXL"
ENV_SUPIR = "SUPIR_RT_SUPIR"
ENV_WEIGHTS_DIR = "SUPIR_RT_WEIGHTS_DIR"
ENV_CONFIG = "SUPIR_RT_CONFIG"
DEFAULT_OUTPUT_DIR = Path("restored")
# --tiny-random defaults that keep a CPU run to about a minute (explicit flags win).
TINY_DEFAULTS = {"num_steps": 4, "min_size": 256}


class WeightsNotFoundError(SetupError):
    """The checkpoint files are not where any of the lookups point."""


# --------------------------------------------------------------------------------------------------
# configuration file and weights lookup
# --------------------------------------------------------------------------------------------------


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "supir-rt" / "config.toml"


def default_weights_dir(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "supir-rt" / "weights"


def read_config_file(path: Path | None, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The settings file (TOML, or YAML for .yaml/.yml): ``[weights]`` sdxl, supir, dir, variant and
    ``[runtime]`` backend, engines_dir, device, dtype. A missing default file is not an error."""
    explicit = path is not None or ENV_CONFIG in env
    path = Path(path or env.get(ENV_CONFIG) or default_config_path(env)).expanduser()
    if not path.is_file():
        if explicit:
            raise SetupError(f"config file {path} not found; fix --config / ${ENV_CONFIG}")
        return {}
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            import tomllib

            doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise SetupError(f"config file {path} is not valid ({err}); fix it or pass another --config") from None
    if not isinstance(doc, dict):
        raise SetupError(f"config file {path}: expected tables [weights] / [runtime], got {type(doc).__name__}")
    known = {"weights": {"sdxl", "supir", "dir", "variant"}, "runtime": {"backend", "engines_dir", "device", "dtype"}}
    for table, value in doc.items():
        if table not in known or not isinstance(value, dict):
            raise SetupError(f"config file {path}: unknown section {table!r}; use [weights] and [runtime]")
        unknown = set(value) - known[table]
        if unknown:
            raise SetupError(f"config file {path}: unknown keys {sorted(unknown)} in [{table}]; known: {sorted(known[table])}")
    doc["_path"] = str(path)
    return doc


@dataclass(frozen=True)
class WeightPaths:
    sdxl: Path
    supir: Path


def find_weights(args: argparse.Namespace, file_cfg: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> WeightPaths:
    """Flags, then environment variables, then the config file, then the weights folder."""
    w = file_cfg.get("weights", {})
    weights_dir = Path(args.weights_dir or env.get(ENV_WEIGHTS_DIR) or w.get("dir") or default_weights_dir(env)).expanduser()
    variant = (args.supir_variant or w.get("variant") or "Q").upper()
    if variant not in SUPIR_FILES:
        raise SetupError(f"SUPIR variant {variant!r}: choose Q (quality, default) or F (fidelity)")
    sdxl = args.sdxl or env.get(ENV_SDXL) or w.get("sdxl")
    supir = args.supir or env.get(ENV_SUPIR) or w.get("supir")
    sdxl_path = Path(sdxl).expanduser() if sdxl else weights_dir / SDXL_FILE
    if supir:
        supir_path = Path(supir).expanduser()
    else:
        supir_path = weights_dir / SUPIR_FILES[variant]
        repack = supir_path.with_suffix(".safetensors")
        if not supir_path.is_file() and repack.is_file():
            supir_path = repack
    missing = [p for p in (sdxl_path, supir_path) if not p.is_file()]
    if missing:
        raise WeightsNotFoundError(weights_help(sdxl_path, supir_path, weights_dir, variant))
    return WeightPaths(sdxl_path, supir_path)


def weights_help(sdxl: Path, supir: Path, weights_dir: Path, variant: str) -> str:
    def state(p: Path) -> str:
        return "found" if p.is_file() else "NOT FOUND"

    return (
        "the model weights are missing. supir-rt needs two files:\n"
        f"  1. {SDXL_FILE}: SDXL base 1.0 with the 0.9 VAE, Stability AI's release "
        f"(stabilityai/stable-diffusion-xl-base-1.0)\n     looked for {sdxl}: {state(sdxl)}\n"
        f"  2. {SUPIR_FILES[variant]}: SUPIR v0{variant} from the SUPIR authors' release "
        f"(v0Q = quality, the default; v0F = fidelity, pick it with --supir-variant F)\n"
        f"     looked for {supir}: {state(supir)}\n"
        f"Put both files in {weights_dir} (change the folder with --weights-dir or ${ENV_WEIGHTS_DIR}), or give "
        f"each path with --sdxl/--supir, ${ENV_SDXL}/${ENV_SUPIR}, or a [weights] table in {default_config_path()}.\n"
        "To see the pipeline run without weights: supir-rt restore IMAGE --tiny-random"
    )


# --------------------------------------------------------------------------------------------------
# planning outputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, not recursive)."""
    images: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if is_image_file(f))
            if not found:
                raise ImageError(f"folder {p} contains no image files ({', '.join(sorted(OUTPUT_FORMATS))}, ...)")
            images.extend(found)
        elif p.exists():
            images.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder; check the path")
    return images


def plan_jobs(inputs: Sequence[Path], output: Path | None, *, ext: str, overwrite: bool) -> list[Job]:
    """One output per input, checked before any work: format, folder, no collisions, never an input."""
    given_dir = any(p.is_dir() for p in inputs)
    images = collect_inputs(inputs)
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() not in OUTPUT_FORMATS:
        raise ImageError(f"--ext {ext}: choose one of {', '.join(sorted(OUTPUT_FORMATS))}")
    as_file = output is not None and output.suffix.lower() in OUTPUT_FORMATS and not output.is_dir()
    if as_file:
        if len(images) != 1 or given_dir:
            raise ImageError(
                f"-o {output} is a file name but there are {len(images)} inputs; give a folder with -o for batches"
            )
        return [Job(images[0], check_output_path(output, images, overwrite=overwrite))]
    if output is not None and output.suffix and not output.is_dir() and output.suffix.lower() not in OUTPUT_FORMATS:
        raise ImageError(
            f"-o {output}: unknown image extension {output.suffix!r}; use one of {', '.join(sorted(OUTPUT_FORMATS))}, "
            "or a folder name"
        )
    folder = output if output is not None else DEFAULT_OUTPUT_DIR
    if folder.exists() and not folder.is_dir():
        raise ImageError(f"-o {folder} exists and is not a folder; choose another -o")
    if not folder.exists():
        check_writable_folder(folder.parent if str(folder.parent) else Path("."))
    else:
        check_writable_folder(folder)
    jobs: list[Job] = []
    seen: dict[Path, Path] = {}
    for src in images:
        target = folder / (src.stem + ext)
        key = target.resolve()
        if key in seen:
            raise ImageError(f"{src} and {seen[key]} would both be written to {target}; restore them into different folders")
        seen[key] = src
        if folder.exists():
            check_output_path(target, images, overwrite=overwrite)
        jobs.append(Job(src, target))
    return jobs


# --------------------------------------------------------------------------------------------------
# the restore command
# --------------------------------------------------------------------------------------------------


def _color_fix(value: str) -> str:
    try:
        return normalise_color_fix(value)
    except SettingError as err:
        raise argparse.ArgumentTypeError(err.fix) from None


def _memory(value: str) -> float:
    """``12``, ``12G``, ``12GiB``, ``512M`` -> GiB."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    scale = 1.0
    if text.endswith(("g", "m")):
        scale = 1.0 if text.endswith("g") else 1 / 1024
        text = text[:-1]
    try:
        gib = float(text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a memory size; use GiB like 12 or 12G, or 512M") from None
    if not gib > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: use a positive size, e.g. 12G")
    return gib


# RestoreConfig field -> the restore flag that sets it: the one table behind the settings flags, the
# overrides read from them and the error messages (which name the flag, not the field).
SETTING_FLAGS: dict[str, str] = {
    "sampler": "--sampler", "num_steps": "--steps", "cfg_scale": "--cfg", "cfg_scale_start": "--cfg-start",
    "use_linear_cfg": "--no-linear-cfg", "control_scale": "--control-scale",
    "control_scale_start": "--control-scale-start", "use_linear_control_scale": "--linear-control-scale",
    "restore_cfg": "--restore-cfg", "s_churn": "--s-churn", "s_noise": "--s-noise", "seed": "--seed",
    "upscale": "--upscale", "min_size": "--min-size", "color_fix_type": "--color-fix", "a_prompt": "--prompt",
    "n_prompt": "--negative-prompt", "quality_first": "--quality-first", "noise_device": "--noise-device",
    "tiling": "--tiling", "tile_size": "--tile-size", "tile_stride": "--tile-stride", "tile_batch": "--tile-batch",
    "vae_tile_size": "--vae-tile-size", "vae_tiling": "--vae-tiling", "max_memory_gb": "--max-memory",
    "preset": "--preset",
}

RESTORE_EXAMPLES = """\
examples:
  supir-rt restore photo.jpg -o photo_restored.png        one image (weights from ~/.cache/supir-rt/weights)
  supir-rt restore scans/ -o restored/ --preset quality   every image of a folder
  supir-rt restore photo.jpg --seed 7 --steps 50 --cfg 4.0 --restore-cfg 4
  supir-rt restore photo.jpg --preset lightning --sdxl Juggernaut_RunDiffusionPhoto2_Lightning_4Steps.safetensors
  supir-rt restore photo.jpg --backend onnxruntime --engines-dir engines/official
  supir-rt restore photo.jpg --caption "an old photo of a harbour."
  supir-rt restore photo.jpg --tiny-random                 no weights needed; the output is NOT a restoration

Every option and preset: docs/restore.md. Exit status: 0 ok, 2 bad option/input/setup, 130 interrupted.
"""


def add_restore_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "restore",
        help="restore images with SUPIR",
        description="Restore images with SUPIR (SDXL + SUPIR-v0Q/v0F). Defaults are the official test.py's; "
        "see docs/restore.md for every option and the presets.",
        epilog=RESTORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help=f"output file (one input) or folder (default: ./{DEFAULT_OUTPUT_DIR}/)")
    p.add_argument("--ext", default="png", help="output format for folder output (default png; png keeps alpha and metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")

    s = p.add_argument_group("restoration settings (official test.py names in brackets)")
    s.add_argument("--preset", choices=list(RESTORE_PRESETS), default="official",
                   help="starting values: official (test.py, default), paper, quality, fidelity, "
                   "lightning (DPM++ 8 steps, for SDXL Lightning finetunes)")
    s.add_argument("--sampler", choices=SAMPLERS, dest="sampler",
                   help="edm (official RestoreEDMSampler, default) or dpmpp2m-sde (few-step DPM++ 2M SDE of the "
                   "official Lightning config; ignores --restore-cfg, --s-churn, --linear-control-scale)")
    s.add_argument("--steps", type=int, dest="num_steps", help="sampler steps [--edm_steps] (50)")
    s.add_argument("--cfg", type=float, dest="cfg_scale", help="CFG scale reached at low noise [--s_cfg] (4.0)")
    s.add_argument("--cfg-start", type=float, dest="cfg_scale_start", help="CFG scale at high noise [--spt_linear_CFG] (1.0)")
    s.add_argument("--no-linear-cfg", action="store_false", dest="use_linear_cfg", default=None,
                   help="constant CFG = --cfg (test.py always uses linear CFG)")
    s.add_argument("--control-scale", type=float, dest="control_scale", help="control strength [--s_stage2] (1.0)")
    s.add_argument("--control-scale-start", type=float, dest="control_scale_start",
                   help="control strength at high noise, with --linear-control-scale [--spt_linear_s_stage2] (0.0)")
    s.add_argument("--linear-control-scale", action="store_true", dest="use_linear_control_scale", default=None,
                   help="ramp the control strength [--linear_s_stage2] (off)")
    s.add_argument("--restore-cfg", type=float, dest="restore_cfg",
                   help="restoration guidance τ_r; <= 0 disables it [--s_stage1] (-1)")
    s.add_argument("--s-churn", type=float, dest="s_churn", help="churn [--s_churn] (5)")
    s.add_argument("--s-noise", type=float, dest="s_noise", help="churn noise scale [--s_noise] (1.01)")
    s.add_argument("--seed", type=int, help="random seed, -1 = random [--seed] (1234)")
    s.add_argument("--upscale", type=float, help="output = upscale x input size [--upscale] (1)")
    s.add_argument("--min-size", type=int, dest="min_size", help="short side of the processing size [--min_size] (1024)")
    s.add_argument("--color-fix", type=_color_fix, dest="color_fix_type", metavar="{wavelet,adain,none}",
                   help="colour correction against the stage-1 image [--color_fix_type] (wavelet)")
    s.add_argument("--prompt", dest="a_prompt", help="quality prompt appended to the caption [--a_prompt]")
    s.add_argument("--negative-prompt", dest="n_prompt", help="negative prompt [--n_prompt]")
    s.add_argument("--quality-first", action="store_true", default=None, dest="quality_first",
                   help="put the quality prompt before the caption so long captions do not push it out")
    s.add_argument("--noise-device", dest="noise_device",
                   help="draw the sampler noise on this device; cuda reproduces an official GPU run (default cpu)")

    t = p.add_argument_group("tiling and memory (docs/tiling.md)")
    t.add_argument("--tiling", choices=TILINGS, default=None,
                   help="auto (default): tile the sampler and/or the VAE only when the untiled run would not fit "
                        "--max-memory; on: always tile; off: never")
    t.add_argument("--tile-size", type=int, dest="tile_size", metavar="PX",
                   help="sampler tile side in image px, multiple of 64 (1024, the official tiled sampler's)")
    t.add_argument("--tile-stride", type=int, dest="tile_stride", metavar="PX",
                   help="sampler tile stride in image px, multiple of 8, at most the tile size (512)")
    t.add_argument("--tile-batch", type=int, dest="tile_batch", metavar="N",
                   help="sampler tiles per network call (1); more is faster on a GPU with memory to spare")
    t.add_argument("--vae-tile-size", type=int, dest="vae_tile_size", metavar="PX",
                   help="tiled VAE tile side in image px, multiple of 64 (512)")
    t.add_argument("--vae-tiling", choices=VAE_TILING_MODES, dest="vae_tiling", default=None,
                   help="exact (default: equal to the untiled VAE up to float rounding), official (the official "
                        "--use_tile_vae output), none (never tile the VAE)")
    t.add_argument("--max-memory", type=_memory, dest="max_memory_gb", metavar="GIB",
                   help="working-memory budget for --tiling auto, in GiB (e.g. 12 or 12G; default: what the "
                        "device has free)")

    c = p.add_argument_group("captions (the official default runs LLaVA; here the default is no caption)")
    c.add_argument("--caption", default=None, help="use TEXT as the caption of every image")
    c.add_argument("--captioner", choices=("none", "text", "sidecar", "llava"), default=None,
                   help="none (default), sidecar (IMAGE.txt beside each image), llava (needs --llava-dir)")
    c.add_argument("--llava-dir", type=Path, default=None, help="exported LLaVA folder for --captioner llava")

    add_runtime_options(p)
    p.set_defaults(func=run_restore)
    return p


def _devices(value: str) -> list[str]:
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if len(devices) != 2:
        raise argparse.ArgumentTypeError(f"{value!r}: give two devices separated by a comma, e.g. cuda:0,cuda:1")
    return devices


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Weights, backend, device and logging flags, shared by every command that loads the model
    (``restore``, ``ui``); `build_restorer` reads them."""
    r = parser.add_argument_group("runtime and weights")
    r.add_argument("--sdxl", type=Path, help=f"SDXL base checkpoint ({SDXL_FILE}); env ${ENV_SDXL}")
    r.add_argument("--supir", type=Path, help=f"SUPIR checkpoint ({SUPIR_FILES['Q']} or {SUPIR_FILES['F']}); env ${ENV_SUPIR}")
    r.add_argument("--supir-variant", choices=("Q", "F", "q", "f"), default=None,
                   help="which SUPIR file to look for in the weights folder [--SUPIR_sign] (Q)")
    r.add_argument("--weights-dir", type=Path, help=f"folder holding both files; env ${ENV_WEIGHTS_DIR}")
    r.add_argument("--config", type=Path, help=f"settings file (default {default_config_path()}; env ${ENV_CONFIG})")
    r.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "onnxruntime-cuda", "tensorrt"), default=None,
                   help="network runtime (default auto: torch without --engines-dir)")
    r.add_argument("--engines-dir", type=Path, default=None, help="exported engines (onnxruntime/tensorrt backends)")
    r.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the diffusion networks (default fp32 on CPU, fp16 on CUDA) [--diff_dtype]")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    g = parser.add_argument_group("PyTorch backend speed and memory (docs/cuda.md)")
    g.add_argument("--vae-dtype", choices=("bf16", "fp32"), default=None,
                   help="precision of the VAE networks (default bf16 on CUDA, fp32 on CPU; never fp16: it overflows)")
    g.add_argument("--no-offload", action="store_false", dest="offload", default=None,
                   help="keep the VAE and text encoders on the GPU (default: they visit it only while they run)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet + adaptor (slow first step), "
                   "and on CUDA replay it from a CUDA graph")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode (default: default)")
    g.add_argument("--no-cuda-graphs", action="store_false", dest="cuda_graphs", default=None,
                   help="with --compile on CUDA: do not capture CUDA graphs")
    g.add_argument("--fp8-weights", action="store_true",
                   help="store the UNet + adaptor weights in fp8 (half the VRAM; GPUs with fp8: Ada, Hopper)")
    m = parser.add_argument_group("several GPUs and machines (docs/scale.md)")
    m.add_argument("--devices", type=_devices, default=None, metavar="A,B",
                   help="split placement over two devices: UNet + adaptor on A, text encoders + VAE on B "
                        "(e.g. cuda:0,cuda:1; PyTorch backend)")
    m.add_argument("--cfg-parallel", action="store_true", default=None,
                   help="with --devices: a second UNet + adaptor on B runs the conditional half of each CFG pair")
    m.add_argument("--tile-workers", type=int, default=None, metavar="N",
                   help="run the tiles of tiled sampler steps on N Ray actors (one GPU each on a GPU cluster)")
    m.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster for --tile-workers: auto, ray://HOST:10001 or HOST:6379 (default: a local Ray)")
    r.add_argument("--max-pixels", type=int, default=None,
                   help="largest input image in pixels (decompression-bomb guard, default 64 Mpx)")
    r.add_argument("--tiny-random", action="store_true",
                   help="run the tiny configuration with random weights (no download; output is NOT a restoration)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress, no notes: warnings and errors only")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print the time spent in each phase (load, caption, encode, sampling, decode, save) at the end")
    r.add_argument("--debug", action="store_true", help="show tracebacks")


def restore_config_from_args(args: argparse.Namespace) -> RestoreConfig:
    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS if name != "preset"}
    if args.tiny_random:
        for name, value in TINY_DEFAULTS.items():
            if overrides.get(name) is None:
                overrides[name] = value
    return restore_preset(args.preset).with_overrides(**overrides)


def make_captioner_from_args(args: argparse.Namespace) -> Any:
    kind = args.captioner or ("text" if args.caption is not None else "none")
    if kind == "none":
        return None
    from supir_rt.caption import make_captioner

    if kind == "text":
        if args.caption is None:
            raise SetupError("--captioner text needs --caption TEXT")
        return make_captioner("text", text=args.caption)
    if kind == "llava":
        from supir_rt.caption.layout import ENV_MODEL_DIR

        if args.llava_dir is None and not os.environ.get(ENV_MODEL_DIR):
            raise SetupError(
                f"--captioner llava needs --llava-dir DIR, an exported LLaVA folder (or ${ENV_MODEL_DIR}); export one "
                "with python export/export_llava.py (see docs/captions.md)"
            )
        return make_captioner("llava", model_dir=args.llava_dir)
    return make_captioner(kind)


def build_restorer(args: argparse.Namespace, file_cfg: Mapping[str, Any]) -> Any:
    import torch

    from supir_rt.api import Restorer

    rt = file_cfg.get("runtime", {})
    device = args.device or rt.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or rt.get("dtype") or ("fp16" if str(device).startswith("cuda") else "fp32")
    backend = args.backend or rt.get("backend") or "auto"
    engines_dir = args.engines_dir or rt.get("engines_dir")
    # progress: the command activates its own `Progress` (run_restore), the Restorer adds none
    options: dict[str, Any] = {"progress": False, "captioner": make_captioner_from_args(args)}
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    torch_opts = torch_options_from_args(args)
    flag = lambda name: getattr(args, name, None)  # noqa: E731 - namespaces built by other commands may lack them
    given = [name for name, on in (
        ("--vae-dtype", flag("vae_dtype")), ("--no-offload", flag("offload") is False), ("--compile", flag("compile")),
        ("--compile-mode", flag("compile_mode")), ("--no-cuda-graphs", flag("cuda_graphs") is False),
        ("--fp8-weights", flag("fp8_weights")), ("--devices", flag("devices")),
        ("--cfg-parallel", flag("cfg_parallel"))) if on]
    if given and (backend not in ("auto", "torch") or (engines_dir is not None and backend != "torch")):
        raise SetupError(f"{', '.join(given)}: PyTorch backend options; drop them or use --backend torch")
    scale = scale_options_from_args(args)
    if scale.get("devices") and args.device:
        raise SetupError("--device and --devices: give one of them (--devices A,B splits the networks over two)")
    if scale.get("devices"):
        device = scale["devices"][0]
        dtype = args.dtype or rt.get("dtype") or ("fp16" if str(device).startswith("cuda") else "fp32")
    if args.tiny_random:
        return Restorer.tiny_random(device=device, dtype=dtype, backend=backend, engines_dir=engines_dir,
                                    **torch_opts, **scale, **options)
    if engines_dir is not None and backend != "torch":
        if scale:
            raise SetupError(f"{', '.join('--' + k.replace('_', '-') for k in scale)}: not available with "
                             "--engines-dir yet; use the PyTorch backend with the checkpoint files")
        return Restorer.from_engines(engines_dir, backend=backend, dtype=dtype, **options)
    weights = find_weights(args, file_cfg)
    return Restorer.from_weights(weights.sdxl, weights.supir, device=device, dtype=dtype, backend=backend,
                                 engines_dir=engines_dir, **torch_opts, **scale, **options)


def scale_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`Restorer`'s several-devices keyword arguments from --devices / --cfg-parallel / --tile-workers /
    --ray-address (only those given)."""
    flag = lambda name: getattr(args, name, None)  # noqa: E731
    out: dict[str, Any] = {}
    if flag("devices"):
        out["devices"] = flag("devices")
    if flag("cfg_parallel"):
        out["cfg_parallel"] = True
    if flag("ray_address") and not flag("tile_workers"):
        raise SetupError("--ray-address is for --tile-workers N; add it or drop --ray-address")
    if flag("tile_workers") is not None:
        if flag("tile_workers") < 1:
            raise SetupError(f"--tile-workers {flag('tile_workers')}: give at least 1")
        out["tile_workers"] = flag("tile_workers")
        out["ray_address"] = flag("ray_address")
    return out


def torch_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The torch backend's keyword arguments of `Restorer` from the flags (None / False when not given)."""
    from supir_rt.backends.torch_backend import TorchOptions

    compile_ = bool(getattr(args, "compile", False))
    options = None
    if compile_ or getattr(args, "cuda_graphs", None) is not None:
        options = TorchOptions(compile=compile_, compile_mode=getattr(args, "compile_mode", None) or "default",
                               cuda_graphs=getattr(args, "cuda_graphs", None))
    return {"vae_dtype": getattr(args, "vae_dtype", None), "offload": getattr(args, "offload", None),
            "fp8_weights": bool(getattr(args, "fp8_weights", False)), "torch_options": options}


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as one ``error:`` line: `UserError` only (bad option, input or setup);
    anything else is a bug and keeps its traceback."""
    return (UserError,)


def run_restore(args: argparse.Namespace) -> int:
    """The ``restore`` sub-command; returns the exit code (0 ok, 2 bad input or setup)."""
    progress = Progress(display=False if args.quiet else None)
    if progress.display or args.verbose:
        with progress:  # the pipeline's phases report to it (per-step timing: a StepInfo per step)
            code = _restore_all(args, progress)
    else:  # nobody looks: no per-step callback at all in the sampler loop
        code = _restore_all(args, progress)
    if getattr(args, "verbose", False) and progress.totals:
        print(progress.summary_line(), file=sys.stderr)
    return code


def _restore_all(args: argparse.Namespace, progress: Progress) -> int:
    try:
        config = restore_config_from_args(args)
        jobs = plan_jobs(args.inputs, args.output, ext=args.ext, overwrite=args.overwrite)
        file_cfg = read_config_file(args.config)
        if args.tiny_random:
            log.info(
                "note: --tiny-random runs the tiny configuration with RANDOM weights: the output is NOT a "
                "restoration, it only shows the whole pipeline running end to end "
                f"(steps {config.num_steps}, min-size {config.min_size})."
            )
        with progress.phase("load"):
            restorer = build_restorer(args, file_cfg)
    except UserError as err:
        if args.debug:
            raise
        _error(err)
        return 2
    failed = 0
    try:
        for index, job in enumerate(jobs):
            job.output.parent.mkdir(parents=True, exist_ok=True)
            try:
                with progress.image(index, len(jobs)):
                    restored = restorer.restore_file(job.source, job.output, config, caption=args.caption,
                                                     overwrite=args.overwrite)
            except UserError as err:
                if args.debug:
                    raise
                _error(err)
                failed += 1
                continue
            log.info("%s -> %s (seed %d)", job.source, job.output, restored.result.seed)
    except KeyboardInterrupt:
        progress.clear()
        print("interrupted; finished outputs are complete, nothing was written half", file=sys.stderr)
        return 130
    finally:
        restorer.close()
    if failed:
        if len(jobs) > 1:
            print(f"error: {failed} of {len(jobs)} images failed", file=sys.stderr)
        return 2
    return 0


def _error(err: BaseException) -> None:
    """One ``error:`` line; a bad setting names the flag (``--steps 0``), not the field."""
    progress = active_progress()
    if progress is not None:
        progress.clear()
    message = err.for_flags(SETTING_FLAGS) if isinstance(err, SettingError) else str(err)
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


class _ProgressAwareHandler(logging.StreamHandler):
    """Erases the progress status line before a log line, so that the two do not mix."""

    def emit(self, record: logging.LogRecord) -> None:
        progress = active_progress()
        if progress is not None:
            progress.clear()
        super().emit(record)


def build_parser() -> argparse.ArgumentParser:
    from supir_rt import __version__

    parser = argparse.ArgumentParser(
        prog="supir-rt", description="SUPIR image restoration runtime",
        epilog="examples:\n  supir-rt restore photo.jpg -o restored.png\n  supir-rt restore --help      every restore "
        "option, with examples\n  supir-rt caption photo.jpg --model-dir llava-13b-onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"supir-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_restore_parser(sub)
    try:
        from supir_rt.caption.cli import add_caption_parser
    except ImportError:
        pass
    else:
        add_caption_parser(sub)
    from supir_rt.ui.cli import add_ui_parser  # gradio itself is imported only when the command runs

    add_ui_parser(sub)
    from supir_rt.serve.cli import add_serving_parsers  # serve, triton-repo, triton

    add_serving_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo after the sub-command: show that sub-command's usage, not the top-level one
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        (commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(message)s"))
    root = logging.getLogger("supir_rt")
    saved = root.handlers[:], root.level, root.propagate
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    root.propagate = False
    try:
        return args.func(args)
    finally:  # the CLI's logging lasts as long as the command: embedding processes keep theirs
        root.handlers[:], root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
