"""The backend registry: backends by name, `auto` (the fastest available), `open_engines`.

The built-in backends are the modules of `BUILTIN`, imported on first use; each registers its name(s)
with `register_backend` (its availability check, its engine factory and, for the exported-engine
backends, a check of an artifacts folder). A module that cannot be imported (onnxruntime or TensorRT not
installed) registers nothing and is reported as unavailable by `available_backends`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from supir_rt.backends.base import Engine

log = logging.getLogger("supir_rt.backends")

# the built-in backend modules, in the order they are loaded (plugins: by name, not imported here)
BUILTIN = ("supir_rt.backends.torch_backend", "supir_rt.backends.onnxruntime_backend",
           "supir_rt.backends.tensorrt_backend")
OPTIONAL = frozenset(BUILTIN[1:])  # these need an optional dependency

# name -> (is_available() -> str | None reason-not-available, factory(**kwargs) -> dict[str, Engine])
EngineFactory = Callable[..., dict[str, Engine]]
BACKENDS: dict[str, tuple[Callable[[], str | None], EngineFactory]] = {}
# `auto` tries these in order: fastest first. "torch" covers CPU and CUDA (`--device` chooses).
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime", "torch")


# name -> artifacts_reason(artifact_dir=, config=, precision=) -> None if the folder holds usable
# artifacts for this backend here, else why not (`auto` skips the backend then).
ARTIFACT_CHECKS: dict[str, Callable[..., str | None]] = {}


def register_backend(name: str, unavailable_reason: Callable[[], str | None], factory: EngineFactory, *,
                     artifacts_reason: Callable[..., str | None] | None = None) -> None:
    BACKENDS[name] = (unavailable_reason, factory)
    if artifacts_reason is not None:
        ARTIFACT_CHECKS[name] = artifacts_reason


def _load_builtin_backends() -> None:
    for module in BUILTIN:
        try:
            importlib.import_module(module)
        except ImportError:
            if module not in OPTIONAL:
                raise


def available_backends() -> dict[str, str | None]:
    """Backend name -> None if usable here, else the reason it is not."""
    _load_builtin_backends()
    return {name: reason() for name, (reason, _) in BACKENDS.items()}


def resolve_backend(name: str, *, needs_artifacts: bool = False, artifacts: Mapping[str, Any] | None = None) -> str:
    """Validate a backend name; `auto` picks the first available of AUTO_ORDER (with `needs_artifacts`,
    only backends that run exported engines: the PyTorch ones need the checkpoints instead). With
    `artifacts` (artifact_dir=, config=, precision=) a backend that checks its artifacts is skipped
    when the folder holds none usable here; the choice and the reasons go to one log line."""
    status = available_backends()
    if name == "auto":
        skipped = []
        for candidate in AUTO_ORDER:
            if needs_artifacts and candidate.startswith("torch"):
                continue
            if candidate not in status:
                continue
            reason = status[candidate]
            if reason is None and artifacts is not None and candidate in ARTIFACT_CHECKS:
                reason = ARTIFACT_CHECKS[candidate](**artifacts)
                if reason is not None:
                    skipped.append(f"{candidate}: {reason}")
            if reason is None:
                if skipped:
                    log.info("backend auto: %s (skipped %s)", candidate, "; ".join(skipped))
                return candidate
        raise RuntimeError(f"no backend is available: {status}")
    if name not in status:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(['auto', *status])}")
    if status[name] is not None:
        raise RuntimeError(f"backend {name!r} is not available here: {status[name]}")
    return name


def open_engines(backend: str = "auto", **kwargs: Any) -> dict[str, Engine]:
    """Open all networks on one backend. kwargs are the backend factory's (model=, artifact_dir=, ...)."""
    name = resolve_backend(backend)
    return BACKENDS[name][1](**kwargs)


__all__ = ["ARTIFACT_CHECKS", "AUTO_ORDER", "BACKENDS", "BUILTIN", "available_backends", "open_engines",
           "register_backend", "resolve_backend"]
