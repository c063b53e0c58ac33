"""ONNX -> TensorRT / TensorRT-RTX plans, in-process with the Python API (imported lazily).

One build path for TensorRT 10.x, 11.x and TensorRT-RTX 1.x: every network is **strongly typed**
and no precision flag is set (11.x removed them; TensorRT-RTX never had a weakly typed mode): the
ONNX tensor types decide layer precision, so the fp16 graphs of `onnx_export.py` give fp16 UNet and
text encoders and fp32 VAE and DR encoder (the SDXL VAE overflows in fp16). The calls that differ by
flavour or version are in `supir_rt/backends/trt_api.py`. One plan per network, its optimisation
profiles (`specs.default_profiles`: static 1024 px-class, sampler tile, dynamic fallback) stored in
the manifest, a frozen `BuildConfig`, and a manifest beside each plan recording the profiles, the
hashes of the ONNX files and weights it was built from and its identity (flavour, full version,
GPU name and compute capability). Around the build:

* **reuse**: a plan whose manifest matches (same ONNX, weights, build settings, identity) and
  whose file is intact is kept, not rebuilt;
* **timing cache** (TensorRT only; TensorRT-RTX ignores one): ``timing_sm<cc>_trt<ver>.cache``
  beside the plans is loaded by every build and saved after it (one from another GPU or version is
  replaced with a warning);
* **refit and profiles**: NVIDIA's headers say ``addOptimizationProfile`` "may be called at most
  once when building a refittable engine" (NvInfer.h, 10.x and 11.x). So the default
  (``refit="auto"``) makes a plan refittable (REFIT_IDENTICAL) only when it has one profile and not
  refittable when it has several; asking for ``identical``/``full`` refit or stripped weights with
  several profiles is refused with the options that fix it. The manifest records the choice;
  `refit_plan` puts the weights of a re-exported ONNX file into an existing ``full`` plan;
* **weight streaming** (``weight_streaming=True``): the UNet + adaptor plan is built with
  WEIGHT_STREAMING and the runtime keeps only a budget of its weights on the GPU;
* files are written atomically (temporary file + rename): a failed build leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from supir_rt.backends.manifest import (
    ArtifactError, GpuTarget, Manifest, atomic_write_bytes, check_manifest, config_fingerprint, file_sha256,
    manifest_path, onnx_name, rebuild_command, spec_to_json, timing_cache_name,
)
from supir_rt.backends.specs import NETWORKS, NetworkSpec, Profile, default_profiles, network_profiles, network_specs
from supir_rt.backends import tensorrt_backend
from supir_rt.backends.tensorrt_backend import TensorRTError, TorchCuda, make_logger, require_tensorrt
from supir_rt.backends.trt_api import Flavour, TrtApi
from supir_rt.config import ModelConfig

log = logging.getLogger(__name__)

Refit = Literal["auto", "none", "identical", "full"]
ONE_PROFILE_RULE = ("NvInfer.h addOptimizationProfile: it may be called at most once when building a refittable "
                    "engine")
STREAMING_NETWORKS = ("unet_adaptor",)  # the only network big enough to need weight streaming


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that changes a plan besides the ONNX file, the GPU and the TensorRT version."""

    optimization_level: int = 3  # the NVIDIA demo's default for fp16
    workspace_gib: float = 8.0
    tf32: bool = True  # TF32 tactics for the fp32 layers (the VAE); False really clears the flag
    profiles: tuple[Profile, ...] = default_profiles()
    refit: Refit = "auto"  # identical with one profile, none with several (ONE_PROFILE_RULE)
    strip_weights: bool = False  # plan without its refittable weights; loaded from the ONNX file at open
    weight_streaming: bool = False  # WEIGHT_STREAMING for the UNet + adaptor plan

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"builder optimisation level {self.optimization_level}: TensorRT accepts 0..5")
        if self.strip_weights and self.refit == "none":
            raise ValueError("a weight-stripped plan must be refittable: use refit 'identical' or 'full'")

    def refit_for(self, network: str, n_profiles: int) -> str:
        """The refit mode of `network`'s plan with `n_profiles` profiles (ValueError if the headers
        do not allow what was asked)."""
        if self.refit == "auto" and not (self.strip_weights and n_profiles > 1):
            return "identical" if n_profiles == 1 else "none"
        if self.refit != "none" and n_profiles > 1:
            what = "stripped weights need" if self.strip_weights else f"refit {self.refit!r} needs"
            raise ValueError(f"{network}: {what} a refittable plan, which may hold one optimisation profile only "
                             f"({ONE_PROFILE_RULE}), and {n_profiles} were asked for; keep one profile "
                             "(--no-static-profile --no-tile-profile, or --no-dynamic-profile --no-tile-profile) or "
                             "build without refit (--trt-refittable none, no --trt-strip)")
        return self.refit

    def for_network(self, network: str, n_profiles: int) -> dict:
        """The manifest's record of these settings as they apply to `network` (what reuse compares)."""
        return {"optimization_level": self.optimization_level, "workspace_gib": self.workspace_gib,
                "strongly_typed": True, "tf32": self.tf32, "refit": self.refit_for(network, n_profiles),
                "strip_weights": self.strip_weights,
                "weight_streaming": self.weight_streaming and network in STREAMING_NETWORKS}


