"""`supir_rt.runtime`: runtime flags and the settings file -> `RuntimeOptions` -> `Restorer`, the one path
the CLI, the UI and the servers share."""

from __future__ import annotations

import argparse
import pickle

import pytest

from supir_rt.errors import SetupError
from supir_rt.runtime import RuntimeOptions, add_runtime_options, build_restorer, options_from_args


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_runtime_options(parser)
    return parser.parse_args(list(flags))


def test_flags_win_over_the_settings_file_and_tiny_needs_no_weights():
    file_cfg = {"runtime": {"backend": "onnxruntime", "device": "cpu", "dtype": "fp16", "engines_dir": "/e"}}
    options = options_from_args(parse("--tiny-random", "--dtype", "fp32", "--compile", "--vae-dtype", "fp32"), file_cfg)
    assert (options.tiny_random, options.dtype, options.backend, options.device) == (True, "fp32", "onnxruntime", "cpu")
    assert options.engines_dir == "/e" and options.compile and options.vae_dtype == "fp32"
    assert options.sdxl is None and options.supir is None  # no lookup for the tiny model


def test_weights_are_looked_up_when_needed(tmp_path):
    sdxl, supir = tmp_path / "a.safetensors", tmp_path / "b.ckpt"
    sdxl.write_bytes(b"x")
    supir.write_bytes(b"y")
    options = options_from_args(parse("--sdxl", str(sdxl), "--supir", str(supir)), {})
    assert (options.sdxl, options.supir) == (str(sdxl), str(supir))
    with pytest.raises(SetupError, match="weights are missing"):
        options_from_args(parse("--weights-dir", str(tmp_path / "none")), {})


def test_torch_flags_with_another_backend_are_refused_before_loading():
    options = RuntimeOptions(backend="onnxruntime", engines_dir="/nowhere", compile=True, fp8_weights=True)
    with pytest.raises(SetupError, match="--compile, --fp8-weights: PyTorch backend options"):
        build_restorer(options)


def test_options_pickle_for_the_replicas():
    options = RuntimeOptions(tiny_random=True, compile=True, vae_dtype="fp32", offload=False)
    assert pickle.loads(pickle.dumps(options)) == options


def test_the_servers_get_the_restore_commands_runtime_flags():
    """`supir-rt serve` takes the torch backend flags of `restore` and hands them to every replica."""
    from supir_rt.cli import build_parser
    from supir_rt.serve.cli import serve_args

    args = build_parser("serve").parse_args(["serve", "--tiny-random", "--compile", "--vae-dtype", "fp32",
                                             "--no-offload", "--fp8-weights"])
    runtime = RuntimeOptions(**{k: v for k, v in serve_args(args).items() if k in RuntimeOptions.__dataclass_fields__})
    assert runtime.compile and runtime.vae_dtype == "fp32" and runtime.offload is False and runtime.fp8_weights
