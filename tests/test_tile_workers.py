"""Tile-parallel sampling over Ray actors (`supir_rt.tile_workers`) on a local Ray (127.0.0.1, 2 CPUs).

The expected latent is the single-process tiled sampler's (`stages.sample` over the local
`TiledDenoiser`). Each worker builds its own engine from the same recipe (tiny-random, seed 0) and
receives exactly the tile batches the single process runs (`tile_batch` tiles per call), so every
batch is the same computation on the same weights: the latents must be bitwise equal (max abs
difference 0). The driver runs with one intra-op thread here, as the Ray workers do (Ray sets
OMP_NUM_THREADS=1 for a 1-CPU actor): oneDNN's convolution results can depend on the thread count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from supir_rt.tiling.policy import TilingPlan
from supir_rt.noise import NoiseSource
from supir_rt.restore_config import RestoreConfig
from supir_rt.tile_workers import TilePool, TileWorkerError, WorkerRecipe, engine_identity

ray = pytest.importorskip("ray")

RECIPE = WorkerRecipe("tiny_random", {"seed": 0})
PLAN = TilingPlan(sampler_tiled=True, vae_tiled=False, tile=(16, 16), stride=8, tiles=4, tile_batch=1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=80 * 2**20,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def restorer():
    from supir_rt import Restorer

    with Restorer.tiny_random(seed=0) as r:
        yield r


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(restorer):
    g = torch.Generator().manual_seed(7)
    control, x_center = torch.randn(1, 4, 24, 24, generator=g), torch.randn(1, 4, 24, 24, generator=g)
    from supir_rt.stages import prepare_condition

    cond, uncond = prepare_condition(restorer.pipeline.embed("a photo"), restorer.pipeline.embed("blurry"), control)
    return cond, uncond, x_center


def _sample(restorer, config, pool=None, callback=None, tile_text=None):
    from supir_rt.stages import sample

    cond, uncond, x_center = _inputs(restorer)
    return sample(restorer.engines, cond, uncond, x_center, NoiseSource(config.seed), config, restorer.model_config,
                  callback, tiling=PLAN, tile_pool=pool, tile_text=tile_text)


@pytest.mark.parametrize("sampler", ["edm", "dpmpp2m-sde"])
def test_two_workers_give_the_single_process_latent(local_ray, restorer, one_thread, sampler):
    config = RestoreConfig(num_steps=3, seed=11, sampler=sampler, s_churn=2.0)
    want = _sample(restorer, config)
    with TilePool(RECIPE, 2, expected=engine_identity(restorer.engines["unet_adaptor"])) as pool:
        got = _sample(restorer, config, pool)
    assert (got - want).abs().max().item() == 0.0


def test_per_tile_text_reaches_the_workers(local_ray, restorer, one_thread):
    """Per-tile captions (`tile_text`): the workers condition each tile with its own text, as the single
    process does (bitwise), and that differs from one text for all tiles."""
    config = RestoreConfig(num_steps=2, seed=11)
    negative = restorer.pipeline.embed("blurry")
    tile_text = [(restorer.pipeline.embed(f"a photo of tile {k}"), negative) for k in range(PLAN.tiles)]
    want = _sample(restorer, config, tile_text=tile_text)
    assert (want - _sample(restorer, config)).abs().max().item() > 0
    with TilePool(RECIPE, 2, expected=engine_identity(restorer.engines["unet_adaptor"])) as pool:
        got = _sample(restorer, config, pool, tile_text=tile_text)
    assert (got - want).abs().max().item() == 0.0


def test_a_worker_killed_mid_restore_has_its_tiles_rerun_on_the_other(local_ray, restorer, one_thread):
    """Documented behaviour: the dead worker's tiles run on the survivors, the latent is unchanged."""
    config = RestoreConfig(num_steps=3, seed=11)
    want = _sample(restorer, config)
    with TilePool(RECIPE, 2) as pool:
        victim = pool.actors[1]
        steps = []

        def kill_after_first_step(info):
            steps.append(info.index)
            if info.index == 0:
                ray.kill(victim)

        got = _sample(restorer, config, pool, callback=kill_after_first_step)
        assert pool.alive == [0]
    assert steps == [0, 1, 2]
    assert (got - want).abs().max().item() == 0.0


def test_all_workers_dead_is_one_clear_error(local_ray, restorer):
    config = RestoreConfig(num_steps=2, seed=11)
    with TilePool(RECIPE, 1) as pool:
        with pytest.raises(TileWorkerError, match="all 1 tile workers died"):
            _sample(restorer, config, pool, callback=lambda info: ray.kill(pool.actors[0]))


