"""One bad request never fails its neighbours, and no client ever sees a traceback or a server path.

In process (no server): the Triton model (`TritonModel.infer`, what both Triton front ends call) and
the `RestoreWorker` that every front end runs, given a list with good requests and one poisoned one. The
servers themselves get the same mix in tests/serve/test_ray_serve.py and tests/serve/test_triton.py.
Checked by hand: with `RestoreWorker.run` catching only `ValueError` (as before), the unexpected error of
the poisoned request escaped for the whole list and these tests fail.
"""

from __future__ import annotations

import json
import math

import pytest
from serve_helpers import FAST, assert_same_image, decode_png, png_bytes

from supir_rt.restore_config import RestoreConfig
from supir_rt.serve import worker as worker_module
from supir_rt.serve.protocol import RequestError, parse_settings, png_metadata
from supir_rt.serve.triton import TritonModel

SECRET = "/opt/secret/site-packages/supir_rt/pipeline.py"


def leaks(text: str) -> bool:
    return "Traceback" in text or SECRET in text or "site-packages" in text


@pytest.fixture(scope="module")
def model():
    m = TritonModel({"tiny_random": True}, {"max_processing_pixels": 300_000})
    yield m
    m.close()


def expected(restorer, image: bytes, **settings):
    import io

    import numpy as np
    from PIL import Image

    config = RestoreConfig(**{**FAST, **settings})
    return np.asarray(restorer.restore(Image.open(io.BytesIO(image)), config).image.convert("RGB"))


@pytest.mark.parametrize("bad", [
    {"upscale": 1e308}, {"upscale": math.inf}, {"cfg_scale": math.nan}, {"s_noise": math.inf},
    {"noise_device": "meta"}, {"min_size": 10**400},
])
def test_absurd_settings_are_422_before_any_work(bad):
    """json.dumps writes NaN/Infinity, which json.loads reads back: what a client can really send."""
    with pytest.raises(RequestError) as caught:
        parse_settings(json.dumps({**FAST, **bad}))
    assert caught.value.status == 422 and caught.value.field == next(iter(bad))


def test_tiling_settings_are_checked_together():
    config = parse_settings(json.dumps({"tiling": "on", "tile_size": 256, "tile_stride": 128}))
    assert (config.tiling, config.tile_size, config.tile_stride) == ("on", 256, 128)
    with pytest.raises(RequestError) as caught:
        parse_settings(json.dumps({"tile_size": 256, "tile_stride": 512}))
    assert caught.value.field == "tile_stride"


def test_triton_batch_with_one_bad_request(model, reference_restorer):
    images = [png_bytes(i) for i in range(3)]
    requests = [(img, json.dumps({**FAST, "seed": 10 + i}).encode()) for i, img in enumerate(images)]
    requests.insert(2, (png_bytes(5), json.dumps({**FAST, "upscale": 1e308}).encode()))
    answers = model.infer(requests)
    bad_png, bad_error = answers.pop(2)
    error = json.loads(bad_error)["error"]
    assert bad_png == b"" and error["status"] == 422 and error["field"] == "upscale", error
    for i, (img, (png, err)) in enumerate(zip(images, answers)):
        assert err == b"", err
        assert png_metadata(png)["settings"]["seed"] == 10 + i
        assert_same_image(decode_png(png), expected(reference_restorer, img, seed=10 + i))


def test_unexpected_failure_fails_only_its_request(model, monkeypatch, reference_restorer):
    """A request whose run raises something unforeseen (a bug, an engine error) gets a JSON 500 without
    traceback or path; its batch neighbours, first tried together with it, are answered."""
    pipeline = model.worker.restorer.pipeline  # the one composition: a single restore is a batch of one
    real_batch = pipeline.run_batch

    def poisoned(config: RestoreConfig) -> None:
        if config.seed == 666:
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered in {SECRET}")

    def run_batch(items, **kw):
        for item in items:
            poisoned(item.config)
        return real_batch(items, **kw)

    monkeypatch.setattr(pipeline, "run_batch", run_batch)
    seeds = [21, 666, 22, 23]
    answers = model.infer([(png_bytes(0), json.dumps({**FAST, "seed": s}).encode()) for s in seeds])
    for seed, (png, err) in zip(seeds, answers):
        if seed == 666:
            body = err.decode()
            assert png == b"" and json.loads(body)["error"]["status"] == 500 and not leaks(body), body
            assert "RuntimeError" in body  # the kind of failure, for the operator; details in the log
        else:
            assert err == b"", err
            assert_same_image(decode_png(png), expected(reference_restorer, png_bytes(0), seed=seed))


def test_cancelled_or_expired_work_stops_between_steps(model):
    """A request whose client left (``cancelled``, set by the Ray replica when its caller is cancelled) or
    whose deadline passed stops at the next sampler step instead of running all its steps. 400 steps of
    the tiny model take ~30 s on a free core; the cancelled run ends after the step in progress."""
    import threading
    import time

    from supir_rt.serve.protocol import decode_image
    from supir_rt.serve.worker import Job

    config = RestoreConfig(**{**FAST, "num_steps": 400})
    steps = []
    pipeline = model.worker.restorer.pipeline
    real_run = pipeline.run_batch

    def counting_run(*args, callback=None, **kw):
        return real_run(*args, callback=lambda info: (steps.append(info.index), callback(info)), **kw)

    job = Job(image=decode_image(png_bytes(0)), config=config)
    threading.Timer(1.0, lambda: setattr(job, "cancelled", True)).start()
    pipeline.run_batch = counting_run
    try:
        [outcome] = model.worker.run([job])
        assert outcome.error is not None and outcome.error.kind == "cancelled", outcome
        assert 0 < len(steps) < 400, len(steps)  # stopped after a step, not after all 400
        steps.clear()
        late = Job(image=decode_image(png_bytes(0)), config=config, deadline=time.time() + 1.0)
        [outcome] = model.worker.run([late])
        assert outcome.error.status == 504 and outcome.error.kind == "timeout" and 0 < len(steps) < 400
        [outcome] = model.worker.run([Job(image=decode_image(png_bytes(0)), config=config, deadline=time.time() - 1)])
        assert outcome.error.kind == "timeout" and not [s for s in steps if s > 400]  # never started
    finally:
        pipeline.run_batch = real_run


def test_default_processing_limit_follows_the_device():
    from supir_rt.serve.protocol import DEFAULT_PROCESSING_PIXELS, Limits, processing_pixels_limit

    assert processing_pixels_limit(Limits(), "cpu") == 1024 * 1024 == DEFAULT_PROCESSING_PIXELS["cpu"]
    assert processing_pixels_limit(Limits(), "cuda:1") == 4 * 1024 * 1024
    assert processing_pixels_limit(Limits(max_processing_pixels=5), "cpu") == 5
