"""`AppConfig`: the settings of the Ray Serve application (no Ray import, so that the CLI and config
generation work without starting anything)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supir_rt.serve.protocol import Limits
from supir_rt.serve.worker import RuntimeOptions

APP_NAME = "supir"


@dataclass(frozen=True)
class AppConfig:
    """Everything `build_app` takes (flat keys: the ``args`` of a Ray Serve config file)."""

    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    limits: Limits = field(default_factory=Limits)
    replicas: int = 1
    min_replicas: int | None = None  # both set: autoscaling between them instead of a fixed count
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float | None = None  # None: 1, or what fits the cluster beside the HTTP front
    max_batch_size: int = 4
    batch_wait_s: float = 0.05
    max_ongoing_requests: int = 4  # per replica
    max_queued_requests: int = 16  # waiting for a replica, per caller
    retry_after_s: float = 5.0

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AppConfig:
        """From flat ``args`` (runtime, limit and deployment keys mixed); unknown keys are an error."""
        groups = {"runtime": RuntimeOptions, "limits": Limits}
        names = {name: [f.name for f in dataclasses.fields(kind)] for name, kind in groups.items()}
        own = [f.name for f in dataclasses.fields(cls) if f.name not in groups]
        parts: dict[str, dict[str, Any]] = {name: {} for name in groups}
        top: dict[str, Any] = {}
        for key, value in args.items():
            target = next((g for g, keys in names.items() if key in keys), None)
            if target is not None:
                parts[target][key] = value
            elif key in own:
                top[key] = value
            else:
                known = sorted(own + [k for keys in names.values() for k in keys])
                raise ValueError(f"unknown serve setting {key!r}; known: {', '.join(known)}")
        config = cls(runtime=RuntimeOptions(**parts["runtime"]), limits=Limits(**parts["limits"]), **top)
        config.check()
        return config

    def as_args(self) -> dict[str, Any]:
        out = {**dataclasses.asdict(self.runtime), **dataclasses.asdict(self.limits)}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("runtime", "limits")})
        return out

    def check(self) -> None:
        self.runtime.scale()  # the tile-worker settings (SetupError naming the flag)
        if self.runtime.ray_address:
            raise ValueError(f"--ray-address {self.runtime.ray_address}: a replica's tile workers run on the Ray "
                             "cluster the replicas run on (--address); drop --ray-address")
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas}: use at least 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}: need 0 <= min <= max")
        if self.max_batch_size < 1 or self.max_ongoing_requests < 1 or self.max_queued_requests < 1:
            raise ValueError("max_batch_size, max_ongoing_requests and max_queued_requests must be >= 1")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(f"max_batch_size={self.max_batch_size} > max_ongoing_requests={self.max_ongoing_requests}: "
                             "a replica can only batch requests it holds; raise max_ongoing_requests")


__all__ = ["APP_NAME", "AppConfig"]
