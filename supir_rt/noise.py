"""The single source of randomness of a restore run.

The official `SUPIRModel.batchify_sample` calls ``seed_everything(seed)`` and then draws, in order:

1. the SDXL VAE posterior sample for ``x_center`` (`z_stage1`): ``torch.randn`` on the **CPU**
   generator, then moved to the device (`DiagonalGaussianDistribution.sample`);
2. the initial noise ``randn_like(_z)`` on the **device** generator;
3. one ``randn_like(x)`` on the device generator per sampler step with γ > 0 (churn).

`NoiseSource` reproduces that order with explicit ``torch.Generator`` objects instead of the global
RNG. With ``device="cpu"`` (default) one CPU generator seeded with ``seed`` serves all three, which is
the stream of an official run on a machine without CUDA. With ``device="cuda"`` draws 2 and 3 come from a
CUDA generator seeded with the same seed, as ``seed_everything`` seeds every CUDA device in an official
GPU run, while draw 1 stays on the CPU generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from supir_rt import cuda_runtime


class NoiseSource:
    """Seeded generators for the posterior sample (CPU) and the sampler noise (``device``).

    Methods are to be called in the official order: `posterior` (or `skip_posterior`) once, then
    `randn_like` for the initial noise and once per churned step. Pass the bound method
    ``source.randn_like`` to the samplers as their ``noise`` argument.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        self.seed = seed
        self.device = cuda_runtime.normalize_device(device)
        self.cpu_generator = torch.Generator("cpu").manual_seed(seed)
        if self.device.type == "cpu":
            self.device_generator = self.cpu_generator
        else:
            self.device_generator = cuda_runtime.generator(self.device, seed)

    def posterior(
        self, shape: Sequence[int], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Standard normal draw for the VAE posterior sample: float32 on the CPU generator, then moved
        to ``device``/``dtype`` (as `DiagonalGaussianDistribution.sample` does)."""
        return torch.randn(tuple(shape), generator=self.cpu_generator).to(device=device, dtype=dtype)

    def skip_posterior(self, shape: Sequence[int]) -> None:
        """Consume exactly the draw `posterior(shape)` would make, without returning it.

        For runs that do not need ``x_center`` (restoration guidance off): the official code still
        computes it, so skipping the encoder must not shift the later draws.
        """
        torch.randn(tuple(shape), generator=self.cpu_generator)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal with x's shape and dtype, drawn on the noise generator's device and moved to
        x's device (``torch.randn_like`` on the device RNG in the official code)."""
        out = torch.randn(x.shape, generator=self.device_generator, device=self.device, dtype=x.dtype)
        if out.device.type == "cpu" and x.device.type == "cuda":
            # through pinned memory, asynchronously: a plain host->GPU copy waits for the GPU queue,
            # which would stall the sampler loop at every churned step (the caching host allocator
            # keeps the pinned block alive until the copy has run)
            return out.pin_memory().to(x.device, non_blocking=True)
        return out.to(x.device)

    def __repr__(self) -> str:
        return f"NoiseSource(seed={self.seed}, device={str(self.device)!r})"


__all__ = ["NoiseSource"]
