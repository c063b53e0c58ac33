"""supir-rt: a fast, faithful inference runtime for SUPIR image restoration.

Public API:
* the reference model: `ModelConfig`, `build_model`, `load_checkpoints` (official checkpoints, unchanged);
* restoring: `Restorer` (load once, restore many), `RestoreConfig` and its presets, `Pipeline`;
* errors users see: all are `UserError`s (bad options, inputs or setup; `SettingError` names the
  `RestoreConfig` field): `CheckpointError`, `ImageError`, `SetupError`, `NonFiniteOutputError`;
* progress: `supir_rt.progress` (phase timing and status line).
Engines (`supir_rt.backends`) and captioning (`supir_rt.caption`) live in their packages.

The names are imported on first use (PEP 562), so that ``import supir_rt`` (and ``supir-rt --help``)
does not import torch.
"""

import importlib
import os

# ONNX Runtime >= 1.29 starts Microsoft telemetry when imported (a session file in $TMPDIR, a device id in
# ~/.cache/Microsoft): off unless ORT_DISABLE_TELEMETRY is set otherwise. Before any onnxruntime import.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

_PUBLIC = {
    "Restored": "supir_rt.api", "Restorer": "supir_rt.api",
    "ModelConfig": "supir_rt.config",
    "SettingError": "supir_rt.errors", "SetupError": "supir_rt.errors", "UserError": "supir_rt.errors",
    "ImageError": "supir_rt.images",
    "SUPIRModel": "supir_rt.model.supir", "build_model": "supir_rt.model.supir",
    "Pipeline": "supir_rt.pipeline", "RestoreResult": "supir_rt.pipeline",
    "NonFiniteOutputError": "supir_rt.stages",
    "RESTORE_PRESETS": "supir_rt.restore_config", "RestoreConfig": "supir_rt.restore_config",
    "restore_preset": "supir_rt.restore_config",
    "CheckpointError": "supir_rt.weights", "load_checkpoints": "supir_rt.weights",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'supir_rt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [
    "CheckpointError", "ImageError", "ModelConfig", "NonFiniteOutputError", "Pipeline", "RESTORE_PRESETS",
    "RestoreConfig", "RestoreResult", "Restored", "Restorer", "SUPIRModel", "SettingError", "SetupError",
    "UserError", "build_model",
    "load_checkpoints", "restore_preset", "__version__",
]
