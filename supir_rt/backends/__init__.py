"""Engines: one protocol for every backend (`base`), a registry of backends by name (`registry`), the
networks' I/O contract (`specs`). The pipeline only ever calls `Engine.infer`; nothing above this package
knows which backend runs a network.
"""

from supir_rt.backends.base import Engine, EngineBase
from supir_rt.backends.registry import (
    ARTIFACT_CHECKS, AUTO_ORDER, BACKENDS, available_backends, open_engines, register_backend, resolve_backend,
)
from supir_rt.backends.specs import NETWORKS

__all__ = ["ARTIFACT_CHECKS", "AUTO_ORDER", "BACKENDS", "Engine", "EngineBase", "NETWORKS", "available_backends",
           "open_engines", "register_backend", "resolve_backend"]
