"""Strict, streaming checkpoint loading on tiny checkpoints written here in the official layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from supir_rt.model.supir import build_model
from supir_rt.weights import SUPIR_KEY_PREFIXES, CheckpointError, load_checkpoints


def split_official(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a full state dict the way the official files are split (reference doc §3.1-3.2)."""
    supir = {k: v for k, v in state.items() if k.startswith(SUPIR_KEY_PREFIXES)}
    sdxl = {k: v for k, v in state.items() if k not in supir}
    supir["model.control_model.mask_LQ"] = torch.zeros(1, 4, 64, 64)  # the unused extra tensor
    return sdxl, supir


def write(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def source(tiny_config):
    torch.manual_seed(123)
    return build_model(tiny_config)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    """fp32 SDXL .safetensors + SUPIR .ckpt, as users have them."""
    d = tmp_path_factory.mktemp("ckpt")
    sdxl, supir = split_official(source.state_dict())
    return write(sdxl, d / "sd_xl_base.safetensors", torch.float32), write(supir, d / "SUPIR-v0Q.ckpt", torch.float32)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_official_layout_loads_strictly_every_tensor_bit_exact(source, tiny_config, tmp_path, suffix, file_dtype):
    sdxl, supir = split_official(source.state_dict())
    paths = write(sdxl, tmp_path / f"sdxl{suffix}", file_dtype), write(supir, tmp_path / f"supir{suffix}", file_dtype)
    torch.manual_seed(999)  # different random init: everything must be overwritten
    model = build_model(tiny_config, init=False)
    load_checkpoints(model, sdxl=paths[0], supir=paths[1])
    expected = {k: v.to(file_dtype).float() for k, v in source.state_dict().items()}
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_fp32_files_load_into_fp16_model(files, source, tiny_config):
    model = build_model(tiny_config, dtype=torch.float16, init=False)
    load_checkpoints(model, sdxl=files[0], supir=files[1])
    key = "model.control_model.input_hint_block.0.weight"
    assert model.state_dict()[key].dtype == torch.float16
    assert torch.equal(model.state_dict()[key], source.state_dict()[key].half())


def test_state_dict_wrapper_is_unwrapped(source, tiny_config, files, tmp_path):
    _, supir = split_official(source.state_dict())
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": supir}, wrapped)
    model = build_model(tiny_config, init=False)
    load_checkpoints(model, sdxl=files[0], supir=wrapped)


def test_missing_key_is_named(source, tiny_config, tmp_path, files):
    _, supir = split_official(source.state_dict())
    del supir["model.control_model.middle_block.0.in_layers.2.weight"]
    path = write(supir, tmp_path / "supir.safetensors", torch.float32)
    with pytest.raises(CheckpointError, match=r"1 model keys.*middle_block\.0\.in_layers\.2\.weight"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=files[0], supir=path)


def test_unexpected_key_is_named_with_file(source, tiny_config, tmp_path, files):
    _, supir = split_official(source.state_dict())
    supir["model.control_model.extra_head.weight"] = torch.zeros(3)
    path = write(supir, tmp_path / "supir.safetensors", torch.float32)
    with pytest.raises(CheckpointError, match=r"supir\.safetensors: 1 keys the model does not have: .*extra_head"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=files[0], supir=path)


def test_misshaped_key_is_named_with_both_shapes(source, tiny_config, tmp_path, files):
    _, supir = split_official(source.state_dict())
    key = "model.diffusion_model.project_modules.0.zero_conv.weight"
    supir[key] = torch.zeros(3, 3, 1, 1)
    path = write(supir, tmp_path / "supir.safetensors", torch.float32)
    with pytest.raises(CheckpointError, match=r"wrong shape: .*project_modules\.0\.zero_conv\.weight \[3, 3, 1, 1\]"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=files[0], supir=path)


def test_swapped_files_are_recognised(files, tiny_config):
    with pytest.raises(CheckpointError, match="swap the two paths"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=files[1], supir=files[0])


def test_tolerated_extras_and_sigmas_check(source, tiny_config, tmp_path, files):
    from supir_rt.schedule import legacy_ddpm_sigmas

    sdxl, _ = split_official(source.state_dict())
    sdxl["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sdxl["denoiser.sigmas"] = legacy_ddpm_sigmas()
    ok = write(sdxl, tmp_path / "ok.safetensors", torch.float32)
    load_checkpoints(build_model(tiny_config, init=False), sdxl=ok, supir=files[1])
    sdxl["denoiser.sigmas"] = legacy_ddpm_sigmas() * 2
    bad = write(sdxl, tmp_path / "bad.safetensors", torch.float32)
    with pytest.raises(CheckpointError, match="noise schedule"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=bad, supir=files[1])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_with_code_payload_is_refused_without_running_it(tmp_path, tiny_config, files):
    marker = tmp_path / "pwned"
    evil = tmp_path / "SUPIR-v0Q.ckpt"
    torch.save({"model.control_model.input_hint_block.0.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=files[0], supir=evil)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_files_get_clear_errors(tmp_path, tiny_config, content):
    for name in ("broken.safetensors", "broken.ckpt"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=r"broken\.(safetensors|ckpt): not a readable"):
            load_checkpoints(build_model(tiny_config, init=False), supir=path, strict=False)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoints(build_model(tiny_config, init=False), sdxl=tmp_path / "nope.safetensors")


def test_partial_load_needs_strict_false(files, tiny_config):
    model = build_model(tiny_config, init=False)
    with pytest.raises(CheckpointError, match="in neither checkpoint"):
        load_checkpoints(model, supir=files[1])
    load_checkpoints(model, supir=files[1], strict=False)  # e.g. swapping v0Q for v0F
