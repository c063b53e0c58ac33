"""Runtime options -> `Restorer`: the one place that turns "which weights, which backend, which precision"
into a loaded restorer, for the CLI (``restore``), the UI and the servers.

* `RuntimeOptions`: the options as data (pickles: Ray replicas and Triton models receive it);
* `add_runtime_options` / `add_torch_options`: the flags that set them, shared by every command;
* `options_from_args`: flags + the settings file (``[runtime]``) -> `RuntimeOptions`;
* `find_weights`, `read_config_file`: the weights lookup (flags, environment, settings file, weights folder);
* `build_restorer`: `RuntimeOptions` -> `Restorer` (tiny random model, exported engines or checkpoints).

Nothing here imports torch at module level: ``supir-rt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from supir_rt.errors import SettingError, SetupError

SDXL_FILE = "sd_xl_base_1.0_0.9vae.safetensors"  # also `supir_rt.loading.SDXL_FILE`
SUPIR_FILES = {"Q": "SUPIR-v0Q.ckpt", "F": "SUPIR-v0F.ckpt"}
ENV_SDXL = "SUPIR_RT_SDXL"
ENV_SUPIR = "SUPIR_RT_SUPIR"
ENV_WEIGHTS_DIR = "SUPIR_RT_WEIGHTS_DIR"
ENV_CONFIG = "SUPIR_RT_CONFIG"
BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx")
# --tiny-random defaults that keep a CPU run to about a minute (explicit flags win).
TINY_DEFAULTS = {"num_steps": 4, "min_size": 256}


class WeightsNotFoundError(SetupError):
    """The checkpoint files are not where any of the lookups point."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How to load the runtime: the runtime flags of every command, as data that pickles."""

    tiny_random: bool = False
    sdxl: str | None = None
    supir: str | None = None
    engines_dir: str | None = None
    backend: str = "auto"
    device: str | None = None  # None: cuda when there is a GPU, else cpu
    dtype: str | None = None  # None: fp16 on cuda, fp32 on cpu
    captioner: str = "none"  # none | llava | hf (text and sidecar captioners are the restore command's)
    llava_dir: str | None = None
    caption_model: str | None = None  # transformers image-text-to-text model folder for captioner hf
    vae_dtype: str | None = None  # torch backend: bf16 | fp32 (None: bf16 on cuda, fp32 on cpu)
    offload: bool | None = None  # torch backend: None = offload the VAE / text encoders on cuda
    compile: bool = False  # torch backend: torch.compile the UNet + adaptor
    compile_mode: str | None = None
    cuda_graphs: bool | None = None
    fp8_weights: bool = False
    devices: tuple[str, ...] | None = None  # torch backend: split placement over two devices (docs/scale.md)
    cfg_parallel: bool = False  # with devices: a UNet twin on the second runs the conditional CFG half
    tile_workers: int = 0  # tiled steps on N Ray actors
    ray_address: str | None = None  # None: a local Ray (127.0.0.1)
    tile_workers_above: int = 0  # processing pixels from which a tiled restore uses the workers (0: every one)
    tile_worker_cpus: float = 1.0  # CPUs Ray reserves per tile worker

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def torch_flags(self) -> list[str]:
        """The PyTorch-backend flags these options set (for the error when another backend is chosen)."""
        return [flag for flag, on in (
            ("--vae-dtype", self.vae_dtype), ("--no-offload", self.offload is False), ("--compile", self.compile),
            ("--compile-mode", self.compile_mode), ("--no-cuda-graphs", self.cuda_graphs is False),
            ("--fp8-weights", self.fp8_weights), ("--devices", self.devices),
            ("--cfg-parallel", self.cfg_parallel)) if on]

    def scale(self) -> dict[str, Any]:
        """`Restorer`'s several-devices keyword arguments (only those set), checked (docs/scale.md)."""
        if self.devices and self.device:
            raise SetupError("--device and --devices: give one of them (--devices A,B splits the networks over two)")
        if self.ray_address and not self.tile_workers:
            raise SetupError("--ray-address is for --tile-workers N; add it or drop --ray-address")
        if self.tile_workers < 0:
            raise SetupError(f"--tile-workers {self.tile_workers}: give at least 1")
        if self.tile_workers_above < 0 or self.tile_worker_cpus < 0:
            flag, value = (("--tile-workers-above", self.tile_workers_above) if self.tile_workers_above < 0
                           else ("--tile-worker-cpus", self.tile_worker_cpus))
            raise SetupError(f"{flag} {value:g}: give a number >= 0")
        if not self.tile_workers and (self.tile_workers_above or self.tile_worker_cpus != 1.0):
            flag = "--tile-workers-above" if self.tile_workers_above else "--tile-worker-cpus"
            raise SetupError(f"{flag} is for --tile-workers N; add it or drop {flag}")
        out: dict[str, Any] = {}
        if self.devices:
            out["devices"] = list(self.devices)
        if self.cfg_parallel:
            out["cfg_parallel"] = True
        if self.tile_workers:
            out.update(tile_workers=self.tile_workers, ray_address=self.ray_address,
                       tile_workers_above=self.tile_workers_above, tile_worker_cpus=self.tile_worker_cpus)
        return out


