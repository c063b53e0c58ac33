"""The PyTorch backend's speed and memory flags on the command line: --fp8-weights, --vae-dtype,
--no-offload, --compile; and their bad inputs (one ``error:`` line, exit 2, nothing written)."""

from __future__ import annotations


import pytest
import torch

from supir_rt import cli
from supir_rt.images import read_metadata

from toys import gradient_image


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def src(tmp_path):
    path = tmp_path / "in.png"
    gradient_image(40, 32).save(path)
    return path


TINY = ["--tiny-random", "--steps", 1, "--min-size", 64, "-q"]


def test_fp8_weights_and_vae_dtype_reach_the_runtime(src, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, _, err = run(["restore", src, "-o", out, "--fp8-weights", "--vae-dtype", "bf16", *TINY], capsys)
    assert code == 0, err
    runtime = read_metadata(out)["runtime"]
    assert runtime["fp8_weights"] is True and runtime["vae_dtype"] == "bf16" and runtime["offload"] is False


def test_vae_fp16_is_not_a_choice(src, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["restore", str(src), "--vae-dtype", "fp16", *map(str, TINY)])
    assert exit_.value.code == 2 and "--vae-dtype" in capsys.readouterr().err


def test_torch_flags_with_an_engine_backend_are_an_error(src, tmp_path, capsys):
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--backend", "onnxruntime", "--engines-dir",
                        tmp_path, "--compile", "--fp8-weights", "-q"], capsys)
    assert code == 2 and err.count("error:") == 1
    assert "--compile, --fp8-weights: PyTorch backend options" in err and "Traceback" not in err


def test_fp8_on_a_gpu_without_fp8_is_one_clear_error(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--device", "cuda", "--fp8-weights", *TINY], capsys)
    assert code == 2 and err.count("error:") == 1 and "compute capability 8.9" in err and "A100" in err
    assert not (tmp_path / "o.png").exists()


def test_out_of_memory_while_sampling_is_one_clear_error_and_nothing_written(src, tmp_path, capsys, monkeypatch):
    from supir_rt.api import Restorer

    real = Restorer.tiny_random

    def tiny_that_runs_out(**kw):
        restorer = real(**kw)

        def oom(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        restorer.engines["unet_adaptor"].call = oom
        return restorer

    monkeypatch.setattr(Restorer, "tiny_random", staticmethod(tiny_that_runs_out))
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", *TINY], capsys)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "out of memory in sampling" in err and "--min-size" in err
    assert list(tmp_path.iterdir()) == [src]


def test_from_weights_with_fp8_weights(tmp_path):
    """Loading checkpoints with --fp8-weights: the UNet + adaptor ends up with e4m3 weights, the rest as
    planned; for a GPU the fp16 UNet is loaded on the host and quantised there (never on the GPU)."""
    from safetensors.torch import save_file

    from supir_rt.api import Restorer, _loading_plan
    from supir_rt.backends.fp8 import Fp8Linear
    from supir_rt.backends.placement import MemoryPlan
    from supir_rt.config import ModelConfig
    from supir_rt.model.supir import build_model
    from supir_rt.restore_config import RestoreConfig

    torch.manual_seed(0)
    state = build_model(ModelConfig.tiny()).state_dict()
    supir = {k: v.contiguous() for k, v in state.items() if k.startswith("model.control_model.")}
    save_file({k: v.contiguous() for k, v in state.items() if k not in supir}, tmp_path / "sdxl.safetensors")
    save_file(supir, tmp_path / "supir.safetensors")
    with Restorer.from_weights(tmp_path / "sdxl.safetensors", tmp_path / "supir.safetensors",
                               config=ModelConfig.tiny(), fp8_weights=True) as restorer:
        unet = restorer.engines["unet_adaptor"].module.inner.model
        layers = [m for m in unet.modules() if isinstance(m, Fp8Linear)]
        assert layers and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in layers)
        out = restorer.restore(gradient_image(40, 30), RestoreConfig(num_steps=1, min_size=64))
    assert out.metadata["runtime"]["fp8_weights"] is True
    gpu = MemoryPlan.for_device("cuda")
    loading = _loading_plan(gpu, True)
    assert loading.home("unet_adaptor") == torch.device("cpu") and loading.networks["unet_adaptor"].dtype == torch.float16
    assert _loading_plan(gpu, False) is gpu
