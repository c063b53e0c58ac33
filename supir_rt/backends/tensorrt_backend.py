"""The TensorRT backends: ``tensorrt`` (TensorRT 10.x / 11.x) and ``tensorrt-rtx`` (TensorRT-RTX 1.x).

Both share one runtime; this module only opens and registers them. Plans are built by
``python export/build_engines.py --trt`` (``--trt-rtx`` for TensorRT-RTX; export/build_trt.py).
The pieces, by concern:

* `trt_api`      which TensorRT is installed and every call whose spelling depends on it;
* `trt_plans`    plans and their identity: found by name, checked against the manifest (flavour,
                 full version, GPU, hashes of the ONNX files), deserialised and checked (I/O,
                 profiles), refilled if stripped, weight budget set; TensorRT-RTX runtime cache;
* `trt_context`  execution contexts over one shared activation arena, one stream, engine-owned
                 buffers, profile selection (`TrtEngine`);
* `trt_graphs`   the CUDA seam (`TorchCuda`) and per-shape CUDA graph capture and replay.

`tensorrt` / `tensorrt_rtx` are imported lazily: without them (or without a GPU, or with an
unsupported version) the backends are registered but unavailable, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from supir_rt.backends import register_backend
from supir_rt.backends.manifest import ArtifactError, GpuTarget, check_plan, rebuild_command
from supir_rt.backends.specs import NETWORKS, network_specs
from supir_rt.backends.trt_api import Flavour, TensorRTImportError, require
from supir_rt.backends.trt_context import ALIGNMENT, DeviceArena, Shared, TrtEngine, aligned_empty
from supir_rt.backends.trt_graphs import TorchCuda
from supir_rt.backends.trt_plans import LoadedPlan, ProfileError, TensorRTError, make_logger
from supir_rt.config import ModelConfig


def require_tensorrt(flavour: Flavour = "tensorrt"):
    """The `tensorrt` (or `tensorrt_rtx`) module if it is a supported version, else ImportError
    saying what to install."""
    return require(flavour)


def default_cuda() -> TorchCuda:
    return TorchCuda()


def current_target(trt, flavour: Flavour = "tensorrt", cuda: TorchCuda | None = None) -> GpuTarget:
    cuda = cuda or default_cuda()
    if not cuda.is_available():
        raise TensorRTError(f"the {flavour} backend needs an NVIDIA GPU; torch sees none")
    return cuda.target(trt.__version__, flavour)


def open_tensorrt_engines(*, config: ModelConfig, artifact_dir: str | Path, precision: str = "fp16",
                          validate: bool = True, networks: Sequence[str] | None = None, verify_hash: bool = True,
                          cuda_graphs: bool = False, weight_budget: int | None = None, cuda: TorchCuda | None = None,
                          flavour: Flavour = "tensorrt", **_: object) -> dict[str, TrtEngine]:
    """Engines for `networks` (default all) from the plans in `artifact_dir` built for this GPU and
    this TensorRT (flavour and version); they share one stream and one activation arena.
    `weight_budget` (bytes) overrides the weight-streaming budget recorded at build time."""
    trt = require_tensorrt(flavour)
    cuda = cuda or default_cuda()
    target = current_target(trt, flavour, cuda)
    specs = network_specs(config)
    shared = Shared(trt, cuda, flavour)
    rebuild = rebuild_command(config, precision, trt=True, artifact_dir=Path(artifact_dir),
                              rtx=flavour == "tensorrt-rtx")
    engines: dict[str, TrtEngine] = {}
    try:
        for name in networks or NETWORKS:
            plan = target.plan(Path(artifact_dir), name, precision)
            man = check_plan(plan, spec=specs[name], config=config, precision=precision, target=target,
                             verify_hash=verify_hash)
            loaded = LoadedPlan(plan, specs[name], man, trt=trt, api=shared.api, runtime=shared.runtime,
                                logger=shared.logger, rebuild=rebuild,
                                weight_budget=weight_budget if name == "unet_adaptor" else None)
            engines[name] = TrtEngine(loaded, shared, validate=validate, cuda_graphs=cuda_graphs)
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return engines


def open_tensorrt_rtx_engines(**kwargs) -> dict[str, TrtEngine]:
    return open_tensorrt_engines(**{**kwargs, "flavour": "tensorrt-rtx"})


def tensorrt_unavailable(cuda: TorchCuda | None = None, flavour: Flavour = "tensorrt") -> str | None:
    try:
        require_tensorrt(flavour)
    except ImportError as err:
        return str(err)
    if not (cuda or default_cuda()).is_available():
        return "no CUDA device"
    return None


def tensorrt_artifacts_reason(*, artifact_dir: str | Path, config: ModelConfig, precision: str,
                              cuda: TorchCuda | None = None, flavour: Flavour = "tensorrt") -> str | None:
    """Why `artifact_dir` holds no usable plan set for this GPU (None: it does). Cheap: manifests
    only, no hashing and no deserialising."""
    trt = require_tensorrt(flavour)
    target = (cuda or default_cuda()).target(trt.__version__, flavour)
    specs = network_specs(config)
    for name in NETWORKS:
        try:
            check_plan(target.plan(Path(artifact_dir), name, precision), spec=specs[name], config=config,
                       precision=precision, target=target, verify_hash=False)
        except (ArtifactError, OSError, ValueError) as err:
            return str(err).split("; rebuild with")[0]
    return None


register_backend("tensorrt", lambda: tensorrt_unavailable(), open_tensorrt_engines,
                 artifacts_reason=tensorrt_artifacts_reason)
register_backend("tensorrt-rtx", lambda: tensorrt_unavailable(flavour="tensorrt-rtx"), open_tensorrt_rtx_engines,
                 artifacts_reason=lambda **kw: tensorrt_artifacts_reason(**kw, flavour="tensorrt-rtx"))

__all__ = ["TrtEngine", "TensorRTError", "ProfileError", "TensorRTImportError", "open_tensorrt_engines",
           "open_tensorrt_rtx_engines", "require_tensorrt", "current_target", "TorchCuda", "DeviceArena",
           "aligned_empty", "ALIGNMENT", "tensorrt_unavailable", "tensorrt_artifacts_reason", "make_logger"]
