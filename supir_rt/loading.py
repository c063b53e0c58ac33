"""Opening the five engines a `Restorer` runs: from the official checkpoints (torch backend, with the
memory placement, fp8 weights and torch.compile options), from exported engines (onnxruntime, tensorrt),
or from the tiny configuration with random weights. Errors the user can fix are `SetupError`s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from supir_rt.backends import Engine, open_engines
from supir_rt.config import ModelConfig
from supir_rt.errors import SetupError

log = logging.getLogger("supir_rt.api")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL_FILE = "sd_xl_base_1.0_0.9vae.safetensors"
SUPIR_FILES = {"Q": "SUPIR-v0Q.ckpt", "F": "SUPIR-v0F.ckpt"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise SetupError(f"dtype {name}: choose fp32, fp16 or bf16")
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise SetupError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def check_device(device: str | torch.device) -> torch.device:
    """The device to compute on, normalised (``cuda`` -> ``cuda:N`` of the current GPU); a device this
    machine or this PyTorch build does not have is refused with one line, before any weights are loaded."""
    from supir_rt import cuda_runtime

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SetupError(f"device {device!r} is not a device name ({err}); use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SetupError(f"device {device!r}: supir-rt runs on cpu or cuda[:N]")
    if dev.type == "cuda":
        if not cuda_runtime.built_with_cuda():
            raise SetupError(f"device {device!r}: this PyTorch ({torch.__version__}) is a CPU-only build; install a "
                             "CUDA build of torch (pytorch.org/get-started) or use --device cpu")
        count = cuda_runtime.device_count()
        if count == 0:
            raise SetupError(f"device {device!r}: this machine has no usable CUDA GPU (no driver or no device); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise SetupError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0"
                             f"{f' to cuda:{count - 1}' if count > 1 else ''}; pick one of those")
    return cuda_runtime.normalize_device(dev)


def _warn_precision(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("fp16 on CPU is very slow (about 70x slower than fp32 in PyTorch); use --dtype fp32 on CPU")


def _memory_plan(device: torch.device, dtype: torch.dtype, vae_dtype: str | None, offload: bool | None):
    """The torch backend's placement: UNet + adaptor in ``dtype`` resident; on CUDA the VAE (bf16 by
    default; never fp16, it overflows) and the text encoders (fp16) visit the GPU only while they run."""
    from supir_rt.backends.placement import MemoryPlan

    try:
        return MemoryPlan.for_device(device, diffusion_dtype=dtype, offload=offload,
                                     vae_dtype=parse_dtype(vae_dtype) if vae_dtype else None)
    except ValueError as err:
        raise SetupError(f"--vae-dtype {vae_dtype}: {err}") from None


def split_plan(devices: Sequence[str | torch.device], dtype: torch.dtype, vae_dtype: str | None,
               model_config: ModelConfig, *, capacity: Callable[[torch.device], int] | None = None):
    """Split placement over two devices (`MemoryPlan.split`: UNet + adaptor on the first; text encoders,
    VAE and DR encoder on the second), after checking that both exist and that each holds its share's
    weights plus the working memory of its largest network at 1024² (`supir_rt.memory`'s estimates: the
    UNet's CFG pair, the VAE tiled as the tiling planner would). ``capacity(device) -> bytes`` defaults
    to the GPU's total memory; larger images are then tiled by the tiling planner as on one device."""
    from supir_rt.backends.placement import NETWORK_PARTS, MemoryPlan, weight_bytes_per_device
    from supir_rt.tiling.policy import tiled_vae_bytes, unet_bytes
    from supir_rt.model.supir import build_model

    from supir_rt import cuda_runtime

    devs = [check_device(d) for d in devices]
    if len(devs) != 2 or devs[0] == devs[1]:
        raise SetupError(f"--devices {','.join(map(str, devices))}: give two different devices, the first for the "
                         "UNet + adaptor, the second for the text encoders and the VAE (e.g. cuda:0,cuda:1)")
    for d in devs:
        count = cuda_runtime.device_count()
        if d.type == "cuda" and (d.index or 0) >= count:
            raise SetupError(f"--devices: {d} does not exist; this machine has {count} CUDA device(s) "
                             f"(cuda:0 .. cuda:{count - 1})")
    try:
        plan = MemoryPlan.split((devs[0], devs[1]), diffusion_dtype=dtype,
                                vae_dtype=parse_dtype(vae_dtype) if vae_dtype else None)
    except ValueError as err:
        raise SetupError(f"--vae-dtype {vae_dtype}: {err}") from None
    capacity = capacity or (lambda d: cuda_runtime.mem_get_info(d)[1] if d.type == "cuda" else None)
    need = weight_bytes_per_device(plan, build_model(model_config, device="meta"))
    latent = 1024 // 8
    dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    work = {devs[0]: unet_bytes(model_config, 1, latent, latent, dtype=dtype_name, backend="torch"),
            devs[1]: tiled_vae_bytes(model_config, 1024, 1024, 512)}
    for d, nbytes in need.items():
        have = capacity(d)
        if have is not None and nbytes + work[d] > have:
            share = ", ".join(n for n in NETWORK_PARTS if plan.device_of(n) == d)
            raise SetupError(f"--devices: {d} has {have / 2**30:.1f} GiB, too small for its share ({share}: "
                             f"{nbytes / 2**30:.1f} GiB of weights + {work[d] / 2**30:.1f} GiB working memory at "
                             "1024²); put the larger GPU first, or use one device with offloading")
    return plan


def _cfg_parallel(engines: dict[str, Engine], model: torch.nn.Module, plan: Any, devices: Sequence[str] | None,
                  torch_options: Any, fp8_weights: bool, desc: dict[str, Any]) -> dict[str, Engine]:
    """``engines`` with the unet_adaptor replaced by CFG-parallel over it and a copy of its weights on the
    second of ``devices`` (allocated there directly, then copied from the first device tensor by tensor).
    With ``fp8_weights`` the twin is quantised like the first UNet (layer by layer, so the second device
    briefly holds the fp16 twin) and then receives the first one's fp8 weights and scales."""
    from supir_rt.backends.parallel import CFGParallelEngine
    from supir_rt.backends.placement import NETWORK_PARTS, MemoryPlan, NetworkPlacement, build_placed_model
    from supir_rt.backends.torch_backend import open_torch_engines

    if not devices:
        raise SetupError("--cfg-parallel needs --devices A,B: the second device runs the conditional half")
    second = torch.device(devices[1])
    if fp8_weights:
        _check_fp8(second)
    meta = torch.device("meta")  # the twin holds only the UNet + adaptor; its other parts stay unallocated
    twin_plan = MemoryPlan(second, {n: NetworkPlacement(p.dtype, True) for n, p in plan.networks.items()},
                           {n: meta for n in NETWORK_PARTS if n != "unet_adaptor"})
    with _loading_memory(twin_plan, model.config):
        twin = build_placed_model(model.config, twin_plan, init=False, pin=False)
        if fp8_weights:
            from supir_rt.backends.fp8 import quantize_fp8_

            quantize_fp8_(twin.model)  # the same modules as the first UNet's, so its state dict fits
        twin.model.load_state_dict(model.model.state_dict())
    other = open_torch_engines(model=twin, plan=twin_plan, options=torch_options, networks=["unet_adaptor"])
    desc["cfg_parallel"] = [str(plan.device_of("unet_adaptor")), str(second)]
    log.info("CFG-parallel: unconditional half on %s, conditional half on %s", plan.device_of("unet_adaptor"), second)
    return {**engines, "unet_adaptor": CFGParallelEngine(engines["unet_adaptor"], other["unet_adaptor"])}


def _log_placement(plan: Any) -> dict[str, str]:
    """The split placement, logged once and returned for the outputs' metadata."""
    placement = plan.describe()
    log.info("placement: %s", "; ".join(f"{k} {v}" for k, v in placement.items()))
    return placement


def _check_fp8(device: torch.device) -> None:
    from supir_rt.backends.fp8 import fp8_unsupported_reason

    reason = fp8_unsupported_reason(device)
    if reason:
        raise SetupError(reason)


@contextlib.contextmanager
def _loading_memory(plan: Any, model_config: ModelConfig):
    """A CUDA out-of-memory error while placing or loading the weights, as one clear SetupError."""
    try:
        yield
    except torch.OutOfMemoryError:
        from supir_rt.model.supir import build_model

        need = plan.weight_bytes(build_model(model_config, device="meta"))
        raise SetupError(
            f"the GPU ran out of memory while loading the weights: the plan keeps {need['device'] / 2**30:.1f} GiB "
            f"of weights on {plan.device} and needs {need['device_peak'] / 2**30:.1f} GiB while the largest "
            "offloaded network runs. Use --fp8-weights (Ada/Hopper GPUs), keep offloading on, or a GPU with "
            "more memory"
        ) from None


def _loading_plan(plan: Any, fp8_weights: bool) -> Any:
    """Where to load the weights: the plan itself, except that with fp8 weights the UNet + adaptor is
    loaded on the host (fp16, unpinned: host RAM then holds about the fp16 weights, 1.0x) and quantised
    there before it goes to the GPU, so a GPU that fits the fp8 UNet but not the fp16 one can load it."""
    from supir_rt.backends.placement import MemoryPlan, NetworkPlacement

    if not fp8_weights or plan.device.type == "cpu":
        return plan
    unet = plan.networks["unet_adaptor"]
    return MemoryPlan(plan.device, {**plan.networks, "unet_adaptor": NetworkPlacement(unet.dtype, resident=False)})


def _quantize_and_place(model: torch.nn.Module, plan: Any) -> None:
    from supir_rt.backends.fp8 import quantize_fp8_

    from supir_rt.backends.placement import NETWORK_PARTS, pin_host_memory

    quantize_fp8_(model.model)
    model.model.to(plan.home("unet_adaptor"))  # a device move only: a dtype cast would upcast the fp8 buffers
    if plan.device.type == "cuda":
        for name, parts in NETWORK_PARTS.items():
            if not plan.networks[name].resident:
                for part in parts:
                    pin_host_memory(model.get_submodule(part))


def _open_torch(model: torch.nn.Module, plan: Any, options: Any, fp8_weights: bool) -> dict[str, Engine]:
    if fp8_weights:
        from supir_rt.backends.fp8 import quantize_fp8_

        quantize_fp8_(model.model)  # after every cast: the fp8 buffers must not be upcast again
    return open_engines("torch", model=model, plan=plan, options=options)


def _torch_description(plan: Any, options: Any, fp8_weights: bool) -> dict[str, Any]:
    """What the outputs' metadata records about the torch backend's precision and speed options."""
    def name(dt: torch.dtype) -> str:
        return next(k for k, v in DTYPES.items() if v == dt)

    desc = {"vae_dtype": name(plan.networks["vae_decoder"].dtype),
            "text_dtype": name(plan.networks["text_encoders"].dtype),
            "offload": not plan.networks["vae_decoder"].resident}
    if fp8_weights:
        desc["fp8_weights"] = True
    if options is not None and options.compile:
        desc["compile"] = options.compile_mode
    return desc


def tiny_engines_cache() -> Path:
    """Where ``tiny_random`` exports its ONNX engines when no folder is given (reused across runs)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "supir-rt" / "tiny-random-engines"


def _pick_backend(backend: str, engines_dir: str | Path | None, device: str | torch.device,
                  config: ModelConfig | None = None, dtype: str | None = None) -> str:
    """``auto``: the torch backend when there are no exported engines, else the fastest available whose
    artifacts in `engines_dir` are usable here (TensorRT only with valid plans for this GPU)."""
    from supir_rt.backends import available_backends, resolve_backend

    if backend == "auto" and engines_dir is None:
        return "torch"
    artifacts = (None if engines_dir is None or config is None or dtype is None
                 else {"artifact_dir": engines_dir, "config": config, "precision": dtype})
    try:
        return resolve_backend(backend, needs_artifacts=engines_dir is not None, artifacts=artifacts)
    except (RuntimeError, ValueError) as err:
        status = available_backends()
        usable = ", ".join(name for name, reason in status.items() if reason is None)
        if status.get(backend) is not None:
            raise SetupError(f"--backend {backend} is not available here ({status[backend]}); "
                             f"usable here: {usable}") from None
        if backend != "auto" and backend not in status:
            raise SetupError(f"--backend {backend}: unknown backend; usable here: {usable}") from None
        raise SetupError(f"--backend {backend}: {err}") from None


def _check_engine_dtype(dtype: str) -> None:
    from supir_rt.backends.manifest import PRECISIONS

    if dtype not in PRECISIONS:
        raise SetupError(f"--dtype {dtype}: exported engines are built as {' or '.join(PRECISIONS)}; "
                         f"pass --dtype {PRECISIONS[0]} or --dtype {PRECISIONS[1]} with an engine backend")


def _refuse_foreign_engines(engines_dir: Path, config: ModelConfig) -> None:
    """`tiny_random` exports into ``engines_dir``, replacing what does not match: refuse a folder that
    holds engines of another model (e.g. built from the real checkpoints) instead of overwriting them."""
    import json

    for manifest in sorted(engines_dir.glob("*.json")) if engines_dir.is_dir() else ():
        try:
            name = json.loads(manifest.read_text()).get("config_name")
        except (OSError, ValueError, AttributeError):
            continue
        if name is not None and name != config.name:
            raise SetupError(
                f"--engines-dir {engines_dir} holds engines of the {name!r} model ({manifest.name}); "
                f"--tiny-random would overwrite them: give it another --engines-dir, or drop --tiny-random"
            )


def _open_artifact_engines(backend: str, config: ModelConfig, engines_dir: str | Path | None,
                           dtype: str) -> dict[str, Engine]:
    if engines_dir is None:
        raise SetupError(
            f"backend {backend!r} runs exported engines: pass --engines-dir DIR (build them with "
            "python export/build_engines.py), or use --backend torch with the checkpoint files"
        )
    if not Path(engines_dir).is_dir():
        raise SetupError(f"engines folder {engines_dir} does not exist; build the engines first or fix --engines-dir")
    from supir_rt.backends.manifest import ArtifactError

    _check_engine_dtype(dtype)
    try:
        return open_engines(backend, config=config, artifact_dir=engines_dir, precision=dtype)
    except ArtifactError as err:  # missing, stale or foreign artifacts: the message names the fix
        raise SetupError(f"--engines-dir {engines_dir}: {err}") from None




def _with_scale(engines: dict[str, Engine], model: torch.nn.Module, plan: Any, desc: dict[str, Any], *,
                devices: Sequence[str] | None, cfg_parallel: bool, torch_options: Any,
                fp8_weights: bool) -> dict[str, Engine]:
    """The torch backend's description in ``desc`` (placement with ``devices``), and with ``cfg_parallel``
    the UNet twin on the second device (`_cfg_parallel`)."""
    desc.update(_torch_description(plan, torch_options, fp8_weights))
    if devices:
        desc["placement"] = _log_placement(plan)
    if cfg_parallel:
        engines = _cfg_parallel(engines, model, plan, devices, torch_options, fp8_weights, desc)
    return engines

def open_checkpoint_engines(
    sdxl: str | Path, supir: str | Path, *, device: str = "cpu", dtype: str = "fp32", backend: str = "torch",
    engines_dir: str | Path | None = None, config: ModelConfig | None = None, vae_dtype: str | None = None,
    offload: bool | None = None, fp8_weights: bool = False, torch_options: Any = None,
    devices: Sequence[str] | None = None, cfg_parallel: bool = False,
) -> tuple[dict[str, Engine], ModelConfig, dict[str, Any]]:
    """Load the official SDXL base + SUPIR-v0Q/v0F checkpoints (torch backend), or open exported
    engines from ``engines_dir`` (onnxruntime/tensorrt backends, which need no PyTorch model).

    Torch backend only: ``vae_dtype`` (bf16 on CUDA, fp32 on CPU by default; fp16 is refused),
    ``offload`` (None: on CUDA, the VAE and text encoders visit the GPU only while they run),
    ``fp8_weights`` (UNet + adaptor weights stored in fp8, GPUs with compute capability 8.9+),
    ``torch_options`` (`supir_rt.backends.torch_backend.TorchOptions`: compile, CUDA graphs),
    ``devices`` (two devices: split placement, `split_plan`; replaces ``device``), ``cfg_parallel``
    (with ``devices``: a second UNet + adaptor on the second device runs the conditional half of
    every CFG pair, `supir_rt.backends.parallel`); docs/scale.md."""
    config = config or ModelConfig.official()
    backend = _pick_backend(backend, engines_dir, device, config, dtype)
    if devices and not backend.startswith("torch"):
        raise SetupError(f"--devices (split placement) needs the torch backend, not {backend}")
    desc = {"backend": backend, "dtype": dtype, "device": str(device), "model": config.name,
            "sdxl": Path(sdxl).name if sdxl else None, "supir": Path(supir).name if supir else None}
    if backend.startswith("torch"):
        from supir_rt.backends.placement import build_placed_model
        from supir_rt.weights import load_checkpoints

        dev, dt = check_device(devices[0] if devices else device), parse_dtype(dtype)
        _warn_precision(dev, dt)
        plan = split_plan(devices, dt, vae_dtype, config) if devices else _memory_plan(dev, dt, vae_dtype, offload)
        if fp8_weights:
            _check_fp8(dev)
        with _loading_memory(plan, config):
            # each part allocated where the plan puts it, then the files streamed tensor by tensor
            model = build_placed_model(config, _loading_plan(plan, fp8_weights), init=False,
                                       pin=False if fp8_weights else None)
            load_checkpoints(model, sdxl=sdxl, supir=supir)
            if fp8_weights:  # quantised on the host, so the GPU never holds the fp16 UNet
                _quantize_and_place(model, plan)
        engines = _with_scale(_open_torch(model, plan, torch_options, fp8_weights=False), model, plan, desc,
                              devices=devices, cfg_parallel=cfg_parallel, torch_options=torch_options,
                              fp8_weights=fp8_weights)
    else:
        engines = _open_artifact_engines(backend, config, engines_dir, dtype)
    return engines, config, desc


def open_exported_engines(
    engines_dir: str | Path, *, backend: str = "auto", dtype: str = "fp32", config: ModelConfig | None = None,
) -> tuple[dict[str, Engine], ModelConfig, dict[str, Any]]:
    """Open exported engines (no PyTorch model is built)."""
    config = config or ModelConfig.official()
    backend = _pick_backend(backend, engines_dir, "cpu", config, dtype)
    if backend.startswith("torch"):
        raise SetupError(
            f"backend {backend!r} runs the PyTorch model from checkpoint files, not exported engines; "
            "install onnxruntime (pip install 'supir-rt[onnx]') to run --engines-dir, or pass --sdxl/--supir"
        )
    engines = _open_artifact_engines(backend, config, engines_dir, dtype)
    desc = {"backend": backend, "dtype": dtype, "model": config.name, "engines_dir": Path(engines_dir).name}
    return engines, config, desc


def open_tiny_engines(
    *, seed: int = 0, device: str = "cpu", dtype: str = "fp32", backend: str = "torch",
    engines_dir: str | Path | None = None, vae_dtype: str | None = None, offload: bool | None = None,
    fp8_weights: bool = False, torch_options: Any = None, devices: Sequence[str] | None = None,
    cfg_parallel: bool = False,
) -> tuple[dict[str, Engine], ModelConfig, dict[str, Any]]:
    """The whole pipeline on the tiny configuration with random weights: shows it runs end to end.
    **The output is not a restoration** (random networks produce noise-like images)."""
    from supir_rt.model.supir import build_model

    config = ModelConfig.tiny()
    dev, dt = check_device(devices[0] if devices else device), parse_dtype(dtype)
    _warn_precision(dev, dt)
    # auto: torch, or with engines_dir the engine backend whose artifacts there are usable
    backend = _pick_backend(backend, engines_dir, dev, config, dtype)
    if devices and not backend.startswith("torch"):
        raise SetupError(f"--devices (split placement) needs the torch backend, not {backend}")
    if backend.startswith("torch"):
        plan = split_plan(devices, dt, vae_dtype, config) if devices else _memory_plan(dev, dt, vae_dtype, offload)
        if fp8_weights:
            _check_fp8(dev)
    else:
        _check_engine_dtype(dtype)
        if engines_dir is not None:
            _refuse_foreign_engines(Path(engines_dir), config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config, device=dev)
    desc = {"backend": backend, "dtype": dtype, "device": str(dev), "model": "tiny-random",
            "weights_seed": seed}
    if backend.startswith("torch"):
        from supir_rt.backends.placement import place_model

        engines = _with_scale(_open_torch(place_model(model, plan), plan, torch_options, fp8_weights), model, plan,
                              desc, devices=devices, cfg_parallel=cfg_parallel, torch_options=torch_options,
                              fp8_weights=fp8_weights)
    else:
        try:
            from supir_rt.backends.onnx_export import export_all
        except ImportError:
            raise SetupError(
                f"--tiny-random with --backend {backend} is not available yet: the ONNX exporter "
                "(supir_rt.backends.onnx_export) is not installed; use --backend torch"
            ) from None
        out = Path(engines_dir) if engines_dir else tiny_engines_cache()
        export_all(model, out, precision=dtype, progress=False, reuse=True)
        engines = _open_artifact_engines(backend, config, out, dtype)
        desc["engines_dir"] = out.name  # a name, not a path: outputs carry it
    return engines, config, desc


__all__ = ["DTYPES", "SDXL_FILE", "SUPIR_FILES", "SetupError", "check_device", "open_checkpoint_engines", "open_exported_engines",
           "open_tiny_engines", "parse_dtype", "split_plan", "tiny_engines_cache"]
