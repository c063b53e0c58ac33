"""The command-line knobs of `pytest benchmarks/` (`BenchOptions`), read once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from supir_rt.backends.specs import NETWORKS
from supir_rt.config import ModelConfig

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "torch-opt", "onnxruntime", "tensorrt")
REFERENCE = ("torch", "fp32")  # the case every other one is compared with (parity and speed)


def add_options(parser: pytest.Parser) -> None:
    g = parser.getgroup("supir-rt benchmarks (benchmarks/README.md)")
    g.addoption("--model-size", choices=("tiny", "full"), default="tiny",
                help="tiny preset (seconds) or the official architecture with random weights")
    g.addoption("--latent", default=None,
                help="latent sizes HxW, comma-separated (image = 8x); default tiny 16x16, full 16x16 "
                     "on CPU and 128x128 (1024 px) on CUDA")
    g.addoption("--batch", type=int, default=1, help="images per request B (the UNet runs 2B)")
    g.addoption("--backends", default=",".join(BACKENDS),
                help=f"comma-separated subset of {','.join(BACKENDS)}; torch fp32 (the reference) always runs")
    g.addoption("--precisions", default=None, help="comma-separated fp32,fp16,bf16; default fp32 on CPU, all on CUDA")
    g.addoption("--steps", type=int, default=None, help="sampling steps of the end-to-end restore (default tiny 4, full 2)")
    g.addoption("--networks", default=",".join(NETWORKS), help="comma-separated networks to benchmark")
    g.addoption("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    g.addoption("--torch-opt", default="auto",
                help="what backend torch-opt applies: 'compile', 'channels-last' or 'compile+channels-last'; "
                     "auto = compile+channels-last on CUDA, channels-last on CPU (inductor needs minutes per "
                     "network on a 2-core CPU)")
    g.addoption("--rounds", type=int, default=None, help="timed rounds per case (default tiny 5, full 3)")
    g.addoption("--warmup", type=int, default=1, help="untimed warm-up rounds per case")
    g.addoption("--results-dir", default=str(BENCH_DIR / "results"), help="where the run's JSON is written")
    g.addoption("--artifact-dir", default=None,
                help="ONNX artifacts folder, kept and reused (checked by weights hash); default a temporary folder")
    g.addoption("--engines-dir", default=None, help="TensorRT plans built by export/build_trt.py (tensorrt backend)")
    g.addoption("--sdxl-checkpoint", default=None, help="real weights: the SDXL base .safetensors")
    g.addoption("--supir-checkpoint", default=None, help="real weights: SUPIR-v0Q/v0F .ckpt")
    g.addoption("--seed", type=int, default=0, help="seed of the random weights and feeds")


def _parse_latent(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise pytest.UsageError(f"--latent {text!r}: write HxW, e.g. 32x32") from None
    if h < 8 or w < 8:
        raise pytest.UsageError(f"--latent {text!r}: latents start at 8x8 (64 px)")
    return h, w


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


@dataclass(frozen=True)
class BenchOptions:
    model_size: str
    config: ModelConfig
    device: torch.device
    latents: tuple[tuple[int, int], ...]
    batch: int
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    networks: tuple[str, ...]
    steps: int
    torch_opt: str
    rounds: int
    warmup: int
    results_dir: Path
    artifact_dir: Path | None
    engines_dir: Path | None
    checkpoints: tuple[str, str] | None
    seed: int

    @property
    def low_memory(self) -> bool:
        """One model part resident at a time: the full architecture on CPU without real weights."""
        return self.model_size == "full" and self.device.type == "cpu" and self.checkpoints is None

    def knobs(self) -> dict[str, Any]:
        return {"model_size": self.model_size, "device": str(self.device), "latents": [list(x) for x in self.latents],
                "batch": self.batch, "backends": list(self.backends), "precisions": list(self.precisions),
                "networks": list(self.networks), "steps": self.steps, "torch_opt": self.torch_opt,
                "rounds": self.rounds, "warmup_rounds": self.warmup, "seed": self.seed,
                "weights": "checkpoints" if self.checkpoints else "random",
                "checkpoints": list(self.checkpoints) if self.checkpoints else None}


def read_options(config: pytest.Config) -> BenchOptions:
    get = config.getoption
    size = get("--model-size")
    dev_opt = get("--device")
    device = torch.device("cuda" if dev_opt == "auto" and torch.cuda.is_available() else
                          ("cpu" if dev_opt == "auto" else dev_opt))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device here")
    default_latent = {"tiny": "16x16", "full": "128x128" if device.type == "cuda" else "16x16"}[size]
    backends = tuple(_split(get("--backends")))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise pytest.UsageError(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    if "torch" not in backends:
        backends = ("torch", *backends)  # the reference case is always measured in the same run
    precisions = tuple(_split(get("--precisions") or ("fp32" if device.type == "cpu" else "fp32,fp16,bf16")))
    if bad := [p for p in precisions if p not in PRECISIONS]:
        raise pytest.UsageError(f"--precisions: unknown {bad}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in precisions:
        precisions = ("fp32", *precisions)
    networks = tuple(_split(get("--networks")))
    if bad := [n for n in networks if n not in NETWORKS]:
        raise pytest.UsageError(f"--networks: unknown {bad}; choose from {', '.join(NETWORKS)}")
    opt = get("--torch-opt")
    if opt == "auto":
        opt = "compile+channels-last" if device.type == "cuda" else "channels-last"
    if not set(opt.split("+")) <= {"compile", "channels-last"}:
        raise pytest.UsageError(f"--torch-opt {opt!r}: use compile, channels-last or compile+channels-last")
    ckpts = (get("--sdxl-checkpoint"), get("--supir-checkpoint"))
    if any(ckpts) and not all(ckpts):
        raise pytest.UsageError("real weights need both --sdxl-checkpoint and --supir-checkpoint")
    if all(ckpts) and size != "full":
        raise pytest.UsageError("checkpoints hold the official architecture: add --model-size full")
    art = get("--artifact-dir")
    eng = get("--engines-dir")
    return BenchOptions(
        model_size=size, config=ModelConfig.tiny() if size == "tiny" else ModelConfig.official(), device=device,
        latents=tuple(_parse_latent(x) for x in _split(get("--latent") or default_latent)),
        batch=get("--batch"), backends=backends, precisions=precisions, networks=networks,
        steps=get("--steps") or (4 if size == "tiny" else 2), torch_opt=opt,
        rounds=get("--rounds") or (5 if size == "tiny" else 3), warmup=get("--warmup"),
        results_dir=Path(get("--results-dir")), artifact_dir=Path(art) if art else None,
        engines_dir=Path(eng) if eng else None, checkpoints=ckpts if all(ckpts) else None, seed=get("--seed"),
    )
