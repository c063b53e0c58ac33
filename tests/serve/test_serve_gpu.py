"""GPU-only checks of the serving paths (skipped without CUDA; none on the project's CPU machines):

    python -m pytest -q tests/serve/test_serve_gpu.py

* `RestoreWorker` on cuda: batched requests against single restores (same bound as on CPU);
* Ray Serve with one GPU per replica: the replica runs on cuda and answers correctly;
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from serve_helpers import FAST, assert_same_image, decode_png, free_port, png_bytes

pytestmark = [pytest.mark.requires_cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def _reference(image: bytes, **settings) -> np.ndarray:
    from PIL import Image

    from supir_rt import Restorer
    from supir_rt.restore_config import RestoreConfig

    with Restorer.tiny_random(device="cuda") as r:
        return np.asarray(r.restore(Image.open(io.BytesIO(image)), RestoreConfig(**{**FAST, **settings})).image)


def test_worker_batches_on_cuda():
    from supir_rt.serve import Job, RestoreWorker, RuntimeOptions, decode_image, parse_settings

    worker = RestoreWorker(RuntimeOptions(tiny_random=True, device="cuda"))
    assert worker.device.startswith("cuda")
    images = [png_bytes(i) for i in range(4)]
    jobs = [Job(decode_image(b), parse_settings({**FAST, "seed": i}, tiny=True)) for i, b in enumerate(images)]
    outcomes = worker.run(jobs)
    assert all(o.error is None and o.batch_size == 4 for o in outcomes)
    for i, (b, o) in enumerate(zip(images, outcomes)):
        assert_same_image(decode_png(o.png), _reference(b, seed=i))


def test_ray_serve_gpu_replica():
    ray = pytest.importorskip("ray")
    requests = pytest.importorskip("requests")
    from ray import serve

    from supir_rt.serve.ray_app import APP_NAME, build_app

    port = free_port()
    ray.init(num_gpus=1, object_store_memory=500 * 2**20, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"tiny_random": True, "replicas": 1, "gpus_per_replica": 1.0}), name=APP_NAME,
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v1/info", timeout=60).json()["model"]["device"].startswith("cuda")
        image = png_bytes(3)
        r = requests.post(f"{url}/v1/restore", files={"image": ("a.png", image)},
                          data={"settings": json.dumps({**FAST, "seed": 3})}, timeout=300)
        assert r.status_code == 200, r.text
        assert_same_image(decode_png(r.content), _reference(image, seed=3))
    finally:
        serve.shutdown()
        ray.shutdown()