# --------------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------------


def _devices(value: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in value.split(",") if d.strip())
    if len(devices) != 2:
        raise argparse.ArgumentTypeError(f"{value!r}: give two devices separated by a comma, e.g. cuda:0,cuda:1")
    return devices


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    """Several GPUs and machines for one restore (docs/scale.md)."""
    m = parser.add_argument_group("several GPUs and machines (docs/scale.md)")
    m.add_argument("--devices", type=_devices, default=None, metavar="A,B",
                   help="split placement over two devices: UNet + adaptor on A, text encoders + VAE on B "
                        "(e.g. cuda:0,cuda:1; PyTorch backend)")
    m.add_argument("--cfg-parallel", action="store_true", default=None,
                   help="with --devices: a second UNet + adaptor on B runs the conditional half of each CFG pair")
    add_tile_worker_options(m)


def add_tile_worker_options(group: Any) -> None:
    """``--tile-workers`` and its options (the restore command's and the servers'; docs/scale.md)."""
    group.add_argument("--tile-workers", type=int, default=None, metavar="N",
                       help="run the tiles of tiled sampler steps on N Ray actors (one GPU each on a GPU cluster)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster for --tile-workers: auto, ray://HOST:10001 or HOST:6379 "
                            "(default: a local Ray)")
    group.add_argument("--tile-workers-above", type=int, default=None, metavar="PIXELS",
                       help="with --tile-workers: only tiled restores of at least PIXELS processing pixels (width x "
                            "height) use the workers; smaller ones run here (default 0: every tiled restore)")
    group.add_argument("--tile-worker-cpus", type=float, default=None, metavar="C",
                       help="CPUs Ray reserves per tile worker (default 1; a fraction lets them share CPUs)")