def check_build(build: BuildConfig, config: ModelConfig, networks: Sequence[str] | None = None) -> None:
    """Refuse, before any export or build, settings the headers do not allow for some network."""
    specs = network_specs(config)
    for n in networks or NETWORKS:
        build.for_network(n, len(network_profiles(specs[n], build.profiles)))


def current_target(trt, cuda: TorchCuda | None = None, flavour: Flavour = "tensorrt") -> GpuTarget:
    cuda = cuda or tensorrt_backend.default_cuda()  # looked up at call time: tests substitute it
    if not cuda.is_available():
        raise TensorRTError(f"building {flavour} plans needs an NVIDIA GPU; torch sees none")
    return cuda.target(trt.__version__, flavour)


# --------------------------------------------------------------------------------------- the build

class TimingCache:
    """The builder's tactic timings, kept in one file beside the plans and reused by every build."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def attach(self, config) -> object:
        data = self.path.read_bytes() if self.path.is_file() else b""
        if not data:
            log.info("no timing cache at %s yet; this build starts one", self.path)
        try:
            cache = config.create_timing_cache(data)
            usable = cache is not None and config.set_timing_cache(cache, False)
        except RuntimeError:  # a corrupt file
            usable = False
        if not usable:
            log.warning("timing cache %s does not fit this GPU/TensorRT (or is corrupt); starting a new one", self.path)
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, False):
                raise TensorRTError("TensorRT could not create an empty timing cache")
        return cache

    def save(self, config) -> None:
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write_bytes(self.path, bytes(cache.serialize()))


def _parse(api: TrtApi, logger, onnx_path: Path, spec: NetworkSpec):
    trt = api.trt
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTError(f"TensorRT could not create a builder{logger.last_error()}")
    network = builder.create_network(api.network_flags())  # strongly typed: precision from the ONNX file
    if network is None:
        raise TensorRTError(f"TensorRT could not create a network{logger.last_error()}")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors or logger.last_error()}; re-export it "
                            "with python export/build_engines.py")
    got = ([network.get_input(i).name for i in range(network.num_inputs)],
           [network.get_output(i).name for i in range(network.num_outputs)])
    if got != (spec.input_names, spec.output_names):
        raise TensorRTError(f"{onnx_path}: graph I/O {got} differs from the {spec.name} spec "
                            f"{(spec.input_names, spec.output_names)}; re-export it")
    return builder, network, parser


def _configure(api: TrtApi, builder, network_name: str, spec: NetworkSpec, build: BuildConfig):
    trt = api.trt
    cfg = builder.create_builder_config()
    api.set_build_target(cfg)
    cfg.builder_optimization_level = build.optimization_level
    workspace = int(build.workspace_gib * 2**30)
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if cfg.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) != workspace:  # a bad size is only logged
        raise ValueError(f"TensorRT refused a workspace of {build.workspace_gib} GiB; fix --trt-workspace-gib")
    if build.tf32:  # TensorRT enables TF32 by default: clear it explicitly when it is off
        cfg.set_flag(trt.BuilderFlag.TF32)
    else:
        cfg.clear_flag(trt.BuilderFlag.TF32)
    if cfg.get_flag(trt.BuilderFlag.TF32) != build.tf32:
        raise TensorRTError(f"TensorRT did not take tf32={build.tf32}")
    profiles = network_profiles(spec, build.profiles)
    refit = build.refit_for(network_name, len(profiles))
    refit_flag = {"identical": trt.BuilderFlag.REFIT_IDENTICAL, "full": trt.BuilderFlag.REFIT}.get(refit)
    if refit_flag is not None:
        cfg.set_flag(refit_flag)
    if build.strip_weights:
        cfg.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if build.weight_streaming and network_name in STREAMING_NETWORKS:
        cfg.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile(p.range_map).items():
            try:
                profile.set_shape(name, lo, opt, hi)
            except RuntimeError as err:
                raise ValueError(f"profile {p.describe()} gives {name} min/opt/max {lo}/{opt}/{hi}, which TensorRT "
                                 f"refuses ({err}); fix --batch/--latent/--static-latent/--tile-latent") from None
        if cfg.add_optimization_profile(profile) < 0:
            raise ValueError(f"TensorRT refused profile {p.describe()} for {network_name}; fix its ranges")
    return cfg, profiles


def build_plan(onnx_path: Path, out_dir: Path, *, config: ModelConfig, network: str, precision: str,
               build: BuildConfig = BuildConfig(), reuse: bool = True, refit: bool = False,
               weight_budget: int | None = None, cuda: TorchCuda | None = None,
               flavour: Flavour = "tensorrt") -> tuple[Path, str]:
    """One plan for `network` from `onnx_path`; returns (plan, what happened: built/reused/refitted).

    `reuse`: keep a plan whose manifest matches. `refit`: if only the weights changed (same graph
    architecture, ``refit="full"`` plan), put the new weights into the existing plan instead of
    rebuilding. `weight_budget`: bytes of UNet weights to keep on the GPU (weight streaming).
    `flavour`: ``tensorrt`` or ``tensorrt-rtx``. The runtime expects the ONNX files beside the plans.
    """
    trt = require_tensorrt(flavour)
    api = TrtApi(trt, flavour)
    spec = network_specs(config)[network]
    onnx_path = Path(onnx_path)
    onnx_man = check_manifest(onnx_path, spec=spec, config=config, precision=precision)  # hashes its files
    onnx_files = dict(onnx_man.files)  # just verified against the bytes
    target = current_target(trt, cuda, flavour)
    out_dir = Path(out_dir)
    plan = target.plan(out_dir, network, precision)
    profiles = network_profiles(spec, build.profiles)
    want = {**target.fields(), "build_config": build.for_network(network, len(profiles)),
            "profiles": [p.to_json() for p in profiles]}
    runtime = {"weight_budget": weight_budget} if want["build_config"]["weight_streaming"] else {}

    old = _existing(plan, spec=spec, config=config, precision=precision, target=target)
    if old is not None and all(old.build.get(k) == v for k, v in want.items()):
        same_weights = (old.build.get("onnx_files"), old.weights_sha256) == (onnx_files, onnx_man.weights_sha256)
        if same_weights and reuse:
            if old.build.get("runtime", {}) != runtime:
                _write_manifest(plan, dataclasses.replace(old, build={**old.build, "runtime": runtime}))
            log.info("%s is up to date (manifest matches); reusing it", plan.name)
            return plan, "reused"
        if not same_weights and refit:
            refit_plan(plan, onnx_path, old, onnx_man, trt=trt, runtime=runtime, onnx_files=onnx_files)
            return plan, "refitted"
    elif refit:
        log.info("%s: no matching plan to refit (%s); building one", network,
                 "none yet" if old is None else "the build settings, GPU or profiles differ")

    logger = make_logger(trt)
    builder, net, _parser = _parse(api, logger, onnx_path, spec)
    cfg, _ = _configure(api, builder, network, spec, build)
    cache = None
    if api.uses_timing_cache():
        cache = TimingCache(out_dir / timing_cache_name(target.compute_capability, target.tensorrt))
        timing = cache.attach(cfg)  # must outlive the build
    log.info("building %s (minutes for the UNet)", plan.name)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(net, cfg)
    if serialized is None:
        raise TensorRTError(f"{flavour} failed to build {plan.name}{logger.last_error()}; nothing was written")
    if cache is not None:
        cache.save(cfg)
        del timing
    data = bytes(serialized)
    manifest_path(plan).unlink(missing_ok=True)  # a crash below leaves a plan without manifest: refused, never trusted
    atomic_write_bytes(plan, data)
    seconds = round(time.perf_counter() - t0, 1)
    refit_mode = want["build_config"]["refit"]
    _write_manifest(plan, Manifest(
        network=network, kind=flavour, precision=precision, config_name=config.name,
        config_fingerprint=config_fingerprint(config), spec=spec_to_json(spec),
        files={plan.name: file_sha256(plan)}, weights_sha256=onnx_man.weights_sha256, source=onnx_man.source,
        tools={flavour: trt.__version__, **onnx_man.tools},
        build={**want, "onnx": onnx_path.name, "onnx_sha256": onnx_files[onnx_path.name], "onnx_files": onnx_files,
               "refit": refit_mode, "stripped": build.strip_weights,
               "refit_rule": f"{len(profiles)} profile(s): refit {refit_mode!r} ({ONE_PROFILE_RULE})",
               "weight_streaming": want["build_config"]["weight_streaming"], "runtime": runtime,
               "plan_bytes": len(data), "build_s": seconds, "refits": []},
    ))
    log.info("%s built in %.0f s (%.1f MiB)", plan.name, seconds, len(data) / 2**20)
    return plan, "built"


def _existing(plan: Path, **kwargs) -> Manifest | None:
    """The manifest of an intact plan already there for this spec/config/GPU, else None."""
    if not plan.is_file():
        return None
    try:
        return check_manifest_only(plan, **kwargs)
    except (ArtifactError, ValueError, KeyError, TypeError) as err:
        log.info("%s will be rebuilt: %s", plan.name, str(err).split("; rebuild with")[0])
        return None


def check_manifest_only(plan: Path, *, spec, config, precision, target: GpuTarget) -> Manifest:
    return check_manifest(plan, spec=spec, config=config, precision=precision, kind=target.flavour,
                          extra=target.fields())


def _write_manifest(plan: Path, man: Manifest) -> None:
    man.write(manifest_path(plan))


def refit_plan(plan: Path, onnx_path: Path, man: Manifest, onnx_man: Manifest, *, trt, runtime: dict,
               onnx_files: dict[str, str]) -> None:
    """Put the weights of `onnx_path` (same architecture) into the existing `plan` and record it.
    A stripped plan holds no weights: its manifest is re-pointed at the new ONNX file, whose weights
    are loaded at open. Only ``refit="full"`` plans may take other weights."""
    if man.build.get("refit") != "full":
        raise ArtifactError(
            f"{plan.name} was built with refit={man.build.get('refit')!r}: TensorRT only allows other weights in a "
            f"plan built with --trt-refittable full; rebuild it (drop --refit, or add --trt-refittable full)")
    t0 = time.perf_counter()
    logger = make_logger(trt)
    data = None
    if not man.build.get("stripped"):
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise TensorRTError(f"TensorRT could not deserialize {plan}{logger.last_error()}; rebuild it")
        if not engine.refittable:
            raise TensorRTError(f"{plan.name} is not refittable although its manifest says so; rebuild it")
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"could not take the weights of {onnx_path} for {plan.name} (another architecture?): "
                                f"{errors or logger.last_error()}; rebuild without --refit")
        if not refitter.refit_cuda_engine():
            raise TensorRTError(f"TensorRT could not refit {plan.name}: missing weights "
                                f"{list(refitter.get_missing_weights())[:5]}{logger.last_error()}; rebuild without --refit")
        data = bytes(engine.serialize())
        manifest_path(plan).unlink(missing_ok=True)
        atomic_write_bytes(plan, data)
    seconds = round(time.perf_counter() - t0, 1)
    record = {"from_onnx_sha256": man.build.get("onnx_sha256"), "from_weights_sha256": man.weights_sha256,
              "onnx_sha256": onnx_files[onnx_path.name], "weights_sha256": onnx_man.weights_sha256,
              "source": onnx_man.source, "refit_s": seconds,
              "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    build = {**man.build, "onnx_sha256": onnx_files[onnx_path.name], "onnx_files": onnx_files, "runtime": runtime,
             "refits": [*man.build.get("refits", []), record]}
    if data is not None:
        build["plan_bytes"] = len(data)
    _write_manifest(plan, dataclasses.replace(man, files={plan.name: file_sha256(plan)},
                                              weights_sha256=onnx_man.weights_sha256, source=onnx_man.source,
                                              build=build))
    log.info("%s refitted with the weights of %s in %.1f s", plan.name, onnx_path.name, seconds)


def build_all(config: ModelConfig, onnx_dir: Path, out_dir: Path | None = None, *, precision: str = "fp16",
              networks: Sequence[str] | None = None, build: BuildConfig = BuildConfig(), reuse: bool = True,
              refit: bool = False, weight_budget: int | None = None, cuda: TorchCuda | None = None,
              flavour: Flavour = "tensorrt") -> list[tuple[Path, str]]:
    """Plans for `networks` (default all) from the ONNX files in `onnx_dir`; logs a size report."""
    out_dir = Path(out_dir or onnx_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = [build_plan(Path(onnx_dir) / onnx_name(n, precision), out_dir, config=config, network=n,
                       precision=precision, build=build, reuse=reuse, refit=refit, weight_budget=weight_budget,
                       cuda=cuda, flavour=flavour)
            for n in (networks or NETWORKS)]
    total = 0
    for plan, action in done:
        size = plan.stat().st_size
        total += size
        log.info("  %-60s %9.1f MiB  %s", plan.name, size / 2**20, action)
    log.info("  %-60s %9.1f MiB", "total", total / 2**20)
    return done


__all__ = ["BuildConfig", "check_build", "TimingCache", "build_plan", "build_all", "refit_plan", "current_target", "rebuild_command"]
