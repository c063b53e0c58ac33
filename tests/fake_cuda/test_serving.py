"""The serve worker and the UI's restore callback on a fake GPU (device chosen as a replica / the UI
server chooses it: "cuda" when a GPU is seen). The checker of the fixture watches every operation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from supir_rt.images import from_pil
from supir_rt.restore_config import RestoreConfig

from test_restore import image, on_gpu


def test_serve_worker_restores_on_the_gpu(fake):
    from supir_rt.serve.worker import Job, RestoreWorker, RuntimeOptions

    worker = RestoreWorker(RuntimeOptions(tiny_random=True, backend="torch"), max_batch_size=2)
    try:
        assert worker.device == "cuda:0" and worker.info()["runtime"]["dtype"] == "fp16"
        fake.records.clear()
        config = RestoreConfig(num_steps=2, min_size=128, seed=1)
        outcomes = worker.run([Job(from_pil(image()), config), Job(from_pil(image()), config.with_overrides(seed=2))])
    finally:
        worker.close()
    assert [o.error for o in outcomes] == [None, None]
    for o in outcomes:
        assert Image.open(io.BytesIO(o.png)).size == (64, 64)
    on_gpu(fake)


def test_ui_restore_callback_on_the_gpu(fake, tmp_path):
    from supir_rt.api import Restorer
    from supir_rt.ui.callbacks import RestoreUI

    src = tmp_path / "photo.png"
    image().save(src)
    with Restorer.tiny_random(device="cuda", dtype="fp16") as restorer:
        ui = RestoreUI(restorer, tmp_path / "work", defaults={"min_size": 128})
        try:
            fake.records.clear()
            reports = []
            out = ui.restore(src, "a photo", {"num_steps": 2, "seed": 4}, report=lambda f, t: reports.append(t))
        finally:
            ui.close()
    on_gpu(fake)
    assert any("step 2/2" in t or "decoding" in t for t in reports)
    assert np.asarray(out.after).shape == (64, 64, 3)


@pytest.mark.parametrize("flag", ["--tiny-random"])
def test_cli_restore_on_the_gpu(fake, tmp_path, flag):
    """`supir-rt restore` with its defaults on a machine that has a GPU: device cuda, fp16."""
    import json

    from supir_rt.cli import main

    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    image().save(src)
    assert main(["restore", str(src), "-o", str(dst), flag, "--steps", "2", "--min-size", "128"]) == 0
    meta = json.loads(Image.open(dst).info["supir-rt"])
    assert meta["runtime"]["device"] == "cuda:0" and meta["runtime"]["dtype"] == "fp16"
    on_gpu(fake)