def add_torch_options(parser: argparse.ArgumentParser) -> None:
    """The PyTorch backend's speed and memory flags (every command that loads the model has them)."""
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


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Weights, backend, device and logging flags, shared by the commands that load the model here
    (``restore``, ``ui``); `options_from_args` reads them."""
    r = parser.add_argument_group("runtime and weights")
    r.add_argument("--sdxl", type=Path, help=f"SDXL base checkpoint ({SDXL_FILE}); env ${ENV_SDXL}")
    r.add_argument("--supir", type=Path, help=f"SUPIR checkpoint ({SUPIR_FILES['Q']} or {SUPIR_FILES['F']}); env ${ENV_SUPIR}")
    r.add_argument("--supir-variant", choices=("Q", "F", "q", "f"), default=None,
                   help="which SUPIR file to look for in the weights folder [--SUPIR_sign] (Q)")
    r.add_argument("--weights-dir", type=Path, help=f"folder holding both files; env ${ENV_WEIGHTS_DIR}")
    r.add_argument("--config", type=Path, help=f"settings file (default {default_config_path()}; env ${ENV_CONFIG})")
    r.add_argument("--backend", choices=BACKENDS, default=None,
                   help="network runtime (default auto: torch without --engines-dir)")
    r.add_argument("--engines-dir", type=Path, default=None, help="exported engines (onnxruntime/tensorrt backends)")
    r.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the diffusion networks (default fp32 on CPU, fp16 on CUDA) [--diff_dtype]")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    add_torch_options(parser)
    add_scale_options(parser)
    r.add_argument("--max-pixels", type=int, default=None,
                   help="largest input image in pixels (decompression-bomb guard, default 64 Mpx)")
    r.add_argument("--tiny-random", action="store_true",
                   help="run the tiny configuration with random weights (no download; output is NOT a restoration)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress, no notes: warnings and errors only")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print the time spent in each phase (load, caption, encode, sampling, decode, save) at the end")
    r.add_argument("--debug", action="store_true", help="show tracebacks")


def options_from_args(args: argparse.Namespace, file_cfg: Mapping[str, Any] | None = None, *,
                      find: bool = True) -> RuntimeOptions:
    """`RuntimeOptions` from the flags, with the settings file's ``[runtime]`` values where no flag is
    given. ``find``: look the weights up (`find_weights`) unless the tiny model or engines are used."""
    file_cfg = file_cfg or {}
    rt = file_cfg.get("runtime", {})
    flag = lambda name: getattr(args, name, None)  # noqa: E731 - namespaces of other commands may lack some
    engines_dir = flag("engines_dir") or rt.get("engines_dir")
    backend = flag("backend") or rt.get("backend") or "auto"
    sdxl = supir = None
    if find and not flag("tiny_random") and not (engines_dir is not None and backend != "torch"):
        weights = find_weights(args, file_cfg)
        sdxl, supir = str(weights.sdxl), str(weights.supir)
    return RuntimeOptions(
        tiny_random=bool(flag("tiny_random")), sdxl=sdxl, supir=supir,
        engines_dir=str(engines_dir) if engines_dir is not None else None, backend=backend,
        device=flag("device") or rt.get("device"), dtype=flag("dtype") or rt.get("dtype"),
        captioner=flag("captioner") if flag("captioner") in IMAGE_CAPTIONERS else "none",
        llava_dir=str(flag("llava_dir")) if flag("llava_dir") else None,
        caption_model=str(flag("caption_model")) if flag("caption_model") else None, vae_dtype=flag("vae_dtype"),
        offload=flag("offload"), compile=bool(flag("compile")), compile_mode=flag("compile_mode"),
        cuda_graphs=flag("cuda_graphs"), fp8_weights=bool(flag("fp8_weights")),
        devices=flag("devices"), cfg_parallel=bool(flag("cfg_parallel")), **tile_worker_fields(args),
    )


def tile_worker_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The tile-worker fields of `RuntimeOptions` from the flags of `add_tile_worker_options`, checked."""
    flag = lambda name: getattr(args, name, None)  # noqa: E731
    cpus = flag("tile_worker_cpus")
    out = {"tile_workers": flag("tile_workers") or 0, "ray_address": flag("ray_address"),
           "tile_workers_above": flag("tile_workers_above") or 0, "tile_worker_cpus": 1.0 if cpus is None else cpus}
    RuntimeOptions(**out).scale()
    return out


# --------------------------------------------------------------------------------------------------
# settings file and weights lookup
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
            raise SetupError(f"config file {path}: unknown keys {sorted(unknown)} in [{table}]; "
                               f"known: {sorted(known[table])}")
    doc["_path"] = str(path)
    return doc


@dataclass(frozen=True)
class WeightPaths:
    sdxl: Path
    supir: Path


