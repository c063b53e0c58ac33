"""Tiled restores on a fake GPU, through `Restorer`: the tiled sampler with a step callback (as the UI
always passes one), the tiled VAE in both modes with offloading on, and both together."""

from __future__ import annotations

import pytest

from supir_rt.restore_config import RestoreConfig
from supir_rt.schedule import OFFICIAL_SIGMA_MAX

from test_restore import SMALL, on_gpu, restore

TILED_SAMPLER = dict(tiling="on", tile_size=64, tile_stride=32)  # 3 x 3 tiles of 8 latent px on 16 x 16


@pytest.mark.parametrize("sampler", ["edm", "dpmpp2m-sde"])
def test_tiled_sampler_with_a_step_callback(fake, sampler):
    """Defect 3: `tiling._report_tiled` built `StepInfo` with ``cfg_scale=`` / ``control_scale=`` fields it
    does not have, so every tiled restore with a callback raised TypeError (checked by hand: with the old
    `_report_tiled` back this test fails with "unexpected keyword argument 'cfg_scale'"). The callback
    counts steps without reading the device (no host read in the loop, the fixture checks); the scales it
    may read afterwards follow sgm's `LinearCFG` formula at the step's σ̂."""
    import supir_rt.cuda_runtime as rt

    infos = []
    reads = []
    real = rt.mem_get_info
    rt.mem_get_info = lambda device: reads.append(device) or real(device)
    try:
        config = RestoreConfig(sampler=sampler, vae_tiling="none", **TILED_SAMPLER, **SMALL)
        out = restore(fake, config, callback=infos.append)
    finally:
        rt.mem_get_info = real
    on_gpu(fake)
    assert out.metadata["tiling"]["sampler_tiled"] and out.metadata["tiling"]["sampler_tiles"] == 9
    assert len(reads) == 1  # the memory budget is read once per restore
    assert [i.index for i in infos] == [0, 1] and all(i.total == 2 for i in infos)
    for info in infos:
        start, end = (config.cfg_scale_start, config.cfg_scale) if config.use_linear_cfg else (config.cfg_scale,) * 2
        expected = (start - end) * info.sigma_hat / OFFICIAL_SIGMA_MAX + end
        assert info.cfg_scale == pytest.approx(expected, rel=1e-3)
        assert info.control_scale == pytest.approx(config.control_scale)
        assert info.x.device.type == "cuda" and info.denoised.shape == info.x.shape


@pytest.mark.parametrize("mode", ["exact", "official"])
def test_tiled_vae_with_offloading_runs_on_the_gpu(fake, mode):
    """Defect 2: `TiledVAEEngine` took its device from the VAE's parameters, which with offloading are the
    host copies: the tiled VAE ran on the CPU in bf16 and the sampler then ran on the CPU with a GPU->CPU
    copy of eps per step (checked by hand: with the device taken from ``next(vae.parameters())`` again
    and no offloader, this test fails in the tiled encoder with "Expected all tensors to be on the same
    device, ... cpu and cuda:0")."""
    out = restore(fake, RestoreConfig(tiling="on", tile_size=128, tile_stride=64, vae_tiling=mode,
                                      vae_tile_size=64, **SMALL), offload=True)
    on_gpu(fake)
    assert out.metadata["tiling"]["vae_tiled"] and out.metadata["tiling"]["vae_tiling"] == mode


def test_tiled_sampler_and_tiled_vae_together(fake):
    out = restore(fake, RestoreConfig(vae_tiling="exact", vae_tile_size=64, restore_cfg=4.0, **TILED_SAMPLER,
                                      **SMALL), callback=lambda info: None)
    on_gpu(fake)
    assert out.metadata["tiling"]["vae_tiled"] and out.metadata["tiling"]["sampler_tiled"]
