"""Split placement (`--devices A,B`, `supir_rt.api.split_plan`): the plan as data, and its refusals.

The plan is checked against the networks' parameter sizes computed here independently (sum of
numel × itemsize over the meta-device model's parts); the refusals name the device and the fix. The
run itself on two GPUs is traced under fake CUDA (tests/fake_cuda/test_multi_gpu_trace.py).
"""

from __future__ import annotations

import pytest
import torch

import supir_rt.api as api
import supir_rt.loading as loading
from supir_rt import cuda_runtime
from supir_rt.errors import SetupError
from supir_rt.loading import split_plan
from supir_rt.config import ModelConfig


@pytest.fixture
def two_gpus(monkeypatch):
    """Two CUDA devices as far as the device checks are concerned (the plan is only data here)."""
    monkeypatch.setattr(cuda_runtime, "device_count", lambda: 2)
    monkeypatch.setattr(loading, "check_device", lambda d: torch.device(d))


def _param_bytes(module: torch.nn.Module, itemsize: int) -> int:
    return sum(p.numel() * itemsize for p in module.parameters()) + sum(b.numel() * itemsize for b in module.buffers()
                                                                        if b.is_floating_point())


def test_split_puts_the_unet_on_the_first_device_and_the_rest_on_the_second(two_gpus):
    from supir_rt.backends.placement import weight_bytes_per_device
    from supir_rt.model.supir import build_model

    config = ModelConfig.official()
    plan = split_plan(["cuda:0", "cuda:1"], torch.float16, None, config, capacity=lambda d: 12 * 2**30)
    assert plan.describe() == {
        "unet_adaptor": "float16 on cuda:0", "text_encoders": "float16 on cuda:1",
        "dr_encoder": "bfloat16 on cuda:1", "vae_encoder": "bfloat16 on cuda:1", "vae_decoder": "bfloat16 on cuda:1"}
    model = build_model(config, device="meta")
    need = weight_bytes_per_device(plan, model)
    assert need[torch.device("cuda:0")] == _param_bytes(model.model, 2)
    assert need[torch.device("cuda:1")] == _param_bytes(model.first_stage_model, 2) + _param_bytes(model.conditioner, 2)
    # two 12 GB cards hold it without offloading: 7.2 GiB of UNet + adaptor, 1.7 GiB of the rest
    assert need[torch.device("cuda:0")] / 2**30 == pytest.approx(7.2, abs=0.1)


def test_a_device_too_small_for_its_share_is_refused(two_gpus):
    small_second = {0: 12 * 2**30, 1: 2 * 2**30}
    with pytest.raises(SetupError, match=r"cuda:1 has 2.0 GiB, too small for its share \(dr_encoder.*text_encoders"):
        split_plan(["cuda:0", "cuda:1"], torch.float16, None, ModelConfig.official(),
                   capacity=lambda d: small_second[d.index])
    with pytest.raises(SetupError, match=r"cuda:0 has 6.0 GiB, too small for its share \(unet_adaptor"):
        split_plan(["cuda:0", "cuda:1"], torch.float16, None, ModelConfig.official(), capacity=lambda d: 6 * 2**30)


def test_a_device_that_does_not_exist_is_refused(two_gpus):
    with pytest.raises(SetupError, match=r"cuda:3 does not exist; this machine has 2 CUDA device\(s\)"):
        split_plan(["cuda:0", "cuda:3"], torch.float16, None, ModelConfig.official())
    with pytest.raises(SetupError, match="two different devices"):
        split_plan(["cuda:0", "cuda:0"], torch.float16, None, ModelConfig.official())


def test_cuda_devices_on_a_machine_without_cuda_are_refused_before_any_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SetupError, match="cuda:0.*(CPU-only build|no usable CUDA GPU)"):
        api.Restorer.tiny_random(devices=["cuda:0", "cuda:1"])


def test_scale_options_that_cannot_work_together_are_refused():
    from supir_rt.runtime import RuntimeOptions, build_restorer

    with pytest.raises(SetupError, match="--device and --devices: give one of them"):
        RuntimeOptions(device="cpu", devices=("cuda:0", "cuda:1")).scale()
    with pytest.raises(SetupError, match="--ray-address is for --tile-workers"):
        RuntimeOptions(ray_address="auto").scale()
    with pytest.raises(SetupError, match="--cfg-parallel needs --devices"):
        build_restorer(RuntimeOptions(tiny_random=True, cfg_parallel=True))
    with pytest.raises(SetupError, match="--devices: PyTorch backend options"):
        build_restorer(RuntimeOptions(engines_dir="/nonexistent", backend="onnxruntime", devices=("cpu", "meta")))
    with pytest.raises(SetupError, match="--cfg-parallel: PyTorch backend options"):
        build_restorer(RuntimeOptions(engines_dir="/nonexistent", backend="onnxruntime", cfg_parallel=True))
    # tile workers run exported engines too: a missing folder is found before a local Ray is started
    with pytest.raises(SetupError, match="engines folder /nonexistent does not exist"):
        build_restorer(RuntimeOptions(engines_dir="/nonexistent", backend="onnxruntime", tile_workers=2))
