"""The one input conversion of every engine call (`EngineBase.conform_inputs`): inputs reach `_run` on the
engine's device, contiguous, in the dtype the backend computes in; conforming tensors pass through as
the very same objects (no copy); callers feed the spec's dtypes and the pipeline converts nothing."""

from __future__ import annotations

import pytest
import torch

from supir_rt.backends import EngineBase
from supir_rt.backends.specs import network_specs
from supir_rt.config import ModelConfig
from supir_rt.pipeline import engine_network


class Spy(EngineBase):
    backend = "spy"

    def __init__(self, spec, **kw) -> None:
        super().__init__(spec, "cpu", **kw)
        self.seen = None

    def _run(self, feed):
        self.seen = dict(feed)
        return {s.name: torch.zeros(s.resolve(self.spec.infer_dims(feed)), dtype=s.dtype) for s in self.spec.outputs}


@pytest.fixture(scope="module")
def unet_spec():
    return network_specs(ModelConfig.tiny())["unet_adaptor"]


def feed(spec):
    return spec.sample_inputs({"B": 1, "h": 4, "w": 6}, generator=torch.Generator().manual_seed(0))


def test_conforming_inputs_pass_through_unchanged(unet_spec):
    engine = Spy(unet_spec)
    f = feed(unet_spec)
    engine.infer(f)
    assert all(engine.seen[k] is f[k] for k in f)  # the same tensors: no copy, no cast


def test_non_contiguous_inputs_are_made_contiguous_once(unet_spec):
    engine = Spy(unet_spec)
    f = feed(unet_spec)
    f["x_in"] = f["x_in"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not f["x_in"].is_contiguous()
    engine.infer(f)
    assert engine.seen["x_in"].is_contiguous() and torch.equal(engine.seen["x_in"], f["x_in"])
    assert engine.seen["context"] is f["context"]


def test_a_backend_computing_in_fp16_gets_fp16_floats_and_int64_ids(unet_spec):
    engine = Spy(unet_spec, float_dtype=torch.float16)
    f = feed(unet_spec)
    engine.infer(f)
    assert {k: v.dtype for k, v in engine.seen.items()} == {
        "x_in": torch.float16, "timesteps": torch.int64, "context": torch.float16, "vector": torch.float16,
        "lq_latent": torch.float16, "control_scale": torch.float16}
    assert torch.equal(engine.seen["x_in"], f["x_in"].half())
    with pytest.raises(TypeError, match="x_in: dtype torch.float16"):  # callers still feed the spec's dtype
        engine.infer({**f, "x_in": f["x_in"].half()})


def test_the_pipeline_hands_its_tensors_over_unconverted(unet_spec):
    engine = Spy(unet_spec)
    x = torch.randn(2, 4, 4, 6)
    cond = {"crossattn": torch.randn(2, 77, unet_spec.input("context").shape[2]),
            "vector": torch.randn(2, unet_spec.input("vector").shape[1]), "control": torch.randn(2, 4, 4, 6)}
    engine_network(engine)(x, torch.tensor([5, 5]), cond, 1.0)
    assert engine.seen["x_in"] is x and engine.seen["context"] is cond["crossattn"]
    assert engine.seen["lq_latent"] is cond["control"]
