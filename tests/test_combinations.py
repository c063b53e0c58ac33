"""Every entry point × every tiling × both samplers, on the tiny random model, each with a step callback.

{CLI, API, batch of 3, serve worker, UI callback} × {untiled, tiled sampler, tiled VAE (official mode,
decided by the memory budget), both (exact tiled VAE)} × {edm, dpmpp2m-sde}: each run must give the image of the API's plain restore (no callback) of the same
settings. The reference is `Restorer.restore`; the entry points reach the pipeline by their own routes
(flags -> `RestoreConfig` -> `restore_file`; `restore_many`; `RestoreWorker.run` on decoded request
bytes; `RestoreUI.restore` on knob values), so a route that drops or changes a setting, or breaks with
a callback, fails here.

Each step callback also checks that the sampler runs under ``no_grad`` and not ``inference_mode``: the
torch engine recognises unchanged conditioning by its version counter, which inference mode hides.
Checked by hand against the two bugs this matrix was written for: on commit 19b559e the API leg's call
(a tiled-sampler restore with a step callback) raised ``TypeError: StepInfo.__init__() got an unexpected
keyword argument 'cfg_scale'`` (``_report_tiled``); with ``torch.inference_mode()`` put back around the
batch composition (as the old ``batching.run_batch`` had it), ``test_batch_of_three[untiled-edm]`` fails
with "the sampler runs under inference_mode".
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from supir_rt.api import Request
from supir_rt.restore_config import RestoreConfig

SIZE = 256  # px; tiny latent 32×32
TILINGS = {
    "untiled": dict(tiling="off"),
    "sampler": dict(tiling="on", vae_tiling="none", tile_size=128, tile_stride=64),
    # auto with a budget the untiled VAE exceeds (about 55 MB) but the UNet (4 MB) and one VAE tile fit; the
    # official tiled VAE (16 tiles). The exact mode at this budget keeps no tile's activations and recomputes
    # them (about 30 s a restore here): tests/tiling/test_tiled_vae.py covers it, not all 10 front-end legs
    "vae": dict(tiling="auto", max_memory_gb=40 / 1024, vae_tile_size=64, vae_tiling="official"),
    # both tiled, the exact tiled VAE (4 tiles)
    "both": dict(tiling="on", tile_size=128, tile_stride=64, vae_tile_size=128),
}
SAMPLERS = ("edm", "dpmpp2m-sde")
EXPECTED_TILED = {"untiled": (False, False), "sampler": (True, False), "vae": (False, True), "both": (True, True)}


def settings(tiling: str, sampler: str, seed: int = 3) -> RestoreConfig:
    extra = dict(restore_cfg=2.0) if sampler == "edm" else {}
    return RestoreConfig(num_steps=2, min_size=SIZE, seed=seed, sampler=sampler, **extra, **TILINGS[tiling])


def image(seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rng = np.random.default_rng(seed)
    arr = np.stack([x % 256, y % 256, (x * y) % 256], -1) // 2 + rng.integers(0, 128, (SIZE, SIZE, 3))
    return Image.fromarray(arr.astype(np.uint8), "RGB")


class Steps:
    """A step callback that counts steps and checks the grad mode the sampler runs in."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, info) -> None:
        assert not torch.is_inference_mode_enabled(), "the sampler runs under inference_mode"
        assert not torch.is_grad_enabled()
        assert info.denoised.shape == info.x.shape and info.cfg_scale is not None
        self.count += 1


