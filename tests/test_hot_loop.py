"""The sampler loop reads nothing back from the device and re-validates / re-converts nothing per step.

A counting stand-in watches every way Python can read a tensor's values (``item``, ``float``, ``int``,
``bool``, ``tolist``, ``numpy``, ``cpu``) while `sample_restore_edm` runs inside a tiny restore; before
the loop the sampler reads the σ schedule once (``tolist``), and after that nothing. On a GPU each such
read would stall the CPU until the GPU queue drains.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import supir_rt.stages as stages_module
from supir_rt.api import Restorer
from supir_rt.restore_config import RestoreConfig

READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"}
STEPS = 4


class DeviceReads(TorchFunctionMode):
    """Counts tensor value reads into Python, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def restorer():
    return Restorer.tiny_random(progress=True)  # progress bar on: it must not read values either


def _sample_under(mode_factory, monkeypatch):
    """Run the sampler of the next restore inside a fresh mode; returns the modes used."""
    modes = []
    real = stages_module.sample_restore_edm

    def watched(*args, **kwargs):
        mode = mode_factory()
        modes.append(mode)
        with mode:
            return real(*args, **kwargs)

    monkeypatch.setattr(stages_module, "sample_restore_edm", watched)
    return modes


def _restore(restorer, **kw):
    cfg = RestoreConfig(num_steps=STEPS, min_size=64, restore_cfg=4.0, **kw)  # churn and guidance on
    return restorer.restore(Image.new("RGB", (64, 64), (90, 140, 30)), cfg)


def test_the_loop_reads_the_schedule_once_and_nothing_per_step(restorer, monkeypatch):
    modes = _sample_under(DeviceReads, monkeypatch)
    _restore(restorer)
    assert modes[0].reads == Counter({"tolist": 1})


def test_the_counter_sees_a_read_when_a_callback_asks_for_values(restorer, monkeypatch):
    """The stand-in is not blind: a callback reading the CFG scale costs one read per step."""
    modes = _sample_under(DeviceReads, monkeypatch)
    seen = []
    restorer.restore(Image.new("RGB", (64, 64)), RestoreConfig(num_steps=STEPS, min_size=64),
                     callback=lambda info: seen.append(info.cfg_scale))
    assert len(seen) == STEPS and modes[0].reads["__float__"] == STEPS


def test_the_unet_feed_is_validated_once_and_constant_inputs_converted_once(monkeypatch):
    import supir_rt.backends.base as backends

    validated = Counter()
    real_validate = backends.validate_feed

    def counting(spec, feed, **kw):
        validated[spec.name] += 1
        return real_validate(spec, feed, **kw)

    monkeypatch.setattr(backends, "validate_feed", counting)
    r = Restorer.tiny_random(dtype="bf16")  # the UNet computes in bf16: its fp32 feed is converted
    unet = r.engines["unet_adaptor"]
    _restore(r)
    assert validated["unet_adaptor"] == 1
    # per step only what changes is converted; the conditioning once per restore
    assert unet.conversions["x_in"] == STEPS and unet.conversions["control_scale"] == STEPS
    assert unet.conversions["context"] == unet.conversions["vector"] == unet.conversions["lq_latent"] == 1


class KernelLog(TorchDispatchMode):
    """Records the ATen ops that compute something (a kernel launch on a GPU); views and metadata
    ops are free and not counted."""

    FREE = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "transpose",
            "permute", "as_strided", "detach", "alias", "split", "chunk", "unbind", "lift_fresh", "_to_copy_noop"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


KERNELS_PER_STEP = 43  # stated in docs/cuda.md ("What a step costs besides the network call")


def test_small_kernels_per_step_around_the_network_call(monkeypatch):
    """Count the sampler/denoiser arithmetic of one churned, guided step around a stand-in network
    that launches nothing, so only the runtime's own small kernels are counted."""
    from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG
    from supir_rt.sampler import sample_restore_edm
    from supir_rt.schedule import legacy_ddpm_sigmas, restore_sigmas

    table = legacy_ddpm_sigmas()
    sigmas = restore_sigmas(2, table)
    eps = torch.zeros(2, 4, 8, 8)
    cond = {"crossattn": torch.zeros(1, 77, 8), "vector": torch.zeros(1, 16), "control": torch.zeros(1, 4, 8, 8)}
    denoiser = GuidedDenoiser(EpsDenoiser(lambda x_in, t, c, cs: eps, table), cond, cond, LinearCFG(1.0, 4.0),
                              ControlScale(1.0, True, 0.0))
    x = torch.zeros(1, 4, 8, 8)
    noise = torch.zeros(1, 4, 8, 8)
    log = KernelLog()
    with log:
        sample_restore_edm(denoiser, x, sigmas[:2], x_center=x, restore_cfg=4.0, s_churn=5.0, s_noise=1.003,
                           noise=lambda like: noise, restore_cfg_s_tmin=-1.0)
    steps_ops = [op for op in log.ops if op not in ("ones", "new_ones", "_local_scalar_dense")]
    print(f"{len(steps_ops)} small kernels per step: {Counter(steps_ops)}")
    assert len(steps_ops) <= KERNELS_PER_STEP
