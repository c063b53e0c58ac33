"""The torch backend's CUDA path, as far as a CPU can check it: the memory plan (placement, dtype split,
offload order, host RAM of loading straight to the GPU), fp8 weights, compile and CUDA-graph options,
and the out-of-memory message. The GPU-only measurements are in benchmarks/gpu_check.sh."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from supir_rt.backends import open_engines
from supir_rt.backends.fp8 import Fp8Conv2d, Fp8Linear, fp8_unsupported_reason, quantize_fp8_
from supir_rt.backends.modules import NETWORK_MODULES
from supir_rt.backends.placement import (
    NETWORK_PARTS, MemoryPlan, Offloader, build_placed_model, place_model,
)
from supir_rt.backends.specs import network_specs
from supir_rt.backends.torch_backend import CompiledCall, CUDAGraphCall, DeviceMemoryError, TorchOptions
from supir_rt.config import ModelConfig
from supir_rt.model.supir import build_model

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _copy_of(model: nn.Module) -> nn.Module:
    fresh = build_model(model.config, init=False)
    fresh.load_state_dict(model.state_dict())
    return fresh


# ------------------------------------------------------------------------------------------ the plan


def test_cuda_plan_is_the_official_precision_split_with_only_the_unet_resident():
    plan = MemoryPlan.for_device("cuda")
    assert plan.networks["unet_adaptor"].dtype == F16 and plan.networks["unet_adaptor"].resident
    assert plan.networks["text_encoders"].dtype == F16 and not plan.networks["text_encoders"].resident
    for vae in ("dr_encoder", "vae_encoder", "vae_decoder"):
        assert plan.networks[vae].dtype == BF16 and not plan.networks[vae].resident
        assert plan.home(vae) == torch.device("cpu")
    assert plan.home("unet_adaptor") == torch.device("cuda")
    assert MemoryPlan.for_device("cuda", vae_dtype=F32).networks["vae_decoder"].dtype == F32
    assert all(p.resident for p in MemoryPlan.for_device("cuda", offload=False).networks.values())


def test_cpu_plan_keeps_everything_resident_in_fp32():
    plan = MemoryPlan.for_device("cpu")
    assert all(p.resident and p.dtype == F32 for p in plan.networks.values())


def test_fp16_vae_is_refused():
    with pytest.raises(ValueError, match="overflows"):
        MemoryPlan.for_device("cuda", vae_dtype=F16)


def test_network_parts_cover_the_model_once():
    model = build_model(ModelConfig.official(), device="meta")
    parts = {p for ps in NETWORK_PARTS.values() for p in ps}
    covered = {f"{part}.{name}" for part in parts for name, _ in model.get_submodule(part).named_parameters()}
    assert covered == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("network", list(NETWORK_PARTS))
def test_network_parts_are_exactly_what_each_network_reads(network, tiny_model, tiny_config):
    """Poison every part outside the declared ones with NaN: the network's output stays finite. Poison
    any one declared part: it does not. So the offloader moves exactly what the network reads."""
    feed = network_specs(tiny_config)[network].sample_inputs({"B": 1, "h": 8, "w": 8},
                                                             generator=torch.Generator().manual_seed(0))

    def finite_with(healthy: tuple[str, ...]) -> bool:
        model = _copy_of(tiny_model)
        keep = {id(t) for part in healthy for t in model.get_submodule(part).parameters()}
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in keep:
                    p.fill_(float("nan"))
            out = NETWORK_MODULES[network](model)(*feed.values())
        return all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))

    declared = NETWORK_PARTS[network]
    assert finite_with(declared)
    for missing in declared:
        assert not finite_with(tuple(p for p in declared if p != missing)), f"{network} does not read {missing}"


def test_loading_straight_to_the_gpu_keeps_host_ram_under_1_2x_the_fp16_weights():
    """The official model placed for a GPU ('meta' stands in for the GPU here): only the offloaded parts
    are allocated on the host, in their dtype; nothing resident is ever on the host."""
    config = ModelConfig.official()
    meta_model = build_model(config, device="meta")
    fp16_bytes = sum(p.numel() * 2 for p in meta_model.parameters())
    plan = MemoryPlan(torch.device("meta"), MemoryPlan.for_device("cuda").networks)
    model = build_placed_model(config, plan, init=False, pin=False)
    host = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.device.type == "cpu")
    assert host == plan.weight_bytes(meta_model)["host"]
    assert host <= 1.2 * fp16_bytes and host < 0.25 * fp16_bytes  # VAE (bf16) + text encoders (fp16)
    for name, parts in NETWORK_PARTS.items():
        for part in parts:
            p = next(model.get_submodule(part).parameters())
            assert p.device == plan.home(name) and p.dtype == plan.networks[name].dtype
    sizes = plan.weight_bytes(meta_model)
    assert 7.5e9 < sizes["device"] < 7.9e9  # the resident UNet + adaptor: 3.87 B parameters in fp16
    text = model.get_submodule("conditioner")  # the largest visitor: the text encoders, as allocated
    assert sizes["device_peak"] - sizes["device"] == sum(t.numel() * t.element_size()
                                                         for t in (*text.parameters(), *text.buffers()))


# -------------------------------------------------------------------------------------- offloading


def test_offloader_moves_in_for_the_call_and_back_without_copying():
    """A recording transfer stands in for the host->GPU copy."""
    module = nn.Linear(4, 4)
    host = [t.data_ptr() for t in module.parameters()]
    moved = []

    def transfer(t):
        moved.append(t.data_ptr())
        return t.clone()

    off = Offloader([module], torch.device("cuda"), resident=False, name="net", transfer=transfer)
    with off.on_device():
        assert moved == host  # every weight copied in, once
        assert all(p.data_ptr() != h for p, h in zip(module.parameters(), host))
    assert [p.data_ptr() for p in module.parameters()] == host  # the host tensors again: no copy back
    assert off.log == [("net", "on"), ("net", "off")] and len(moved) == 2
    with pytest.raises(ZeroDivisionError), off.on_device():
        1 / 0
    assert [p.data_ptr() for p in module.parameters()] == host and off.log[-1] == ("net", "off")
    calls = []

    def out_of_memory_on_the_second(t):
        calls.append(t)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return t.clone()

    with pytest.raises(torch.OutOfMemoryError), Offloader([module], torch.device("cuda"), resident=False,
                                                           transfer=out_of_memory_on_the_second).on_device():
        pass
    assert [p.data_ptr() for p in module.parameters()] == host  # the partial move was undone
    resident = Offloader([module], torch.device("cuda"), resident=True, transfer=transfer)
    with resident.on_device():
        pass
    assert len(moved) == 4 and resident.log == []


def test_offload_order_in_a_restore(tiny_model, tiny_config):
    """Text encoders once per prompt, each VAE network only while it runs, the UNet never moved, and
    never two offloaded networks on the device at once."""
    from PIL import Image

    from supir_rt.api import Restorer
    from supir_rt.restore_config import RestoreConfig

    model = place_model(_copy_of(tiny_model), MemoryPlan.for_device("cpu", offload=True))
    engines = open_engines("torch", model=model, plan=MemoryPlan.for_device("cpu", offload=True))
    log = []
    for e in engines.values():
        e.offloader.log = log
    restorer = Restorer(engines, tiny_config)
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    restorer.restore(image, RestoreConfig(num_steps=3, min_size=64, restore_cfg=4.0))
    restorer.restore(image, RestoreConfig(num_steps=3, min_size=64, restore_cfg=4.0))  # prompts cached
    per_image = [("dr_encoder", "on"), ("dr_encoder", "off"), ("vae_decoder", "on"), ("vae_decoder", "off"),
                 ("vae_encoder", "on"), ("vae_encoder", "off")]
    text = [("text_encoders", "on"), ("text_encoders", "off")]
    tail = [("vae_decoder", "on"), ("vae_decoder", "off")]
    # positive and negative prompt differ: two text-encoder runs on the first image, none on the second
    assert log == per_image + text + text + tail + per_image + tail


def test_dtype_split_runs_each_network_in_its_dtype_with_fp32_outputs(tiny_model, tiny_config):
    plan = MemoryPlan.for_device("cpu", diffusion_dtype=BF16, vae_dtype=BF16, text_dtype=BF16)
    model = place_model(_copy_of(tiny_model), plan)
    engines = open_engines("torch", model=model, plan=plan)
    specs = network_specs(tiny_config)
    for name, engine in engines.items():
        assert engine.dtype == BF16
        out = engine.infer(specs[name].sample_inputs({"B": 1, "h": 8, "w": 8}))
        assert all(o.dtype == s.dtype for o, s in zip(out.values(), specs[name].outputs))
    with pytest.raises(ValueError, match="place the model first"):
        open_engines("torch", model=_copy_of(tiny_model), plan=plan)


# -------------------------------------------------------------------------------------------- fp8


def test_fp8_linear_error_is_within_e4m3_rounding():
    """Per weight, e4m3 rounding moves w by at most 2^-4·|w| (3 mantissa bits) in the normal range and
    by at most half the subnormal spacing, 2^-10·s, below it (s = channel scale); so
    |y - y_fp8| <= Σ_i |x_i|·(2^-4·|w_i| + 2^-10·s)."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=g) * torch.logspace(-3, 0, 64))
    q = Fp8Linear(linear)
    x = torch.randn(8, 64, generator=g)
    err = (q(x) - linear(x)).abs()
    scale = linear.weight.abs().amax(dim=1) / 448  # (out,)
    bound = x.abs() @ (2**-4 * linear.weight.abs() + 2**-10 * scale[:, None]).T
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    assert q.weight_fp8.dtype == torch.float8_e4m3fn and q.weight_fp8.element_size() == 1


