"""`supir-rt serve`: the generated Ray Serve config file, flag errors, and the command itself."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("ray")
requests = pytest.importorskip("requests")

from serve_helpers import FAST, assert_same_image, decode_png, free_port, png_bytes  # noqa: E402

from supir_rt.cli import main  # noqa: E402
from supir_rt.restore_config import RestoreConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_print_config_is_a_valid_ray_serve_config(capsys):
    from ray.serve.schema import ServeDeploySchema

    from supir_rt.serve.app_config import AppConfig

    assert main(["serve", "--tiny-random", "--print-config", "--autoscale", "1:6", "--max-batch-size", "2"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "supir_rt.serve.ray_app:build_app" and app.route_prefix == "/"
    config = AppConfig.from_args(app.args)  # the builder accepts its own args
    assert (config.min_replicas, config.max_replicas, config.gpus_per_replica, config.max_batch_size) == (1, 6, 1.0, 2)
    assert doc["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("argv, words", [
    (["--autoscale", "3"], "--autoscale"),
    (["--max-batch-size", "8", "--max-ongoing-requests", "4"], "max_ongoing_requests"),
    (["--replicas", "0"], "replicas"),
])
def test_bad_flags_are_one_error_line(argv, words, capsys):
    assert main(["serve", "--tiny-random", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


@pytest.mark.slow
def test_serve_command_starts_serves_and_stops(reference_restorer, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "supir_rt.cli", "serve", "--tiny-random", "--replicas", "2",
                             "--port", str(port), "--num-cpus", "2", "--cpus-per-replica", "0.5",
                             "--object-store-mb", "200"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening or not routing yet
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(1)
        image = png_bytes(4)
        r = requests.post(f"http://127.0.0.1:{port}/v1/restore", files={"image": ("a.png", image)},
                          data={"settings": json.dumps({**FAST, "seed": 8})}, timeout=120)
        assert r.status_code == 200, r.text
        want = reference_restorer.restore(Image.open(io.BytesIO(image)), RestoreConfig(seed=8, **FAST)).image
        assert_same_image(decode_png(r.content), np.asarray(want.convert("RGB")))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out = proc.communicate(timeout=90)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
