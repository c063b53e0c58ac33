"""``supir-rt restore``: parse flags into a `RestoreConfig`, load the runtime (`supir_rt.runtime`), plan
every output before any work, then restore image by image through `supir_rt.api.Restorer`. A bad option, input or setup (any
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

from supir_rt.errors import SettingError, SetupError, UserError
from supir_rt.images import OUTPUT_FORMATS, ImageError, check_output_path, check_writable_folder, is_image_file
from supir_rt.progress import Progress
from supir_rt import runtime
from supir_rt.runtime import TINY_DEFAULTS, add_runtime_options, options_from_args, read_config_file, report_error
from supir_rt.restore_config import (
    RESTORE_PRESETS, SAMPLERS, TILINGS, VAE_TILING_MODES, RestoreConfig, normalise_color_fix, restore_preset,
    settings_from_png, tiny_random_defaults,
)

log = logging.getLogger("supir_rt")

DEFAULT_OUTPUT_DIR = Path("restored")



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
    "tile_captions": "--tile-captions", "preset": "--preset",
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
    s.add_argument("--settings-from", type=Path, metavar="PNG", default=None,
                   help="start from the settings, seed and caption stored in a PNG written by supir-rt (reproduces "
                   "it from the same input); flags given as well change those settings")
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
    c.add_argument("--tile-captions", action="store_true", default=None, dest="tile_captions",
                   help="with a sampler-tiled restore and a captioner that looks at the image (llava, hf): caption "
                        "every tile's region and condition the tile with its own caption (docs/captions.md)")
    c.add_argument("--caption", default=None, help="use TEXT as the caption of every image")
    c.add_argument("--captioner", choices=("none", "text", "sidecar", "llava", "hf"), default=None,
                   help="none (default), sidecar (IMAGE.txt beside each image), llava (needs --llava-dir), "
                        "hf (a local transformers vision-language model, needs --caption-model)")
    c.add_argument("--llava-dir", type=Path, default=None, help="exported LLaVA folder for --captioner llava")
    c.add_argument("--caption-model", type=Path, default=None,
                   help="transformers image-text-to-text model folder for --captioner hf (e.g. SmolVLM)")
    c.add_argument("--caption-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the --captioner hf model (default fp32 on CPU, fp16 on CUDA)")

    add_runtime_options(p)
    p.set_defaults(func=run_restore)
    return p


def restore_config_from_args(args: argparse.Namespace) -> RestoreConfig:
    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS if name != "preset"}
    base = restore_preset(args.preset)
    if getattr(args, "settings_from", None) is not None:  # a PNG's settings (and caption); flags still win
        base, caption = settings_from_png(args.settings_from)
        if args.caption is None and getattr(args, "captioner", None) is None:
            args.caption = caption
        return base.with_overrides(**overrides)
    if args.tiny_random:
        for name, value in tiny_random_defaults(base).items():
            if overrides.get(name) is None:
                overrides[name] = value
    return base.with_overrides(**overrides)


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
    if kind == "hf":
        return make_captioner("hf", model_dir=args.caption_model, device=args.device, dtype=args.caption_dtype)
    return make_captioner(kind)


def build_restorer(args: argparse.Namespace, file_cfg: Mapping[str, Any]) -> Any:
    """The `Restorer` the restore flags ask for (`supir_rt.runtime.build_restorer`)."""
    # progress: the command activates its own `Progress` (run_restore), the Restorer adds none
    kwargs: dict[str, Any] = {"progress": False, "captioner": make_captioner_from_args(args)}
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    return runtime.build_restorer(options_from_args(args, file_cfg), **kwargs)


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
    report_error(err, SETTING_FLAGS)
