"""ONNX -> TensorRT plans, in-process with the TensorRT Python API (imported lazily).

One plan per network, strongly typed (the ONNX tensor types decide layer precision: the fp16 graphs
of `onnx_export.py` give fp16 UNet/text encoders and an fp32 VAE), one optimisation profile derived
from the spec (`NetworkSpec.profile`), a frozen `BuildConfig`, and a manifest beside each plan that
records spec, ONNX hash, build config, TensorRT version and GPU compute capability
(`supir_rt.backends.manifest`). Plan names: ``<network>_<precision>_<profile>_sm<cc>_trt<ver>.plan``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from supir_rt.backends.manifest import (
    Manifest, check_manifest, config_fingerprint, file_sha256, manifest_path, onnx_name, plan_name, spec_to_json,
)
from supir_rt.backends.specs import DEFAULT_RANGES, NETWORKS, DimRange, network_specs
from supir_rt.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that changes a plan besides the ONNX file, the GPU and the TensorRT version."""

    optimization_level: int = 3  # the NVIDIA demo's default for fp16
    workspace_gib: float = 8.0
    strongly_typed: bool = True
    tf32: bool = True  # only affects the fp32 layers (the VAE)
    ranges: tuple[tuple[str, DimRange], ...] = tuple(sorted(DEFAULT_RANGES.items()))

    @property
    def range_map(self) -> dict[str, DimRange]:
        return dict(self.ranges)


def import_tensorrt():
    """`tensorrt`, or ImportError with the reason (this machine: only the bindings wheel installs)."""
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError(f"TensorRT is not importable ({err}); install TensorRT >= 10 with its libraries "
                          "(pip install tensorrt from NVIDIA's index) on a machine with an NVIDIA GPU") from err
    return tensorrt


def gpu_capability() -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("building TensorRT plans needs an NVIDIA GPU; torch sees none")
    return torch.cuda.get_device_capability()


def build_plan(onnx_path: Path, out_dir: Path, *, config: ModelConfig, network: str, precision: str,
               build: BuildConfig = BuildConfig()) -> Path:
    """Parse `onnx_path`, build one plan with the spec's profile, write it and its manifest."""
    trt = import_tensorrt()
    spec = network_specs(config)[network]
    onnx_man = check_manifest(onnx_path, spec=spec, config=config, precision=precision)
    cc = gpu_capability()
    plan = Path(out_dir) / plan_name(network, precision, build.range_map, cc, trt.__version__)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if build.strongly_typed else 0
    net = builder.create_network(flags)
    parser = trt.OnnxParser(net, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    cfg = builder.create_builder_config()
    cfg.builder_optimization_level = build.optimization_level
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_gib * 2**30))
    if build.tf32:
        cfg.set_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile(build.range_map).items():
        profile.set_shape(name, lo, opt, hi)
    cfg.add_optimization_profile(profile)

    log.info("building %s (this takes minutes for the UNet)", plan.name)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(net, cfg)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan.name}; see the TensorRT log above")
    plan.write_bytes(bytes(serialized))
    Manifest(
        network=network, kind="tensorrt", precision=precision, config_name=config.name,
        config_fingerprint=config_fingerprint(config), spec=spec_to_json(spec),
        files={plan.name: file_sha256(plan)}, weights_sha256=onnx_man.weights_sha256, source=onnx_man.source,
        tools={"tensorrt": trt.__version__, **onnx_man.tools},
        build={**plan_fields(trt.__version__, cc, build), "onnx": onnx_path.name,
               "onnx_sha256": onnx_man.files[onnx_path.name], "build_s": round(time.perf_counter() - t0, 1)},
    ).write(manifest_path(plan))
    log.info("%s built in %.0f s", plan, time.perf_counter() - t0)
    return plan


def plan_fields(trt_version: str, cc: tuple[int, int], build: BuildConfig) -> dict:
    """The manifest `build` fields a runtime must find equal (see tensorrt_backend)."""
    fields = dataclasses.asdict(build)
    fields["ranges"] = {k: dataclasses.asdict(r) for k, r in build.ranges}
    return {"tensorrt": trt_version, "compute_capability": f"{cc[0]}.{cc[1]}", "build_config": fields}


def build_all(config: ModelConfig, onnx_dir: Path, out_dir: Path | None = None, *, precision: str = "fp16",
              networks: Sequence[str] | None = None, build: BuildConfig = BuildConfig(),
              ranges: Mapping[str, DimRange] | None = None) -> list[Path]:
    """Plans for `networks` (default all) from the ONNX files in `onnx_dir`."""
    if ranges is not None:
        build = dataclasses.replace(build, ranges=tuple(sorted(ranges.items())))
    out_dir = Path(out_dir or onnx_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [build_plan(Path(onnx_dir) / onnx_name(n, precision), out_dir, config=config, network=n,
                       precision=precision, build=build) for n in (networks or NETWORKS)]
