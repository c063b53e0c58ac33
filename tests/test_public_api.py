"""The names other tools call are importable from the package root and behave as documented."""

import torch

import supir_rt


def test_public_api_builds_models_and_resolves_presets():
    cfg = supir_rt.ModelConfig.tiny()
    model = supir_rt.build_model(cfg, device="cpu", dtype=torch.float32)
    assert isinstance(model, supir_rt.SUPIRModel)
    official = supir_rt.build_model(supir_rt.ModelConfig.official(), device="meta")
    assert next(official.parameters()).is_meta
    assert set(supir_rt.RESTORE_PRESETS) >= {"official", "paper", "quality", "fidelity"}
    paper = supir_rt.restore_preset("paper")
    assert (paper.num_steps, paper.cfg_scale, paper.restore_cfg) == (100, 7.5, 4)