def find_weights(args: Any, file_cfg: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> WeightPaths:
    """Flags (``args.sdxl``, ``supir``, ``weights_dir``, ``supir_variant``), then environment variables,
    then the settings file, then the weights folder."""
    w = file_cfg.get("weights", {})
    get = lambda name: getattr(args, name, None)  # noqa: E731
    weights_dir = Path(get("weights_dir") or env.get(ENV_WEIGHTS_DIR) or w.get("dir")
                       or default_weights_dir(env)).expanduser()
    variant = (get("supir_variant") or w.get("variant") or "Q").upper()
    if variant not in SUPIR_FILES:
        raise SetupError(f"SUPIR variant {variant!r}: choose Q (quality, default) or F (fidelity)")
    sdxl = get("sdxl") or env.get(ENV_SDXL) or w.get("sdxl")
    supir = get("supir") or env.get(ENV_SUPIR) or w.get("supir")
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
        raise WeightsNotFoundError(weights_help(sdxl_path, supir_path, weights_dir, variant,
                                                command=get("command") or "restore"))
    return WeightPaths(sdxl_path, supir_path)


def weights_help(sdxl: Path, supir: Path, weights_dir: Path, variant: str, command: str = "restore") -> str:
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
        f"To see the pipeline run without weights: supir-rt {command}{' IMAGE' if command == 'restore' else ''} "
        "--tiny-random"
    )


# --------------------------------------------------------------------------------------------------
# building the restorer
# --------------------------------------------------------------------------------------------------


IMAGE_CAPTIONERS = ("none", "llava", "hf")
"""The captioners the runtime options name (the servers' and the UI's ``--captioner``)."""


def open_captioner(options: RuntimeOptions, device: str) -> Any:
    """The image captioner ``options.captioner`` names (llava or hf), checked for its folder flag."""
    from supir_rt.caption import make_captioner

    if options.captioner == "llava":
        return make_captioner("llava", model_dir=options.llava_dir)
    if options.caption_model is None:
        raise SetupError("--captioner hf needs --caption-model DIR (a transformers image-text-to-text model folder, "
                         "e.g. SmolVLM; docs/captions.md)")
    return make_captioner("hf", model_dir=options.caption_model, device=device)


def build_restorer(options: RuntimeOptions, **restorer_kwargs: Any) -> Any:
    """The `Restorer` for ``options`` (engines opened once; call it in the process that restores).
    ``restorer_kwargs`` go to the `Restorer` (captioner, limits, progress); with no captioner given,
    ``options.captioner`` llava loads LLaVA from ``llava_dir`` and hf the transformers model folder
    ``caption_model`` (on the restorer's device)."""
    from supir_rt import cuda_runtime
    from supir_rt.api import Restorer

    scale = options.scale()
    device = (options.devices[0] if options.devices else options.device) or (
        "cuda" if cuda_runtime.is_available() else "cpu")
    dtype = options.dtype or ("fp16" if str(device).startswith("cuda") else "fp32")
    backend, engines_dir = options.backend, options.engines_dir
    given = options.torch_flags()
    if given and (backend not in ("auto", "torch") or (engines_dir is not None and backend != "torch")):
        raise SetupError(f"{', '.join(given)}: PyTorch backend options; drop them or use --backend torch")
    if options.captioner not in IMAGE_CAPTIONERS:
        raise SetupError(f"captioner {options.captioner!r}: choose one of {', '.join(IMAGE_CAPTIONERS)}")
    if options.captioner != "none" and restorer_kwargs.get("captioner") is None:
        restorer_kwargs["captioner"] = open_captioner(options, str(device))
    workers, address = scale.pop("tile_workers", 0), scale.pop("ray_address", None)
    pool = {"min_pixels": scale.pop("tile_workers_above", 0), "num_cpus": scale.pop("tile_worker_cpus", 1.0)}
    artifacts = engines_dir is not None and backend != "torch" and not options.tiny_random
    if workers and address is not None:
        from supir_rt.tile_workers import connect_ray

        connect_ray(address)  # before loading anything: an address that does not answer fails fast
    if options.tiny_random:
        kwargs = dict(device=device, dtype=dtype, backend=backend, engines_dir=engines_dir, **torch_options(options))
        return _with_workers(Restorer.tiny_random(**kwargs, **scale, **restorer_kwargs), "tiny_random", kwargs,
                             workers, address, **pool)
    if artifacts:
        kwargs = dict(engines_dir=engines_dir, backend=backend, dtype=dtype)
        return _with_workers(Restorer.from_engines(**kwargs, **restorer_kwargs), "from_engines", kwargs, workers,
                             address, **pool)
    if not (options.sdxl and options.supir):
        raise SetupError("the weights are needed: pass --sdxl and --supir (or --weights-dir), or --engines-dir, "
                           "or --tiny-random")
    kwargs = dict(sdxl=options.sdxl, supir=options.supir, device=device, dtype=dtype, backend=backend,
                  engines_dir=engines_dir, **torch_options(options))
    return _with_workers(Restorer.from_weights(**kwargs, **scale, **restorer_kwargs), "from_weights", kwargs,
                         workers, address, **pool)


