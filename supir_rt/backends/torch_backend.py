"""The PyTorch backend: the reference modules behind the Engine protocol."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from supir_rt.backends import EngineBase, register_backend
from supir_rt.backends.modules import NETWORK_MODULES
from supir_rt.backends.specs import network_specs
from supir_rt.model.supir import SUPIRModel


class TorchEngine(EngineBase):
    backend = "torch"

    def __init__(self, module: torch.nn.Module, spec, device, dtype: torch.dtype, *, validate: bool = True) -> None:
        super().__init__(spec, device, validate=validate)
        self.module, self.dtype = module, dtype

    @torch.inference_mode()
    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = []
        for s in self.spec.inputs:
            t = feed[s.name].to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {s.name: o.float() for s, o in zip(self.spec.outputs, outs)}


def open_torch_engines(*, model: SUPIRModel, validate: bool = True, **_: object) -> dict[str, TorchEngine]:
    """Engines over an already-built (and loaded) reference model. Each network runs on the device and
    in the dtype of its own parameters, so a model whose diffusion networks were cast to fp16/bf16 while
    the VAE and text encoders stay fp32 (SUPIR's precision split) works as it is."""
    specs = network_specs(model.config)
    engines = {}
    for name, cls in NETWORK_MODULES.items():
        module = cls(model)
        p = next(module.parameters())
        engines[name] = TorchEngine(module, specs[name], p.device, p.dtype, validate=validate)
    return engines


register_backend("torch", lambda: None, open_torch_engines)
register_backend(
    "torch-cuda", lambda: None if torch.cuda.is_available() else "no CUDA device", open_torch_engines
)
