"""Loading the official checkpoints, unchanged: the SDXL base single file and SUPIR-v0Q/v0F.

The official loader (`SUPIR/util.py::create_SUPIR_model`) loads both files with `strict=False`.
Here loading is strict and streaming:
* every model key must come from one of the two files, with the right shape;
* a file may carry only model keys, except the tolerated extras below;
* tensors are read one at a time (safetensors `safe_open`, or a `weights_only` + mmap `torch.load`)
  and copied into the already-allocated parameters, converting dtype per tensor, so loading fp32
  files into an fp16 model never holds an fp32 copy of the model.

`.ckpt` files are pickles: they are opened with `weights_only=True`, so a file that carries code is
refused without running it.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from supir_rt.errors import UserError

log = logging.getLogger(__name__)

# Keys a real file may carry that the model does not have.
TOLERATED_EXTRA_KEYS = (
    "model.control_model.mask_LQ",  # in SUPIR-v0Q/v0F, read by nothing
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",  # older transformers
)
# What the SUPIR-v0Q/v0F file carries; everything else comes from the SDXL file.
SUPIR_KEY_PREFIXES = (
    "model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder.",
)
# Keys that identify each file, to tell a swapped or foreign file apart from a damaged one.
SDXL_MARKER = "model.diffusion_model.input_blocks.0.0.weight"
SUPIR_MARKER = "model.control_model.input_hint_block.0.weight"
_SHOW = 8  # offending keys named in an error


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


def _is_tolerated(key: str) -> bool:
    return key in TOLERATED_EXTRA_KEYS or key.endswith(".position_ids") or key == "denoiser.sigmas"


def _first(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


class _TensorFile:
    """Uniform read access to a .safetensors or .ckpt/.pt/.pth file: `keys()` and `get(key)`."""

    def __init__(self, path: Path, handle: object, kind: str) -> None:
        self.path, self._h, self.kind = path, handle, kind

    def keys(self) -> list[str]:
        return list(self._h.keys())  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        if self.kind == "safetensors":
            return tuple(self._h.get_slice(key).get_shape())  # type: ignore[attr-defined]
        return tuple(self._h[key].shape)  # type: ignore[index]

    def get(self, key: str) -> torch.Tensor:
        if self.kind == "safetensors":
            return self._h.get_tensor(key)  # type: ignore[attr-defined]
        return self._h[key]  # type: ignore[index]


@contextmanager
def open_checkpoint(path: str | Path) -> Iterator[_TensorFile]:
    """Open a checkpoint for streaming reads; errors name the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or see README 'Weights')")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                yield _TensorFile(path, handle, "safetensors")
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None
        return
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "global" not in detail.lower():  # not an object reference: the bytes are not a checkpoint
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
        raise CheckpointError(
            f"{path}: refused to load: the pickle references objects other than tensors (possibly code), "
            f"and supir-rt never runs pickled code. Use a .safetensors re-pack of this checkpoint. ({detail})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat mapping of key -> tensor, got {type(sd).__name__}")
    yield _TensorFile(path, sd, "pickle")


def _unpickler_detail(err: Exception) -> str:
    """The one informative line of torch's long weights_only error message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "GLOBAL" in ln:
            return ln
        if "WeightsUnpickler error" in ln:
            return " ".join(lines[i:i + 2])
    return lines[0] if lines else type(err).__name__


def _check_identity(f: _TensorFile, role: str) -> None:
    keys = set(f.keys())
    marker, other = (SDXL_MARKER, SUPIR_MARKER) if role == "sdxl" else (SUPIR_MARKER, SDXL_MARKER)
    if marker in keys:
        return
    if other in keys:
        raise CheckpointError(
            f"{f.path} was given as the {role.upper()} checkpoint but looks like the "
            f"{'SUPIR' if role == 'sdxl' else 'SDXL'} one: swap the two paths"
        )
    hint = ("sd_xl_base_1.0_0.9vae.safetensors (the SDXL base single file)" if role == "sdxl"
            else "SUPIR-v0Q.ckpt or SUPIR-v0F.ckpt (or a .safetensors re-pack)")
    raise CheckpointError(f"{f.path} is not a {role.upper()} checkpoint (no key {marker!r}); expected {hint}")


def load_checkpoints(
    model: nn.Module, sdxl: str | Path | None = None, supir: str | Path | None = None, *, strict: bool = True
) -> nn.Module:
    """Load the SDXL base file and the SUPIR file into `model` (from `build_model`), in place.

    With `strict`, every parameter must be filled by one of the files; passing only one file is
    allowed with `strict=False` (e.g. to swap SUPIR-v0Q for v0F on a loaded model). As in the
    official order, a key present in both files takes the SUPIR file's value.
    """
    if sdxl is None and supir is None:
        raise CheckpointError("load_checkpoints needs at least one of sdxl=..., supir=...")
    targets = model.state_dict(keep_vars=True)
    if any(t.is_meta for t in targets.values()):
        raise CheckpointError("the model lives on the meta device; build it on a real device to load weights")
    filled: set[str] = set()
    for role, path in (("sdxl", sdxl), ("supir", supir)):
        if path is None:
            continue
        with open_checkpoint(path) as f:
            _check_identity(f, role)
            filled |= _copy_from(f, targets)
    missing = sorted(set(targets) - filled)
    if strict and missing:
        raise CheckpointError(
            f"{len(missing)} model keys were in neither checkpoint ({sdxl}, {supir}): {_first(missing)}. "
            "Are these the official SDXL base and SUPIR-v0Q/v0F files?"
        )
    return model


def _copy_from(f: _TensorFile, targets: Mapping[str, torch.Tensor]) -> set[str]:
    keys = f.keys()
    unexpected = [k for k in keys if k not in targets and not _is_tolerated(k)]
    if unexpected:
        raise CheckpointError(f"{f.path}: {len(unexpected)} keys the model does not have: {_first(unexpected)}")
    shared = [k for k in keys if k in targets]
    bad = [f"{k} {list(f.shape(k))} (model {list(targets[k].shape)})" for k in shared
           if f.shape(k) != tuple(targets[k].shape)]
    if bad:
        raise CheckpointError(f"{f.path}: {len(bad)} tensors have the wrong shape: {_first(bad)}")
    if "denoiser.sigmas" in keys:
        _check_sigmas(f)
    with torch.no_grad():
        for k in _progress(shared, f.path):
            targets[k].copy_(f.get(k))
    log.info("loaded %d tensors from %s", len(shared), f.path)
    return set(shared)


def _check_sigmas(f: _TensorFile) -> None:
    """A stored `denoiser.sigmas` must be the legacy DDPM table we compute."""
    from supir_rt.schedule import legacy_ddpm_sigmas

    stored, ours = f.get("denoiser.sigmas").float(), legacy_ddpm_sigmas()
    if stored.shape != ours.shape or not torch.allclose(stored, ours, rtol=1e-3, atol=1e-5):
        raise CheckpointError(
            f"{f.path}: denoiser.sigmas differs from the SDXL legacy DDPM schedule; this checkpoint was "
            "trained with another noise schedule and is not supported"
        )


def _progress(keys: list[str], path: Path) -> Iterator[str]:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield from keys
        return
    # disable=None: a bar on a terminal, silent when stderr is not a TTY (CI, logs, serving).
    yield from tqdm(keys, desc=f"loading {path.name}", unit="tensor", leave=False, disable=None)