def _with_workers(restorer: Any, constructor: str, kwargs: dict[str, Any], workers: int, address: str | None,
                  **pool: Any) -> Any:
    """``restorer`` with ``workers`` tile workers built like it (one device each: ``cuda`` as Ray
    assigns it, or the CPU; exported engines open on the device their backend uses), or as it is when no
    workers are asked for. ``pool``: `attach_tile_workers`'s ``min_pixels`` and ``num_cpus``."""
    if not workers:
        return restorer
    from supir_rt.tile_workers import WorkerRecipe, attach_tile_workers

    gpu = restorer.engines["unet_adaptor"].device.type == "cuda"
    recipe = {**kwargs, "progress": False, "max_pixels": None}
    if "device" in kwargs:
        recipe["device"] = "cuda" if gpu else "cpu"
    attach_tile_workers(restorer, WorkerRecipe(constructor, recipe), workers, address, gpu=gpu, **pool)
    return restorer


def torch_options(options: RuntimeOptions) -> dict[str, Any]:
    """The torch backend's keyword arguments of `Restorer` (None / False when not given)."""
    from supir_rt.backends.torch_backend import TorchOptions

    compiled = None
    if options.compile or options.cuda_graphs is not None:
        compiled = TorchOptions(compile=options.compile, compile_mode=options.compile_mode or "default",
                                cuda_graphs=options.cuda_graphs)
    return {"vae_dtype": options.vae_dtype, "offload": options.offload, "fp8_weights": options.fp8_weights,
            "torch_options": compiled}


def report_error(err: BaseException | str, flags: Mapping[str, str] | None = None) -> None:
    """One ``error:`` line on stderr (the progress line cleared first); a bad setting names the flag
    (``--steps 0``) when ``flags`` maps `RestoreConfig` fields to flags."""
    from supir_rt.progress import active as active_progress

    progress = active_progress()
    if progress is not None:
        progress.clear()
    message = err.for_flags(flags or {}) if isinstance(err, SettingError) else str(err)
    print(f"error: {message}", file=sys.stderr)


RUNTIME_FIELDS = tuple(f.name for f in fields(RuntimeOptions))

__all__ = [
    "BACKENDS", "ENV_CONFIG", "ENV_SDXL", "ENV_SUPIR", "ENV_WEIGHTS_DIR", "RUNTIME_FIELDS", "RuntimeOptions",
    "TINY_DEFAULTS", "WeightPaths", "WeightsNotFoundError", "add_runtime_options", "add_tile_worker_options",
    "add_torch_options", "build_restorer", "default_config_path", "default_weights_dir", "find_weights",
    "options_from_args", "read_config_file", "report_error", "tile_worker_fields", "torch_options", "weights_help",
]
