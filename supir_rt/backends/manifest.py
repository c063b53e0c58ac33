"""Self-describing engine artifacts: names, the JSON manifest beside each file, and its check.

Every exported ONNX graph and every TensorRT plan gets a manifest recording what it is
(network, I/O spec, model-config fingerprint, precision), how it was made (exporter, opset, tool
versions, build settings) and from what (hash of the weights and of the source checkpoints). At load
time `check_manifest` compares the manifest with what the runtime expects and refuses a mismatch
with a message that names the file and the command that rebuilds it.

File names (documented in engines/README.md):
* ONNX:      ``<network>_<precision>.onnx`` (+ ``.onnx.data`` external weights) and ``.json`` manifest;
* TensorRT:  ``<network>_<precision>_sm<cc>_trt<version>.plan`` (TensorRT-RTX: ``_rtx<version>``) and
  ``.plan.json``; the plan's optimisation profiles, its identity (flavour, full version, GPU) and the
  ONNX/weights hashes it was built from are in the manifest (`check_plan` compares them with this GPU
  and hashes the ONNX files in the folder).

Files are written atomically (a temporary file in the same folder, then a rename), so a crash or a
failed build never leaves a half-written plan or manifest behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from supir_rt.backends.specs import DEFAULT_RANGES, DimRange, NetworkSpec
from supir_rt.config import ModelConfig
from supir_rt.errors import UserError

MANIFEST_VERSION = 1
Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
REBUILD_ONNX = "python export/build_engines.py"


class ArtifactError(UserError, RuntimeError):
    """An engine artifact is missing, stale, or was built for something else."""


# ----------------------------------------------------------------------------------------- names

def onnx_name(network: str, precision: str) -> str:
    return f"{network}_{precision}.onnx"


def manifest_path(artifact: Path) -> Path:
    """The manifest beside an artifact: ``x.onnx`` -> ``x.json``, ``x.plan`` -> ``x.plan.json``."""
    artifact = Path(artifact)
    return artifact.with_suffix(".json") if artifact.suffix == ".onnx" else artifact.with_name(artifact.name + ".json")


def profile_tag(ranges: Mapping[str, DimRange] = DEFAULT_RANGES) -> str:
    """Short, readable profile key, e.g. ``B1-1-4.h8-128-256.w8-128-256`` (min-opt-max per symbol)."""
    return ".".join(f"{k}{r.min}-{r.opt}-{r.max}" for k, r in sorted(ranges.items()))


def plan_name(network: str, precision: str, compute_capability: tuple[int, int], trt_version: str,
              flavour: str = "tensorrt") -> str:
    """One plan per network, precision, GPU family, flavour and version; its profiles are in the
    manifest (the runtime reads them from there, never from the name)."""
    sm = f"{compute_capability[0]}{compute_capability[1]}"
    tag = "rtx" if flavour == "tensorrt-rtx" else "trt"
    return f"{network}_{precision}_sm{sm}_{tag}{trt_version}.plan"


def timing_cache_name(compute_capability: tuple[int, int], trt_version: str) -> str:
    """The builder's timing cache beside the plans (tactic timings are only valid for one GPU/version)."""
    return f"timing_sm{compute_capability[0]}{compute_capability[1]}_trt{trt_version}.cache"


def rebuild_command(config: ModelConfig, precision: str, *, trt: bool = False, artifact_dir: Path | None = None,
                    extra: str = "", rtx: bool = False) -> str:
    """The command line that rebuilds artifacts for this configuration (quoted in every error).
    TensorRT plans are rebuilt from the ONNX files already in the folder (``--trt-only``)."""
    out = f" --out {artifact_dir}" if artifact_dir is not None else ""
    if trt:
        src = " --tiny-random" if config.name == "tiny" else ""
        return f"{REBUILD_ONNX} --trt-only{' --trt-rtx' if rtx else ''}{src} --precision {precision}{out}{extra}"
    src = "--tiny-random" if config.name == "tiny" else "--sdxl SDXL.safetensors --supir SUPIR-v0Q.ckpt"
    return f"{REBUILD_ONNX} {src} --precision {precision}{out}{extra}"


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    readers see the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------ fingerprints

