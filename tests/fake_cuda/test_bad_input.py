"""Bad device settings get one clear line, before any weights are loaded: a GPU that does not exist, a CUDA
device on a CPU-only PyTorch, fp8 weights below compute capability 8.9."""

from __future__ import annotations

import pytest

from supir_rt.api import Restorer, SetupError

MISSING = dict(sdxl="no-such-sdxl.safetensors", supir="no-such-supir.ckpt")  # never opened: checks come first


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_gpu_that_does_not_exist(fake):
    with pytest.raises(SetupError) as err:
        Restorer.from_weights(**MISSING, device="cuda:3", dtype="fp16")
    assert "cuda:3" in _one_line(err) and "1 CUDA GPU" in str(err.value)
    with pytest.raises(SetupError, match="cuda:3"):
        Restorer.tiny_random(device="cuda:3")


def test_cuda_on_a_cpu_only_torch(fake, monkeypatch):
    import supir_rt.cuda_runtime as rt

    monkeypatch.setattr(rt, "built_with_cuda", lambda: False)
    with pytest.raises(SetupError) as err:
        Restorer.from_weights(**MISSING, device="cuda", dtype="fp16")
    assert "CPU-only build" in _one_line(err) and "--device cpu" in str(err.value)


def test_fp8_weights_below_sm89(fake):
    fake.device.capability, fake.device.name = (8, 6), "Fake RTX 3090"
    with pytest.raises(SetupError) as err:
        Restorer.from_weights(**MISSING, device="cuda", dtype="fp16", fp8_weights=True)
    assert "Fake RTX 3090 is 8.6" in _one_line(err) and "without --fp8-weights" in str(err.value)


def test_cli_names_the_missing_gpu(fake, capsys, tmp_path):
    from PIL import Image

    from supir_rt.cli import main

    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(src)
    code = main(["restore", str(src), "-o", str(tmp_path / "out.png"), "--tiny-random", "--device", "cuda:2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code != 0 and len(errors) == 1 and "cuda:2" in errors[0] and "1 CUDA GPU" in errors[0], errors
    assert not (tmp_path / "out.png").exists()
