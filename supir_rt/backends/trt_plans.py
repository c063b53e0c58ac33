"""TensorRT plans and their identity: finding, checking and loading a plan before any context exists.

A plan is found by name (``<network>_<precision>_sm<cc>_<trt|rtx><version>.plan``, `GpuTarget.plan`)
and trusted only after `manifest.check_plan` (identity: flavour, full version, GPU; hashes; the ONNX
files it was built from, hashed) and, once deserialised, after its I/O and profiles are compared
with the spec and the manifest. A stripped plan is refilled from its ONNX file; a streaming plan
gets its weight budget here, before its context exists (TensorRT refuses a budget change while
contexts exist: NvInferRuntime.h setWeightStreamingBudgetV2). TensorRT-RTX plans keep the kernels
compiled just in time in a runtime cache file beside the plan (`RuntimeCacheFile`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from supir_rt.backends.manifest import ArtifactError, Manifest, atomic_write_bytes
from supir_rt.backends.specs import NetworkSpec, Profile
from supir_rt.backends.trt_api import TrtApi
from supir_rt.errors import UserError

log = logging.getLogger(__name__)


class TensorRTError(ArtifactError):
    """TensorRT refused a plan or a call (or the GPU ran out of memory); the message says what and how
    to fix it. An ArtifactError, so the API and the command line report it as one clear line."""


class ProfileError(UserError):
    """A request outside every optimisation profile of a plan (a `UserError`, hence a `ValueError`:
    the message says which sizes the plans cover)."""


def torch_dtypes(trt) -> dict[torch.dtype, Any]:
    return {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16,
            torch.int64: trt.DataType.INT64, torch.int32: trt.DataType.INT32, torch.int8: trt.DataType.INT8,
            torch.uint8: trt.DataType.UINT8, torch.bool: trt.DataType.BOOL}


def _name(value: Any) -> str:
    return getattr(value, "name", str(value))


def make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps the recent errors, so that a failed call
    can be reported with TensorRT's own reason."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors = [*self.errors[-9:], msg]
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def last_error(self) -> str:
            return f" (TensorRT: {self.errors[-1]})" if self.errors else ""

    return Logger()


class RuntimeCacheFile:
    """TensorRT-RTX's just-in-time kernels for one plan, kept in ``<plan>.runtime.cache`` beside it.
    A missing file is the first launch on this GPU (compiled now, then saved); one from another
    GPU or TensorRT-RTX version is replaced. Saved atomically after the context is created and at close."""

    def __init__(self, plan: Path, api: TrtApi, engine) -> None:
        self.path = plan.with_name(plan.name + ".runtime.cache")
        self.api = api
        data = self.path.read_bytes() if self.path.is_file() else b""
        if not data:
            log.info("%s: no TensorRT-RTX runtime cache yet; compiling kernels for this GPU (seconds), then saving "
                     "them to %s", plan.name, self.path.name)
        self.cache = api.new_runtime_cache(engine, data)

    def save(self) -> None:
        data = bytes(self.cache.serialize())
        if data:
            atomic_write_bytes(self.path, data)


class LoadedPlan:
    """A deserialised plan checked against its spec and manifest, weights in place, budget set."""

    def __init__(self, path: Path, spec: NetworkSpec, manifest: Manifest, *, trt, api: TrtApi, runtime, logger,
                 rebuild: str, weight_budget: int | None = None) -> None:
        self.path, self.spec, self.manifest, self.rebuild = Path(path), spec, manifest, rebuild
        self.trt, self.api, self.logger = trt, api, logger
        self.profiles = tuple(Profile.from_json(p) for p in manifest.build["profiles"])
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{api.flavour} could not deserialize {self.path}{logger.last_error()}; the plan is "
                                f"corrupt or from another TensorRT version, flavour or GPU: rebuild with: {rebuild}")
        self._check_io()
        self._check_profiles()
        if manifest.build.get("stripped"):
            self._refill_weights()
        self.streaming = bool(manifest.build.get("weight_streaming"))
        budget = weight_budget if weight_budget is not None else manifest.build.get("runtime", {}).get("weight_budget")
        if self.streaming and budget is not None:
            self._set_weight_budget(int(budget))
        elif budget is not None and weight_budget is not None:
            raise TensorRTError(f"{self.path.name} was not built for weight streaming; rebuild it with "
                                f"--trt-weight-budget: {rebuild} --trt-weight-budget {budget}")
        self.runtime_cache = RuntimeCacheFile(self.path, api, self.engine) if api.rtx else None

    def _check_io(self) -> None:
        e, trt, dtypes = self.engine, self.trt, torch_dtypes(self.trt)
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        want = self.spec.input_names + self.spec.output_names
        problems = [f"tensors {sorted(names)}, spec {sorted(want)}"] if sorted(names) != sorted(want) else []
        for mode, specs in ((trt.TensorIOMode.INPUT, self.spec.inputs), (trt.TensorIOMode.OUTPUT, self.spec.outputs)):
            for s in specs:
                if s.name not in names:
                    continue
                if e.get_tensor_mode(s.name) != mode:
                    problems.append(f"{s.name} is {_name(e.get_tensor_mode(s.name))}, the spec says {_name(mode)}")
                if e.get_tensor_dtype(s.name) != dtypes[s.dtype]:
                    problems.append(f"{s.name} is {_name(e.get_tensor_dtype(s.name))}, the spec says {s.dtype}")
                shape = tuple(e.get_tensor_shape(s.name))
                if len(shape) != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, shape)):
                    problems.append(f"{s.name} has shape {shape}, the spec says {s.shape}")
        if problems:
            raise TensorRTError(f"{self.path.name}: the plan's I/O differs from the {self.spec.name} spec: "
                                + "; ".join(problems) + f"; rebuild with: {self.rebuild}")

    def _check_profiles(self) -> None:
        e = self.engine
        if e.num_optimization_profiles != len(self.profiles):
            raise TensorRTError(f"{self.path.name} has {e.num_optimization_profiles} profiles, its manifest lists "
                                f"{len(self.profiles)}; rebuild with: {self.rebuild}")
        dynamic = {s.name for s in self.spec.inputs if s.symbols()}  # static inputs need no profile shapes
        for i, p in enumerate(self.profiles):
            for name, shapes in self.spec.profile(p.range_map).items():
                if name not in dynamic:
                    continue
                got = tuple(tuple(d) for d in e.get_tensor_profile_shape(name, i))
                if got != tuple(shapes):
                    raise TensorRTError(f"{self.path.name}: profile {i} ({p.name}) of {name} is {got} in the plan, "
                                        f"{tuple(shapes)} in the manifest; rebuild with: {self.rebuild}")

    def _refill_weights(self) -> None:
        """A weight-stripped plan gets its weights from the ONNX file it was built (or refitted) from."""
        onnx = self.path.parent / self.manifest.build["onnx"]
        if not onnx.is_file():
            raise ArtifactError(f"{self.path.name} was built without weights (stripped); they are loaded from {onnx}, "
                                f"which is missing: put the ONNX files beside the plans or rebuild with: {self.rebuild}")
        refitter = self.trt.Refitter(self.engine, self.logger)
        parser = self.trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"could not read the weights of {onnx} for {self.path.name}: {errors}")
        if not refitter.refit_cuda_engine():
            raise TensorRTError(f"TensorRT could not refit {self.path.name} from {onnx}: missing weights "
                                f"{list(refitter.get_missing_weights())[:5]}{self.logger.last_error()}")

    def _set_weight_budget(self, budget: int) -> None:
        got = self.api.set_weight_budget(self.engine, budget)
        everything = self.api.v2 and budget >= self.engine.streamable_weights_size == got  # no streaming needed
        if got != budget and not everything:
            raise TensorRTError(f"{self.path.name}: TensorRT did not accept the weight-streaming budget {budget} "
                                f"bytes (it reports {got}){self.logger.last_error()}")
        log.info("%s streams weights: %.2f GiB kept on the GPU", self.path.name, budget / 2**30)

    def create_context(self):
        ctx = self.api.create_context(self.engine, self.runtime_cache.cache if self.runtime_cache else None)
        if not ctx:
            raise TensorRTError(f"{self.api.flavour} could not create an execution context for {self.path.name}"
                                f"{self.logger.last_error()}; out of GPU memory? Free memory or stream weights "
                                "(--trt-weight-budget)")
        if self.runtime_cache is not None:
            self.runtime_cache.save()
        return ctx


__all__ = ["TensorRTError", "ProfileError", "LoadedPlan", "RuntimeCacheFile", "make_logger", "torch_dtypes"]
