"""Generate ``tests/data/tiled_recordings.pt``: the tiled restores of the tiny random model, as recorded.

Provenance: run once on the code of commit 19b559e (before issue 18 replaced the forked tiled samplers
``sample_restore_edm_tiled`` / ``sample_dpmpp_2m_sde_tiled`` by a tiled denoiser over the one sampler per
algorithm) with one change applied to it, the VAE attention's dense q/k/v of commit c20d661 (the only
numerics change made beside the refactor), on CPU with torch 2.13, fp32::

    git worktree add --detach /tmp/rec 19b559e && cd /tmp/rec
    git show c20d661 -- supir_rt/model/vae.py | git apply
    cp <this checkout>/tests/data/make_tiled_recordings.py tests/data/ && PYTHONPATH=. python3 tests/data/make_tiled_recordings.py

For every case of `CASES` it records the sampled latent (what the decoder receives) and, where the VAE
is tiled, the decoded image before the colour fix. `tests/tiling/test_recordings.py` replays the same cases
on the current code and compares. The cases cover the tiled sampler (EDM with and without restoration
guidance, with and without churn; DPM++ 2M SDE; one and two tiles per call), the tiled VAE in both modes,
and both together, at two sizes and two seeds.

Only the recording run itself uses the code paths of that commit (`run_case` drives `Pipeline.run` with an
explicit tiling plan and captures the ``decode`` stage's input and output); the replay test drives today's
equivalent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

OUT = Path(__file__).with_name("tiled_recordings.pt")
WEIGHTS_SEED = 0  # torch.manual_seed before build_model(ModelConfig.tiny())

# name: (image (w, h), restore settings, tiling plan fields)
SAMPLER = dict(sampler_tiled=True, tile=(8, 8), stride=4)
CASES: dict[str, tuple[tuple[int, int], dict, dict]] = {
    "edm_sampler_128x192_seed3": ((128, 192), dict(seed=3), SAMPLER),
    "edm_sampler_restorecfg_nochurn_192x192_seed5": ((192, 192), dict(seed=5, restore_cfg=4.0, s_churn=0.0), SAMPLER),
    "edm_sampler_restorecfg_batch2_128x192_seed3": ((128, 192), dict(seed=3, restore_cfg=4.0, tile_batch=2),
                                                    {**SAMPLER, "tile_batch": 2}),
    "dpmpp_sampler_128x192_seed3": ((128, 192), dict(seed=3, sampler="dpmpp2m-sde"), SAMPLER),
    "dpmpp_sampler_192x192_seed5": ((192, 192), dict(seed=5, sampler="dpmpp2m-sde", tile_batch=2),
                                    {**SAMPLER, "tile_batch": 2}),
    "vae_exact_192x192_seed5": ((192, 192), dict(seed=5), dict(vae_tiled=True, vae_tile_px=64, vae_tiling="exact")),
    "vae_official_128x192_seed3": ((128, 192), dict(seed=3), dict(vae_tiled=True, vae_tile_px=64,
                                                                  vae_tiling="official")),
    "both_edm_restorecfg_192x192_seed5": ((192, 192), dict(seed=5, restore_cfg=4.0),
                                          {**SAMPLER, "vae_tiled": True, "vae_tile_px": 64, "vae_tiling": "exact"}),
    "both_dpmpp_128x192_seed3": ((128, 192), dict(seed=3, sampler="dpmpp2m-sde"),
                                 {**SAMPLER, "vae_tiled": True, "vae_tile_px": 64, "vae_tiling": "official"}),
}
COMMON = dict(num_steps=3, min_size=128)


def case_image(size: tuple[int, int]) -> Image.Image:
    """A smooth RGB gradient with a diagonal stripe (deterministic, no file)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), ((x + y) % 32) * 8], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def case_settings(name: str) -> tuple[Image.Image, dict, dict]:
    size, settings, plan = CASES[name]
    plan = dict(plan)
    if plan.get("sampler_tiled"):
        th, tw = plan["tile"]
        h, w = size[1] // 8, size[0] // 8  # min_size 128 keeps these sizes as they are
        rows = len(range(0, h - th + 1, plan["stride"])) + bool((h - th) % plan["stride"])
        cols = len(range(0, w - tw + 1, plan["stride"])) + bool((w - tw) % plan["stride"])
        plan["tiles"] = rows * cols
    return case_image(size), {**COMMON, **settings}, plan


def main() -> None:
    import supir_rt.pipeline as pipeline_module
    from supir_rt.backends import open_engines
    from supir_rt.config import ModelConfig
    from supir_rt.memory import TilingPlan
    from supir_rt.model.supir import build_model
    from supir_rt.pipeline import Pipeline
    from supir_rt.restore_config import RestoreConfig

    torch.manual_seed(WEIGHTS_SEED)
    config = ModelConfig.tiny()
    pipe = Pipeline(open_engines("torch", model=build_model(config)), config)
    captured: dict[str, torch.Tensor] = {}
    decode = pipeline_module.decode

    def capturing_decode(engines, latent):
        image = decode(engines, latent)
        captured["latent"], captured["decoded"] = latent.clone(), image.clone()
        return image

    pipeline_module.decode = capturing_decode
    records = {}
    for name in CASES:
        image, settings, plan = case_settings(name)
        pipe.run(image, RestoreConfig(**settings), tiling=TilingPlan(**{"sampler_tiled": False,
                                                                                 "vae_tiled": False, **plan}))
        records[name] = {"latent": captured["latent"]}
        if plan.get("vae_tiled"):  # the decoded image only where the VAE is tiled (keeps the file small)
            records[name]["decoded"] = captured["decoded"]
        print(name, tuple(captured["latent"].shape), float(captured["latent"].abs().mean()))
    torch.save(records, OUT)


if __name__ == "__main__":
    main()
