"""supir-rt: a fast, faithful inference runtime for SUPIR image restoration."""

from supir_rt.config import ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "__version__"]
