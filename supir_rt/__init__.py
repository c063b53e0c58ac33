"""supir-rt: a fast, faithful inference runtime for SUPIR image restoration.

Public API: model configs (`ModelConfig`), the reference model (`build_model`), checkpoint loading
(`load_checkpoints`). Heavier parts (pipeline, engines, captioning) live in their modules.
"""

from supir_rt.config import ModelConfig
from supir_rt.model.supir import SUPIRModel, build_model
from supir_rt.weights import CheckpointError, load_checkpoints

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ModelConfig", "SUPIRModel", "build_model", "load_checkpoints", "__version__"]