def test_fp8_unet_parity_and_size(tiny_model, tiny_config):
    """The tiny UNet + adaptor with fp8 weights vs fp32: recorded in docs/cuda.md (relative error of eps)."""
    model = _copy_of(tiny_model)
    feed = network_specs(tiny_config)["unet_adaptor"].sample_inputs({"B": 1, "h": 16, "w": 16},
                                                                    generator=torch.Generator().manual_seed(1))
    ref = NETWORK_MODULES["unet_adaptor"](model)(*feed.values())
    weights_before = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    count = quantize_fp8_(model.model)
    assert count == sum(1 for m in model.model.modules() if isinstance(m, (Fp8Linear, Fp8Conv2d)))
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.model.modules())
    assert sum(m.weight_fp8.numel() for m in model.model.modules() if hasattr(m, "weight_fp8")) == weights_before
    out = NETWORK_MODULES["unet_adaptor"](model)(*feed.values())
    rel = float((out - ref).norm() / ref.norm())
    print(f"fp8 tiny unet_adaptor: max abs {float((out - ref).abs().max()):.3g}, relative L2 {rel:.3g}")
    assert 0 < rel < 0.1


def test_fp8_refused_on_gpus_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")
    reason = fp8_unsupported_reason(torch.device("cuda"))
    assert "compute capability 8.9" in reason and "RTX A6000 is 8.6" in reason and "--fp8-weights" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_unsupported_reason(torch.device("cuda")) is None
    assert fp8_unsupported_reason(torch.device("cpu")) is None