def test_workers_with_other_weights_are_refused_before_the_first_step(local_ray, restorer):
    expected = engine_identity(restorer.engines["unet_adaptor"])
    with pytest.raises(TileWorkerError, match="tile worker 0 runs a different unet_adaptor.*weights_sha256"):
        TilePool(WorkerRecipe("tiny_random", {"seed": 1}), 1, expected=expected)
    with pytest.raises(TileWorkerError, match="supir_rt"):
        TilePool(RECIPE, 1, expected={**expected, "supir_rt": "0.0.0-other"})


def test_a_ray_address_that_does_not_answer_is_one_clear_error():
    """In a fresh process (this one may already be connected to the local Ray)."""
    code = ("from supir_rt.tile_workers import connect_ray, TileWorkerError\n"
            "try:\n    connect_ray('127.0.0.1:9')\nexcept TileWorkerError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR --ray-address 127.0.0.1:9: nothing answers there" in out.stdout, out.stdout + out.stderr


def test_cli_tile_workers_give_the_single_process_image(tmp_path):
    """`supir-rt restore --tiny-random --tiling on ... --tile-workers 2` (a local Ray the command starts)
    writes the image the same command writes without workers, and records the workers in its metadata.
    One intra-op thread in both runs (see the module docstring)."""
    import json
    import os

    import numpy as np
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(src)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    common = [sys.executable, "-m", "supir_rt.cli", "restore", "--tiny-random", str(src), "--steps", "2",
              "--tiling", "on", "--tile-size", "128", "--tile-stride", "64", "-q"]
    outs = {}
    for name, extra in (("single", []), ("workers", ["--tile-workers", "2"])):
        outs[name] = tmp_path / f"{name}.png"
        run = subprocess.run([*common, "-o", str(outs[name]), *extra], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    single, workers = (np.asarray(Image.open(outs[n])) for n in ("single", "workers"))
    assert np.array_equal(single, workers)
    meta = json.loads(Image.open(outs["workers"]).text["supir-rt"])
    # 80x64 at min-size 256 -> 320x256 px -> a 40x32 latent; 16-px tiles at stride 8: 4 x 3 windows
    assert meta["runtime"]["tile_workers"] == 2 and meta["tiling"]["sampler_tiles"] == 4 * 3


# --------------------------------------------------------------------------------------------------
# serving: tiled restores of at least --tile-workers-above processing pixels go to the pool
# --------------------------------------------------------------------------------------------------

# 96x64 -> 192x128 px processing (24576 px); 64x64 -> 128x128 px (16384 px); both sampler-tiled with
# 64-px tiles at stride 32 (an 8x8 latent tile, stride 4): 5x3 and 3x3 windows
SERVE_SETTINGS = dict(num_steps=2, seed=5, min_size=128, tiling="on", tile_size=64, tile_stride=32)
ABOVE = 20_000


def _job(width, height):
    import numpy as np
    from PIL import Image

    from supir_rt.images import LoadedImage
    from supir_rt.restore_config import RestoreConfig
    from supir_rt.serve import Job

    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Job(image=LoadedImage(Image.fromarray(pixels)), config=RestoreConfig(**SERVE_SETTINGS))


def _served(worker, jobs):
    import io

    import numpy as np
    from PIL import Image

    outcomes = worker.run(jobs)
    for o in outcomes:
        assert o.error is None, o.error
    return [(np.asarray(Image.open(io.BytesIO(o.png))), o.metadata) for o in outcomes]


def test_serve_worker_sends_only_images_above_the_threshold_to_the_tile_workers(local_ray, one_thread):
    """`RestoreWorker` (what every server runs) with ``tile_workers=2, tile_workers_above=20000``: the
    192x128-px tiled restore runs on the pool (its `bind` is called, metadata ``tile_workers`` 2) and gives
    the image of a worker without a pool (bitwise: same tile batches, see the module docstring); the
    128x128-px tiled restore runs on the replica's own engine (no `bind`, metadata 0). Checked once by
    hand: with the threshold ignored (`Pipeline._tile_pool_for` returning the pool for every tiled
    restore) the small restore binds the pool and this test fails."""
    import numpy as np

    from supir_rt.runtime import RuntimeOptions
    from supir_rt.serve import RestoreWorker

    big, small = _job(96, 64), _job(64, 64)
    plain = RestoreWorker(RuntimeOptions(tiny_random=True), max_batch_size=1)
    try:
        (want_big, _), (want_small, _) = _served(plain, [big, small])
    finally:
        plain.close()
    pooled = RestoreWorker(RuntimeOptions(tiny_random=True, tile_workers=2, tile_workers_above=ABOVE),
                           max_batch_size=1)
    try:
        pool = pooled.restorer.pipeline.tile_pool
        assert pool is not None and pool.min_pixels == ABOVE
        bound = []
        real_bind = pool.bind
        pool.bind = lambda denoiser: bound.append(denoiser) or real_bind(denoiser)
        assert pooled.info()["runtime"]["tile_workers_above"] == ABOVE
        (got_big, meta_big), = _served(pooled, [_job(96, 64)])
        assert len(bound) == 1
        (got_small, meta_small), = _served(pooled, [_job(64, 64)])
        assert len(bound) == 1  # not called again: the small restore ran here
    finally:
        pooled.close()
    assert meta_big["processing_size"] == [192, 128] and meta_small["processing_size"] == [128, 128]
    assert meta_big["tiling"]["sampler_tiles"] == 5 * 3 and meta_big["tiling"]["tile_workers"] == 2
    assert meta_small["tiling"]["sampler_tiles"] == 3 * 3 and meta_small["tiling"]["tile_workers"] == 0
    assert np.array_equal(got_big, want_big) and np.array_equal(got_small, want_small)


@pytest.mark.parametrize("options, words", [
    (dict(tile_workers=2, tile_workers_above=-1), "--tile-workers-above -1: give a number >= 0"),
    (dict(tile_workers_above=20_000), "--tile-workers-above is for --tile-workers N"),
    (dict(tile_workers=2, tile_worker_cpus=-0.5), "--tile-worker-cpus -0.5: give a number >= 0"),
])
def test_a_bad_tile_worker_setting_is_one_clear_error_before_anything_loads(options, words):
    from supir_rt.errors import SetupError
    from supir_rt.runtime import RuntimeOptions
    from supir_rt.serve import RestoreWorker

    with pytest.raises(SetupError) as err:
        RestoreWorker(RuntimeOptions(tiny_random=True, **options))
    assert str(err.value).startswith(words)


def test_serve_replicas_leave_the_cpus_of_their_tile_workers_free(local_ray):
    """On the 2-CPU local Ray: 1 replica with 2 workers of 0.5 CPU leaves 2 - 1 - 0.1 (the HTTP front)
    = 0.9 CPU for the replica; 2 workers of 1 CPU leave none, which is one error naming the flags."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("fastapi")
    from supir_rt.runtime import RuntimeOptions
    from supir_rt.serve.app_config import AppConfig
    from supir_rt.serve.ray_app import _cpus

    def config(cpus):
        return AppConfig(runtime=RuntimeOptions(tiny_random=True, tile_workers=2, tile_worker_cpus=cpus))

    assert _cpus(AppConfig(runtime=RuntimeOptions(tiny_random=True)), 0.0) == 1.0  # no workers: as before
    assert _cpus(config(0.5), 0.0) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="--tile-worker-cpus 1 leave no CPU of Ray's 2 for the replicas"):
        _cpus(config(1.0), 0.0)


# --------------------------------------------------------------------------------------------------
# exported engines (--engines-dir): the workers open the same ONNX files
# --------------------------------------------------------------------------------------------------


def test_tile_workers_over_exported_onnx_engines_give_the_single_process_image(local_ray, one_thread, tiny_config,
                                                                               tiny_onnx_dir):
    """Tile workers for a restorer of exported engines (`Restorer.from_engines`, what ``--engines-dir``
    opens): each worker opens the same ONNX Runtime engines (recipe ``from_engines``), is checked against
    the driver's weights hash, and the sampler-tiled restore equals the single-process one bit for bit."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from PIL import Image

    from supir_rt import Restorer
    from supir_rt.runtime import _with_workers

    kwargs = dict(engines_dir=str(tiny_onnx_dir), backend="onnxruntime", dtype="fp32", config=tiny_config)
    settings = RestoreConfig(num_steps=2, seed=5, min_size=128, tiling="on", tile_size=64, tile_stride=32,
                             vae_tiling="none")
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with Restorer.from_engines(**kwargs) as single:
        want = single.restore(picture, settings)
    with _with_workers(Restorer.from_engines(**kwargs), "from_engines", kwargs, 2, None, num_cpus=0.5) as pooled:
        got = pooled.restore(picture, settings)
        assert pooled.description["tile_workers"] == 2
    assert got.metadata["tiling"]["tile_workers"] == 2 and want.metadata["tiling"]["tile_workers"] == 0
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