def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of named tensors (names, dtypes, shapes and bytes): identifies the weights an artifact holds."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def config_fingerprint(config: ModelConfig) -> str:
    """Hash of the network-defining parts of a model config (prompts and name excluded)."""
    parts = {k: dataclasses.asdict(getattr(config, k)) for k in
             ("network_config", "control_stage_config", "first_stage_config", "conditioner_config")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_to_json(spec: NetworkSpec) -> dict[str, Any]:
    def tensors(ts):
        return [{"name": t.name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for t in ts]

    return {"name": spec.name, "inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs)}


# --------------------------------------------------------------------------------------- manifest

@dataclasses.dataclass(frozen=True)
class Manifest:
    """What sits in ``<artifact>.json``. `files` maps each file of the artifact (graph, external
    data) to its sha256; `source` says where the weights came from."""

    network: str
    kind: Literal["onnx", "tensorrt", "tensorrt-rtx"]
    precision: str
    config_name: str
    config_fingerprint: str
    spec: dict[str, Any]
    files: dict[str, str]
    weights_sha256: str
    source: dict[str, Any]
    tools: dict[str, str]
    build: dict[str, Any]
    version: int = MANIFEST_VERSION

    def write(self, path: Path) -> None:
        atomic_write_bytes(Path(path), (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(Path(path).read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise ArtifactError(f"{path}: manifest version {data.get('version')}, this runtime reads "
                                f"{MANIFEST_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_manifest(artifact: Path, *, spec: NetworkSpec, config: ModelConfig, precision: str,
                   kind: Literal["onnx", "tensorrt", "tensorrt-rtx"] = "onnx", verify_hash: bool = True,
                   extra: Mapping[str, Any] | None = None) -> Manifest:
    """Refuse an artifact that is missing, altered, or built for another spec/config/precision.

    `extra` holds further build fields that must match (e.g. TensorRT version, compute capability).
    Every error names the file and the command that rebuilds it.
    """
    artifact = Path(artifact)
    fix = ("rebuild with: " + rebuild_command(config, precision, trt=kind != "onnx", artifact_dir=artifact.parent,
                                              rtx=kind == "tensorrt-rtx"))
    mpath = manifest_path(artifact)
    if not artifact.is_file():
        raise ArtifactError(f"{kind} artifact for {spec.name!r} ({precision}) not found: {artifact}; {fix}")
    if not mpath.is_file():
        raise ArtifactError(f"{artifact}: no manifest {mpath.name} beside it, so it cannot be trusted; {fix}")
    try:
        man = Manifest.read(mpath)
    except (json.JSONDecodeError, TypeError) as err:
        raise ArtifactError(f"{mpath}: unreadable manifest ({err}); {fix}") from None
    problems = []
    if man.kind != kind or man.network != spec.name:
        problems.append(f"it describes {man.kind} {man.network!r}, expected {kind} {spec.name!r}")
    if man.precision != precision:
        problems.append(f"precision {man.precision}, expected {precision}")
    if man.config_fingerprint != config_fingerprint(config):
        problems.append(f"built for model config {man.config_name!r} ({man.config_fingerprint}), "
                        f"requested {config.name!r} ({config_fingerprint(config)})")
        if man.config_name == "tiny" and config.name != "tiny":  # rebuilding here would overwrite them
            fix = ("these are the tiny random model's engines: run them with --tiny-random, or give "
                   "--engines-dir a folder of engines built from the checkpoints")
    if man.spec != spec_to_json(spec):
        problems.append(f"I/O spec differs: artifact {man.spec}, expected {spec_to_json(spec)}")
    for key, want in (extra or {}).items():
        if man.build.get(key) != want:
            problems.append(f"{key} is {man.build.get(key)!r}, expected {want!r}")
    for name, digest in man.files.items():
        f = artifact.parent / name
        if not f.is_file():
            problems.append(f"file {f} listed in the manifest is missing")
        elif verify_hash and file_sha256(f) != digest:
            problems.append(f"{f.name} has changed since it was built (sha256 differs from the manifest)")
    if problems:
        raise ArtifactError(f"{artifact} does not match what the runtime expects: " + "; ".join(problems)
                            + f"; {fix}")
    return man


# ------------------------------------------------------------------------------------ TensorRT plans

@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What a plan is only valid for (its identity): the GPU model and compute capability, the
    flavour (TensorRT or TensorRT-RTX) and its full version, build number included (a default plan
    loads only on the version that built it: docs.nvidia.com TensorRT "Version Compatibility")."""

    name: str
    compute_capability: tuple[int, int]
    tensorrt: str
    flavour: str = "tensorrt"

    def fields(self) -> dict[str, str]:
        """The manifest `build` fields that must equal this target."""
        cc = self.compute_capability
        return {"gpu_name": self.name, "compute_capability": f"{cc[0]}.{cc[1]}", "tensorrt": self.tensorrt,
                "flavour": self.flavour}

    def plan(self, folder: Path, network: str, precision: str) -> Path:
        return Path(folder) / plan_name(network, precision, self.compute_capability, self.tensorrt, self.flavour)


def check_plan(plan: Path, *, spec: NetworkSpec, config: ModelConfig, precision: str, target: GpuTarget,
               verify_hash: bool = True) -> Manifest:
    """`check_manifest` for a TensorRT(-RTX) plan, plus: built for this GPU, flavour and version
    (`target`), and not stale: the ONNX files it was built (or last refitted) from must still be in
    the folder, with their manifest, and (``verify_hash``) hash to what the plan records. Every
    refusal names the command that rebuilds the plan."""
    plan = Path(plan)
    rtx = target.flavour == "tensorrt-rtx"
    fix = rebuild_command(config, precision, trt=True, artifact_dir=plan.parent, rtx=rtx)
    if not plan.is_file():
        others = sorted(p.name for p in plan.parent.glob(f"{spec.name}_*.plan")) if plan.parent.is_dir() else []
        if others:
            raise ArtifactError(f"no {'TensorRT-RTX' if rtx else 'TensorRT'} plan {plan.name} for this GPU "
                                f"({target.name}, compute capability {target.fields()['compute_capability']}), "
                                f"version {target.tensorrt} and precision {precision} in {plan.parent} (it holds "
                                f"{', '.join(others)}: other GPUs, TensorRT flavours or versions, or precisions); "
                                f"rebuild with: {fix}")
    man = check_manifest(plan, spec=spec, config=config, precision=precision, kind=target.flavour,
                         verify_hash=verify_hash, extra=target.fields())
    onnx = plan.parent / man.build.get("onnx", onnx_name(spec.name, precision))
    if not onnx.is_file() or not manifest_path(onnx).is_file():
        missing = onnx if not onnx.is_file() else manifest_path(onnx)
        raise ArtifactError(f"{plan}: the ONNX artifact it was built from is not beside it ({missing} is missing), "
                            "so the plan cannot be checked for staleness (or refilled if stripped); keep the ONNX "
                            f"files and their manifests with the plans, or export and rebuild: "
                            f"{rebuild_command(config, precision, artifact_dir=plan.parent)} --trt"
                            + (" --trt-rtx" if rtx else ""))
    current = Manifest.read(manifest_path(onnx))
    recorded = man.build.get("onnx_files") or {onnx.name: man.build.get("onnx_sha256")}
    if verify_hash:
        now_files = {name: file_sha256(plan.parent / name) if (plan.parent / name).is_file() else "missing"
                     for name in recorded}
    else:  # cheap: what the ONNX manifest says its files are
        now_files = {name: current.files.get(name, "missing") for name in recorded}
    built = (recorded, man.weights_sha256)
    now = (now_files, current.weights_sha256)
    if built != now:
        what = "its weights" if built[1] != now[1] else "the graph"
        changed = sorted(n for n in recorded if recorded[n] != now_files[n]) or [onnx.name]
        raise ArtifactError(
            f"{plan} is stale: it was built from {onnx.name} (weights {str(built[1])[:12]}), the folder now holds "
            f"other bytes in {', '.join(changed)} (weights {str(now[1])[:12]}): {what} changed after the plan was "
            f"built; rebuild with: {fix}"
            + (f" (or, same architecture with other weights, refit it: {fix} --refit)"
               if man.build.get("refit") == "full" else ""))
    return man


# ------------------------------------------------------------------------------ documented contract

def contract_markdown(specs: Mapping[str, NetworkSpec], ranges: Mapping[str, DimRange] = DEFAULT_RANGES) -> str:
    """The engine I/O contract as Markdown tables, generated from the specs (engines/README.md)."""
    lines = []
    for spec in specs.values():
        lines += [f"### `{spec.name}`", "", spec.doc, "", "| direction | name | dtype | shape |", "|---|---|---|---|"]
        for direction, tensors in (("input", spec.inputs), ("output", spec.outputs)):
            for t in tensors:
                shape = ", ".join(str(d) for d in t.shape)
                lines.append(f"| {direction} | `{t.name}` | {str(t.dtype).removeprefix('torch.')} | ({shape}) |")
        lines.append("")
    lines.append("Default symbol ranges (TensorRT min / opt / max): "
                 + ", ".join(f"`{k}` {r.min} / {r.opt} / {r.max}" for k, r in ranges.items()) + ".")
    return "\n".join(lines) + "\n"
