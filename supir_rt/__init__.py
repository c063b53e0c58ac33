"""supir-rt: a fast, faithful inference runtime for SUPIR image restoration.

Public API:
* the reference model: `ModelConfig`, `build_model`, `load_checkpoints` (official checkpoints, unchanged);
* restoring: `Restorer` (load once, restore many), `RestoreConfig` and its presets, `Pipeline`;
* errors users see: all are `UserError`s (bad options, inputs or setup; `SettingError` names the
  `RestoreConfig` field): `CheckpointError`, `ImageError`, `SetupError`, `NonFiniteOutputError`;
* progress: `supir_rt.progress` (phase timing and status line).
Engines (`supir_rt.backends`) and captioning (`supir_rt.caption`) live in their packages.
"""

import os

# ONNX Runtime >= 1.29 starts Microsoft telemetry when imported (a session file in $TMPDIR, a device id in
# ~/.cache/Microsoft): off unless ORT_DISABLE_TELEMETRY is set otherwise. Before any onnxruntime import.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from supir_rt.api import Restored, Restorer, SetupError  # noqa: E402
from supir_rt.config import ModelConfig  # noqa: E402
from supir_rt.errors import SettingError, UserError  # noqa: E402
from supir_rt.images import ImageError  # noqa: E402
from supir_rt.model.supir import SUPIRModel, build_model  # noqa: E402
from supir_rt.pipeline import NonFiniteOutputError, Pipeline, RestoreResult  # noqa: E402
from supir_rt.restore_config import RESTORE_PRESETS, RestoreConfig, restore_preset  # noqa: E402
from supir_rt.weights import CheckpointError, load_checkpoints  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ImageError", "ModelConfig", "NonFiniteOutputError", "Pipeline", "RESTORE_PRESETS",
    "RestoreConfig", "RestoreResult", "Restored", "Restorer", "SUPIRModel", "SettingError", "SetupError",
    "UserError", "build_model",
    "load_checkpoints", "restore_preset", "__version__",
]
