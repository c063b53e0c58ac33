"""`supir-rt serve --tiny-random --replicas 2` on a real local Ray instance (127.0.0.1 only).

One server for the module, started as the command users run (starting Ray and the replicas takes
20-60 s on 2 busy cores) and stopped with SIGINT at the end, which must exit 0. The tests run in file
order; the replica-kill test comes last. Expected images come from `Restorer` in this process and, for
one request, from the `supir-rt restore` CLI.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from serve_helpers import FAST, assert_same_image, decode_png, free_port, png_bomb, png_bytes  # noqa: E402

from supir_rt.restore_config import RestoreConfig  # noqa: E402
from supir_rt.serve.protocol import png_metadata  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 1024 * 1024
SERVE_FLAGS = [
    "--tiny-random", "--replicas", "2", "--num-cpus", "2", "--cpus-per-replica", "0.5", "--object-store-mb", "200",
    "--max-ongoing-requests", "4", "--max-batch-size", "4", "--max-queued-requests", "12", "--retry-after", "2",
    "--max-body-mb", "1", "--max-image-pixels", "4000000", "--request-timeout", "120",
    "--max-processing-pixels", "300000",  # the tiny model's CPU attention needs GBs above ~1 Mpx
]


@contextlib.contextmanager
def start_server(flags: list[str], tmp_path_factory):
    """`supir-rt serve FLAGS` as users run it; yields its URL once healthy, stops it with SIGINT (exit 0)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    proc = subprocess.Popen([sys.executable, "-m", "supir_rt.cli", "serve", "--port", str(port), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"supir-rt serve exited with {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
            try:
                if requests.get(f"{base}/v1/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening or not routing yet
                pass
            assert time.monotonic() < deadline, "supir-rt serve did not come up in 180 s"
            time.sleep(1)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out = proc.communicate(timeout=120)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with start_server(SERVE_FLAGS, tmp_path_factory) as base:
        # /v1/health is ready with the first replica; the capacity tests need both
        deadline = time.monotonic() + 120
        while len({requests.get(f"{base}/v1/info", timeout=30).json()["model"]["pid"] for _ in range(6)}) < 2:
            assert time.monotonic() < deadline, "the second replica did not come up"
            time.sleep(1)
        yield base


def post(url: str, image: bytes, settings: dict | str | None = None, *, params=None, timeout=120, **fields):
    data = {"settings": settings if isinstance(settings, str) else json.dumps(settings or {})}
    data.update(fields)
    return requests.post(f"{url}/v1/restore", files={"image": ("in.png", image, "image/png")}, data=data,
                         params=params, timeout=timeout)


def expected(restorer, image: bytes, **settings) -> np.ndarray:
    from PIL import Image

    config = RestoreConfig(**{**FAST, **settings})
    return np.asarray(restorer.restore(Image.open(io.BytesIO(image)), config).image.convert("RGB"))


def assert_serving(url: str, restorer) -> None:
    """The server still answers a good request correctly."""
    image = png_bytes(99)
    r = post(url, image, {**FAST, "seed": 99})
    assert r.status_code == 200, r.text
    assert_same_image(decode_png(r.content), expected(restorer, image, seed=99))


def error_of(response, status: int, field: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert err["field"] == field and err["message"], err
    return err


# --------------------------------------------------------------------------------------------------


def test_health_and_info(url):
    assert requests.get(f"{url}/v1/health", timeout=30).json() == {"status": "ready"}
    info = requests.get(f"{url}/v1/info", timeout=30).json()
    assert info["model"]["runtime"]["model"] == "tiny-random" and info["model"]["device"] == "cpu"
    assert info["limits"]["max_body_bytes"] == MAX_BODY and info["deployment"]["replicas"] == 2
    assert info["deployment"]["max_queued_requests"] == 12 and info["limits"]["max_processing_pixels"] == 300_000


def test_16_concurrent_requests_across_2_replicas(url, reference_restorer, tmp_path):
    from supir_rt.cli import main

    jobs = [(png_bytes(i % 4), 100 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: post(url, job[0], {**FAST, "seed": job[1]}), jobs))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    for (image, seed), r in zip(jobs, responses):
        assert r.headers["content-type"] == "image/png" and r.headers["x-supir-seed"] == str(seed)
        assert png_metadata(r.content)["settings"]["seed"] == seed
        assert_same_image(decode_png(r.content), expected(reference_restorer, image, seed=seed))
    assert max(int(r.headers["x-supir-batch-size"]) for r in responses) > 1  # compatible requests were batched
    # the CLI restores the same image with the same seed to the same pixels
    src = tmp_path / "in.png"
    src.write_bytes(jobs[0][0])
    assert main(["restore", str(src), "--tiny-random", "--seed", str(jobs[0][1]), "--steps", "2", "--min-size",
                 "128", "-o", str(tmp_path / "out.png"), "-q"]) == 0
    assert_same_image(decode_png(responses[0].content), decode_png((tmp_path / "out.png").read_bytes()))


def test_json_response_and_alpha(url, reference_restorer):
    image = png_bytes(7, mode="RGBA")
    r = post(url, image, {**FAST, "seed": 3, "color_fix_type": "AdaIn"}, params={"format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    png = base64.b64decode(body["image_base64"])
    assert body["media_type"] == "image/png" and body["metadata"]["settings"]["color_fix_type"] == "adain"
    from PIL import Image

    assert Image.open(io.BytesIO(png)).mode == "RGBA"
    assert_same_image(decode_png(png), expected(reference_restorer, image, seed=3, color_fix_type="adain"))


def test_bad_requests_get_4xx_json_naming_the_field(url, reference_restorer):
    good = png_bytes(1)
    cases = [
        (lambda: post(url, b"this is not an image"), 400, "image"),
        (lambda: post(url, png_bomb()), 413, "image"),
        (lambda: post(url, good, {"sed": 1}), 422, "sed"),
        (lambda: post(url, good, {"num_steps": 0}), 422, "num_steps"),
        (lambda: post(url, good, {"s_churn": -1.0}), 422, "s_churn"),
        (lambda: post(url, good, {"seed": "seven"}), 422, "seed"),
        (lambda: post(url, good, {"color_fix_type": "sepia"}), 422, "color_fix_type"),
        (lambda: post(url, good, {"preset": "best"}), 422, "preset"),
        (lambda: post(url, good, {"num_steps": 5000}), 422, "num_steps"),
        (lambda: post(url, good, "{not json"), 400, "settings"),
        (lambda: post(url, good, {**FAST, "upscale": 20.0}), 413, "upscale"),  # 960x800 px > the 300k limit
        (lambda: post(url, good, {**FAST, "upscale": 100.0}), 422, "upscale"),  # above 32: no run could finish
        (lambda: post(url, b"\0" * (MAX_BODY + 1024)), 413, "body"),
        # not multipart: the body is at fault (as documented), not a missing image
        (lambda: requests.post(f"{url}/v1/restore", data={"settings": "{}"}, timeout=60), 400, "body"),
        (lambda: requests.post(f"{url}/v1/restore", json={"image": "x"}, timeout=60), 400, "body"),
        (lambda: requests.post(f"{url}/v1/restore", files={"settings": (None, "{}")}, timeout=60), 400, "image"),
        (lambda: requests.post(f"{url}/v1/caption", files={"image": ("a.png", good)}, timeout=60), 501, "captioner"),
    ]
    for send, status, field in cases:
        error_of(send(), status, field)
    assert_serving(url, reference_restorer)


def no_leak(response) -> None:
    assert "Traceback" not in response.text and "site-packages" not in response.text and str(ROOT) not in response.text


def test_one_bad_request_does_not_fail_its_batch(url, reference_restorer):
    """3 good requests and one with a setting no run can finish, sent at once: the good ones 200, the bad
    one a 422 JSON naming the field; no body holds a traceback or a path. (Before, upscale 1e308 passed the
    checks, failed inside the replica's batch and took 1-2 of its neighbours down with 500s.)"""
    jobs = [({**FAST, "seed": 60 + i}, png_bytes(i)) for i in range(3)]
    jobs.insert(1, ({**FAST, "upscale": 1e308}, png_bytes(9)))
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda job: post(url, job[1], job[0]), jobs))
    for (settings, image), r in zip(jobs, responses):
        no_leak(r)
        if "upscale" in settings:
            error_of(r, 422, "upscale")
        else:
            assert r.status_code == 200, r.text
            assert_same_image(decode_png(r.content), expected(reference_restorer, image, seed=settings["seed"]))


def test_identical_requests_give_identical_bytes(url):
    """The PNG (pixels and metadata) depends on the request only: the metadata stores decisions, not
    measurements such as the free memory, and names, not server paths."""
    image = png_bytes(11)
    first, second = (post(url, image, {**FAST, "seed": 5}) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    meta = png_metadata(first.content)
    assert "budget_gib" not in json.dumps(meta) and str(ROOT) not in json.dumps(meta)
    info = requests.get(f"{url}/v1/info", timeout=30)
    assert "/" not in json.dumps(info.json()["deployment"]), info.text
    missing = requests.get(f"{url}/v2/nothing", timeout=30)  # FastAPI's own errors are JSON too
    error_of(missing, 404, "route")


def test_full_queue_answers_503_with_retry_after(url, reference_restorer):
    """48 simultaneous requests against 2 replicas × 4 ongoing + 12 queued: the rest get 503, none is lost."""
    image = png_bytes(5)
    settings = {**FAST, "num_steps": 4, "seed": 1}
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda _: post(url, image, settings), range(48)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 8 and codes.count(503) >= 8, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["kind"] == "overloaded"
    want = expected(reference_restorer, image, num_steps=4, seed=1)
    for r in responses:
        if r.status_code == 200:
            assert_same_image(decode_png(r.content), want)
    assert_serving(url, reference_restorer)


def test_replica_killed_during_load(url, reference_restorer):
    """In-flight requests on the killed replica are retried once (200) or fail cleanly (503 JSON); later
    requests succeed. The server writes no files, so nothing can be left half-written."""
    image = png_bytes(6)
    settings = {**FAST, "num_steps": 6, "seed": 2}
    pids = {requests.get(f"{url}/v1/info", timeout=30).json()["model"]["pid"] for _ in range(10)}
    victim = min(pids)  # a model replica of the server this module started
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, url, image, settings) for _ in range(8)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        responses = [f.result() for f in futures]
    want = expected(reference_restorer, image, num_steps=6, seed=2)
    for r in responses:
        if r.status_code == 200:
            assert_same_image(decode_png(r.content), want)
        else:
            assert r.status_code == 503 and r.json()["error"]["kind"] in ("replica_failed", "overloaded"), r.text
    deadline = time.monotonic() + 90
    while requests.get(f"{url}/v1/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the application did not recover"
        time.sleep(1)
    with ThreadPoolExecutor(4) as pool:
        later = list(pool.map(lambda _: post(url, image, settings), range(4)))
    assert [r.status_code for r in later] == [200] * 4
    for r in later:
        assert_same_image(decode_png(r.content), want)