# ------------------------------------------------------------------------------- compile and graphs


def _unet_feed(config: ModelConfig, seed: int = 2) -> dict[str, torch.Tensor]:
    return network_specs(config)["unet_adaptor"].sample_inputs({"B": 1, "h": 8, "w": 8},
                                                               generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow  # dynamo traces the tiny UNet + adaptor: ~15 s on 2 quiet cores
def test_compiled_unet_equals_eager(tiny_model, tiny_config):
    """torch.compile's graph capture (dynamo, with its "eager" backend: no C++ compiler needed, seconds
    instead of minutes on a CPU) gives the eager result; inductor itself runs in the GPU check."""
    eager = open_engines("torch", model=tiny_model)["unet_adaptor"]
    opts = TorchOptions(compile=True, compile_backend="eager")
    compiled = open_engines("torch", model=tiny_model, options=opts)["unet_adaptor"]
    assert isinstance(compiled.call, CompiledCall)
    for seed in (2, 3):
        feed = _unet_feed(tiny_config, seed)
        torch.testing.assert_close(compiled.infer(feed)["eps"], eager.infer(feed)["eps"].clone(), rtol=1e-5, atol=1e-5)
    assert not compiled.call.failed


def test_compile_failure_falls_back_with_one_warning(tiny_model, tiny_config, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    eager = open_engines("torch", model=tiny_model)["vae_decoder"]
    opts = TorchOptions(compile=True, compile_backend=broken_backend, compile_networks=("vae_decoder",))
    engine = open_engines("torch", model=tiny_model, options=opts)["vae_decoder"]
    feed = {"latent": torch.randn(1, tiny_config.first_stage_config.z_channels, 8, 8)}
    with caplog.at_level(logging.WARNING, logger="supir_rt"):
        first = engine.infer(feed)["image"].clone()
        engine.infer(feed)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "vae_decoder" in warnings[0].getMessage()
    torch.testing.assert_close(first, eager.infer(feed)["image"], rtol=0, atol=0)


class _FakeGraph:
    """Stands in for a CUDA graph: 'capture' records the call on the static buffers, 'replay' reruns it
    into the same output tensor."""

    def __init__(self) -> None:
        self.captures = 0

    def __call__(self, fn, static):
        self.captures += 1
        out = fn(*static)

        def replay():
            new = fn(*static)
            for o, n in zip(out, new):
                o.copy_(n)

        return replay, out


def test_cuda_graph_call_captures_after_warmup_and_copies_only_changed_inputs(tiny_model, tiny_config):
    engine = open_engines("torch", model=tiny_model)["unet_adaptor"]
    eager = open_engines("torch", model=tiny_model)["unet_adaptor"]
    fake = _FakeGraph()
    engine.graphs = CUDAGraphCall(engine.call, "unet_adaptor", F32, warmup=2, graph_factory=fake)
    feed = _unet_feed(tiny_config)
    copies = []
    outs = []
    for step in range(5):
        feed = dict(feed, x_in=torch.randn_like(feed["x_in"]), timesteps=torch.full_like(feed["timesteps"], 10 * step))
        outs.append(engine.infer(feed)["eps"])
        if engine.graphs._static:
            copies.append([s.clone() for s in engine.graphs._static])
        torch.testing.assert_close(outs[-1], eager.infer(feed)["eps"], rtol=1e-6, atol=1e-6)
    assert fake.captures == 1 and engine.graphs.replays == 3  # 2 warm-up calls, 1 capture + replay, 2 replays
    assert outs[2] is outs[3] is outs[4]  # static output buffer: belongs to the engine until the next call
    # a new shape: warm-up again, then a new capture
    big = network_specs(tiny_config)["unet_adaptor"].sample_inputs({"B": 1, "h": 16, "w": 8})
    for _ in range(3):
        engine.infer(big)
    assert fake.captures == 2


def test_cuda_graph_call_skips_the_copy_of_unchanged_inputs(tiny_config):
    calls = []

    def fn(*args):
        calls.append(args)
        return (args[0] * 2,)

    runner = CUDAGraphCall(fn, "net", F32, warmup=0, graph_factory=_FakeGraph())
    const = torch.ones(3)
    x = torch.zeros(3)
    assert runner([x, const]) is not None
    static_const = runner._static[1]
    copies = []
    orig_copy = torch.Tensor.copy_
    try:
        torch.Tensor.copy_ = lambda self, src, *a, **k: (copies.append(self is static_const), orig_copy(self, src, *a, **k))[1]
        runner([torch.full((3,), 5.0), const])
        const.add_(1)  # modified in place: must be copied again
        runner([torch.full((3,), 6.0), const])
    finally:
        torch.Tensor.copy_ = orig_copy
    assert copies.count(True) == 1  # the constant was copied only after it changed


def test_cuda_graph_capture_failure_falls_back_with_one_warning(tiny_model, tiny_config, caplog):
    def failing(fn, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = open_engines("torch", model=tiny_model)["unet_adaptor"]
    engine.graphs = CUDAGraphCall(engine.call, "unet_adaptor", F32, warmup=1, graph_factory=failing)
    feed = _unet_feed(tiny_config)
    with caplog.at_level(logging.WARNING, logger="supir_rt"):
        for _ in range(4):
            out = engine.infer(feed)["eps"]
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1
    assert engine.graphs.failed and torch.isfinite(out).all()


def test_graphs_on_a_cpu_plan_warn_and_run_without(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="supir_rt"):
        engines = open_engines("torch", model=tiny_model, options=TorchOptions(cuda_graphs=True))
    assert engines["unet_adaptor"].graphs is None
    assert any("CUDA graphs need" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------- out of memory


def test_out_of_memory_names_the_phase_and_what_to_lower(tiny_model, tiny_config):
    engine = open_engines("torch", model=tiny_model)["unet_adaptor"]

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.call = oom
    with pytest.raises(DeviceMemoryError) as err:
        engine.infer(_unet_feed(tiny_config))
    msg = str(err.value)
    assert "sampling (unet_adaptor" in msg and "--min-size" in msg and "tiles" in msg and "Nothing was written" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
