"""The request timeout and the Prometheus metrics of `supir-rt serve`, on a real local Ray instance.

A second, small server (one replica, a 4 s request timeout, Ray's metrics endpoint on a known port):
the 120 s timeout of test_ray_serve.py's server cannot be reached by a test. The metric names are
read from Ray's own Prometheus endpoint (``GET /metrics`` on ``--metrics-export-port``), the text a
Prometheus server scrapes.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from serve_helpers import FAST, assert_same_image, decode_png, free_port, png_bytes  # noqa: E402
from test_ray_serve import error_of, expected, post, start_server  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT_S = 4
# 0.07 s per step at 128 px for the tiny model on one free core: 150 steps take ~10 s, well over 4 s
SLOW = {**FAST, "num_steps": 150, "seed": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    metrics_port = free_port()
    flags = ["--tiny-random", "--replicas", "1", "--num-cpus", "2", "--object-store-mb", "200",
             "--request-timeout", str(TIMEOUT_S), "--metrics-export-port", str(metrics_port)]
    with start_server(flags, tmp_path_factory) as url:
        yield url, f"http://127.0.0.1:{metrics_port}/metrics"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels` (None when absent)."""
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return None


def scrape_until(metrics_url: str, ready, deadline_s: float = 40) -> str:
    """Ray exports recorded metrics every few seconds: scrape until `ready(text)` holds."""
    deadline = time.monotonic() + deadline_s
    while True:
        text = requests.get(metrics_url, timeout=10).text
        if ready(text):
            return text
        assert time.monotonic() < deadline, "metrics not exported in time:\n" + "\n".join(
            line for line in text.splitlines() if "supir" in line)
        time.sleep(1)


def test_request_over_the_timeout_gets_504_and_the_server_goes_on(server, reference_restorer):
    url, _ = server
    start = time.monotonic()
    r = post(url, png_bytes(5), SLOW)
    waited = time.monotonic() - start
    err = error_of(r, 504, "request_timeout_s")
    assert err["kind"] == "timeout" and f"{TIMEOUT_S} s" in err["message"], err
    assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 5, waited  # answered at the timeout, not after the work
    # The abandoned batch still finishes on the replica; a request queued behind it may time out too,
    # then the server answers normally.
    image, deadline = png_bytes(99), time.monotonic() + 60
    while True:
        r = post(url, image, {**FAST, "seed": 99})
        if r.status_code == 200:
            break
        assert error_of(r, 504, "request_timeout_s")["kind"] == "timeout"
        assert time.monotonic() < deadline, "the server did not serve again after a timeout"
    assert_same_image(decode_png(r.content), expected(reference_restorer, image, seed=99))


def test_custom_metrics_reach_rays_prometheus_endpoint(server):
    url, metrics_url = server
    assert post(url, png_bytes(3), {**FAST, "seed": 3}).status_code == 200
    error_of(post(url, png_bytes(3), {"sed": 1}), 422, "sed")
    names = ["ray_supir_request_seconds_bucket", "ray_supir_requests_total", "ray_supir_errors_total",
             "ray_supir_queue_seconds_bucket", "ray_supir_run_seconds_bucket", "ray_supir_steps_per_second",
             "ray_supir_batch_size_bucket"]
    text = scrape_until(metrics_url, lambda t: all(f"\n{n}{{" in t for n in names)
                        and sample(t, "ray_supir_errors_total", kind="unknown_setting") is not None)
    assert sample(text, "ray_supir_requests_total", route="restore", status="200") >= 1
    assert sample(text, "ray_supir_request_seconds_count", route="restore", status="422") >= 1
    assert sample(text, "ray_supir_errors_total", route="restore", kind="timeout") >= 1  # the test above
    assert sample(text, "ray_supir_run_seconds_count", batch_size="1") >= 1
    assert sample(text, "ray_supir_steps_per_second") > 0
    # one more rejected request adds exactly one to its kind's error counter
    before = sample(text, "ray_supir_errors_total", route="restore", kind="unknown_setting")
    error_of(post(url, png_bytes(3), {"sed": 1}), 422, "sed")
    text = scrape_until(metrics_url, lambda t: sample(t, "ray_supir_errors_total", route="restore",
                                                      kind="unknown_setting") != before)
    assert sample(text, "ray_supir_errors_total", route="restore", kind="unknown_setting") == before + 1