def assert_same(got: np.ndarray, want: np.ndarray, *, batched: bool = False) -> None:
    """Equal, or for a batch the rounding a batched convolution may add on CPU (test_batching.py)."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if batched:
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())
    else:
        assert diff.max() == 0, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def restorer():
    from supir_rt import Restorer

    with Restorer.tiny_random() as r:
        yield r


@pytest.fixture(scope="module")
def reference(restorer):
    cache: dict = {}

    def get(tiling: str, sampler: str) -> np.ndarray:
        key = (tiling, sampler)
        if key not in cache:
            restored = restorer.restore(image(), settings(tiling, sampler))
            assert (restored.result.tiling["sampler_tiled"], restored.result.tiling["vae_tiled"]) == \
                EXPECTED_TILED[tiling]
            cache[key] = np.asarray(restored.image)
        return cache[key]

    return get


COMBINATIONS = [(t, s) for t in TILINGS for s in SAMPLERS]


@pytest.mark.parametrize("tiling, sampler", COMBINATIONS)
def test_api(restorer, reference, tiling, sampler):
    steps = Steps()
    got = restorer.restore(image(), settings(tiling, sampler), callback=steps)
    assert steps.count == 2
    assert_same(np.asarray(got.image), reference(tiling, sampler))


@pytest.mark.parametrize("tiling, sampler", COMBINATIONS)
def test_batch_of_three(restorer, reference, tiling, sampler):
    steps = Steps()
    requests = [Request(image(i), settings(tiling, sampler, seed=3 + i)) for i in range(3)]
    got = restorer.restore_many(requests, callback=steps)
    # untiled: one loop for the three; tiled: the requests run one after the other
    assert steps.count == (2 if tiling == "untiled" else 6)
    images = [np.asarray(restored.image) for restored in got]
    assert_same(images[0], reference(tiling, sampler), batched=True)
    # the others have their own images and seeds (equal to their single restores: test_batching.py)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


@pytest.mark.parametrize("tiling, sampler", COMBINATIONS)
def test_cli(restorer, reference, tiling, sampler, tmp_path, monkeypatch):
    """`supir-rt restore` with the flags of these settings; -v makes the progress count every step
    through the pipeline's step callback."""
    from supir_rt.cli import main

    class Shared:  # the module's restorer, not closed by the command
        def __getattr__(self, name):
            return getattr(restorer, name)

        def close(self) -> None:
            pass

    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", lambda args, file_cfg: Shared())
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    image().save(src)
    cfg = settings(tiling, sampler)
    flags = ["--steps", "2", "--min-size", str(SIZE), "--seed", "3", "--sampler", sampler, "--tiling", cfg.tiling]
    flags += ["--restore-cfg", "2"] if sampler == "edm" else []
    flags += ["--tile-size", str(cfg.tile_size), "--tile-stride", str(cfg.tile_stride),
              "--vae-tile-size", str(cfg.vae_tile_size), "--vae-tiling", cfg.vae_tiling]
    flags += ["--max-memory", "40M"] if cfg.max_memory_gb is not None else []
    assert main(["restore", str(src), "-o", str(out), "-v", *flags]) == 0
    with Image.open(out) as saved:
        assert_same(np.asarray(saved.convert("RGB")), reference(tiling, sampler))


@pytest.mark.parametrize("tiling, sampler", COMBINATIONS)
def test_serve_worker(restorer, reference, tiling, sampler):
    from supir_rt.serve import Job, RestoreWorker, RuntimeOptions, decode_image

    steps = Steps()
    worker = RestoreWorker(RuntimeOptions(tiny_random=True), restorer=restorer, on_step=steps)
    buffer = io.BytesIO()
    image().save(buffer, format="PNG")
    [outcome] = worker.run([Job(decode_image(buffer.getvalue()), settings(tiling, sampler))])
    assert outcome.error is None, outcome.error
    assert steps.count == 2
    with Image.open(io.BytesIO(outcome.png)) as got:
        assert_same(np.asarray(got.convert("RGB")), reference(tiling, sampler))


@pytest.mark.parametrize("tiling, sampler", COMBINATIONS)
def test_ui_callback(restorer, reference, tiling, sampler, tmp_path):
    from supir_rt.ui.callbacks import RestoreUI

    cfg = settings(tiling, sampler)
    overlay = {k: v for k, v in cfg.as_dict().items() if v != getattr(RestoreConfig(), k)}
    ui = RestoreUI(restorer, tmp_path / "work", defaults=overlay)
    src = tmp_path / "in.png"
    image().save(src)
    reports: list[tuple[float, str]] = []
    out = ui.restore(str(src), "", ui.initial_values(), report=lambda fraction, text: reports.append((fraction, text)))
    assert sum("sampling: step" in text for _, text in reports) == 1  # step 1 of 2 (step 2 reads "decoding")
    assert_same(np.asarray(out.after), reference(tiling, sampler))
