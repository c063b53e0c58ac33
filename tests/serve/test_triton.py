"""Triton: the generated model repository, `supir-rt triton` (PyTriton) and the bundled tritonserver binary
running the generated model.py, all with the tiny model on 127.0.0.1 and `tritonclient` over HTTP."""

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

pytest.importorskip("pytriton")
httpclient = pytest.importorskip("tritonclient.http")

from serve_helpers import FAST, assert_same_image, decode_png, free_port, png_bytes  # noqa: E402

from supir_rt.restore_config import RestoreConfig  # noqa: E402
from supir_rt.serve.protocol import png_metadata  # noqa: E402
from supir_rt.serve.triton import (  # noqa: E402
    config_pbtxt, pytriton_backends_dir, pytriton_server_env, use_own_libpython, write_model_repository,
)

ROOT = Path(__file__).resolve().parents[2]


def infer_inputs(image: bytes, settings: dict | str):
    text = settings if isinstance(settings, str) else json.dumps(settings)
    inputs = [httpclient.InferInput("image", [1, 1], "BYTES"), httpclient.InferInput("settings", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[image]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return inputs


def answer(result) -> tuple[bytes, dict | None]:
    png = result.as_numpy("image").reshape(-1)[0]
    error = result.as_numpy("error").reshape(-1)[0]
    return png, (json.loads(error) if error else None)


def expected(restorer, image: bytes, **settings) -> np.ndarray:
    from PIL import Image

    config = RestoreConfig(**{**FAST, **settings})
    return np.asarray(restorer.restore(Image.open(io.BytesIO(image)), config).image.convert("RGB"))


def wait_ready(client, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {stop(proc)[-4000:]}")
        try:
            if client.is_model_ready("supir"):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        assert time.monotonic() < deadline, "server not ready in time"
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read().decode("utf-8", "replace") if proc.stdout else ""


def metric(port: int, name: str) -> float:
    """One model metric from Triton's Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="supir"' in line)


def exercise(client, restorer, metrics_port: int) -> None:
    """8 concurrent requests (batched by Triton), a BMP whose data ends in NUL bytes, bad requests."""
    images = [png_bytes(i % 2) for i in range(8)]
    pending = [client.async_infer("supir", infer_inputs(img, {**FAST, "seed": 40 + i})) for i, img in enumerate(images)]
    for i, (img, request) in enumerate(zip(images, pending)):
        png, error = answer(request.get_result(timeout=300))
        assert error is None, error
        assert png_metadata(png)["settings"]["seed"] == 40 + i
        assert_same_image(decode_png(png), expected(restorer, img, seed=40 + i))
    inferences, executions = metric(metrics_port, "nv_inference_count"), metric(metrics_port, "nv_inference_exec_count")
    assert inferences == 8 and executions < 8, (inferences, executions)  # dynamic batching grouped requests

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 32), (0, 0, 0)).save(buf, "BMP")  # the pixel data ends in zero bytes
    assert buf.getvalue().endswith(b"\0\0\0\0")
    png, error = answer(client.infer("supir", infer_inputs(buf.getvalue(), {**FAST, "seed": 1})))
    assert error is None, error
    assert_same_image(decode_png(png), expected(restorer, buf.getvalue(), seed=1))

    for image, settings, field in [(png_bytes(0), {"sed": 1}, "sed"), (png_bytes(0), {"num_steps": -3}, "num_steps"),
                                   (b"not an image", {}, "image"), (png_bytes(0), "{oops", "settings")]:
        png, error = answer(client.infer("supir", infer_inputs(image, settings)))
        assert png == b"" and error["error"]["field"] == field and error["error"]["status"] in (400, 413, 422), error
    # one bad request among good ones sent at once (dynamic batching may put them in one execute call):
    # the good ones answered, the bad one a JSON error naming the field, no traceback anywhere
    settings = [{**FAST, "seed": 70}, {**FAST, "upscale": 1e308}, {**FAST, "seed": 71}, {**FAST, "seed": 72}]
    pending = [client.async_infer("supir", infer_inputs(png_bytes(i), s)) for i, s in enumerate(settings)]
    for i, (s, request) in enumerate(zip(settings, pending)):
        png, error = answer(request.get_result(timeout=300))
        assert "Traceback" not in json.dumps(error) and "site-packages" not in json.dumps(error), error
        if "upscale" in s:
            assert png == b"" and error["error"]["status"] == 422 and error["error"]["field"] == "upscale", error
        else:
            assert error is None, error
            assert_same_image(decode_png(png), expected(restorer, png_bytes(i), seed=s["seed"]))
    png, error = answer(client.infer("supir", infer_inputs(png_bytes(3), {**FAST, "seed": 3})))
    assert error is None  # still serving


# --------------------------------------------------------------------------------------------------


def test_model_repository_layout_and_config(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = config_pbtxt(runtime={"tiny_random": True}, limits={"max_steps": 50}, gpus=[0, 1], max_batch_size=8)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())  # Triton's own schema
    assert config.backend == "python" and config.max_batch_size == 8
    assert [i.name for i in config.input] == ["image", "settings"] and [o.name for o in config.output] == ["image", "error"]
    assert all(t.data_type == model_config_pb2.TYPE_STRING and list(t.dims) == [1] for t in [*config.input, *config.output])
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, [0]),
                                                                     (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 50_000
    assert json.loads(config.parameters["runtime"].string_value) == {"tiny_random": True}

    from supir_rt.cli import main

    out = tmp_path / "repo"
    assert main(["triton-repo", str(out), "--tiny-random", "--max-steps", "50"]) == 0
    assert (out / "supir" / "1" / "model.py").is_file() and (out / "supir" / "config.pbtxt").is_file()
    compile((out / "supir" / "1" / "model.py").read_text(), "model.py", "exec")
    assert main(["triton-repo", str(out), "--tiny-random"]) == 2  # no silent overwrite
    with pytest.raises(TypeError):
        write_model_repository(tmp_path / "x", runtime={"tiny": True}, limits={})


def test_own_libpython_goes_first():
    import sysconfig

    env = {"LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu:/opt/x"}
    use_own_libpython(env)
    first = env["LD_LIBRARY_PATH"].split(":")[0]
    assert first == sysconfig.get_config_var("LIBDIR")
    assert (Path(first) / sysconfig.get_config_var("LDLIBRARY")).exists() or not sysconfig.get_config_var("Py_ENABLE_SHARED")
    assert env["LD_LIBRARY_PATH"].endswith(":/usr/lib/x86_64-linux-gnu:/opt/x")


@pytest.mark.slow
def test_supir_rt_triton_pytriton(reference_restorer, tmp_path):
    """`supir-rt triton --tiny-random` started without LD_LIBRARY_PATH (the entry point sets it)."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(PYTHONPATH=f"{ROOT}:{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "supir_rt.cli", "triton", "--tiny-random", "--http-port", str(http), "--grpc-port",
         str(grpc), "--metrics-port", str(metrics), "--max-steps", "50"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", concurrency=8)
    try:
        wait_ready(client, proc)
        exercise(client, reference_restorer, metrics)
    finally:
        client.close()
        log = stop(proc)
    assert "resource_tracker" not in log or "RLock" not in log, log[-3000:]


@pytest.mark.slow
def test_bundled_tritonserver_runs_generated_model_py(reference_restorer, tmp_path):
    """The generated repository's model.py under the tritonserver binary bundled in nvidia-pytriton."""
    import pytriton

    binary = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    repo = tmp_path / "repo"
    write_model_repository(repo, runtime={"tiny_random": True}, limits={"max_steps": 50})
    backends = pytriton_backends_dir(tmp_path / "backends")
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = pytriton_server_env()
    env.update(PYTHONPATH=f"{ROOT}:{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
         "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--allow-gpu-metrics", "false",
         "--exit-timeout-secs", "5",
         # the stub must answer Triton's health checks; on 2 shared, overloaded cores 30 s (the default) was missed once
         "--backend-config", "python,stub-timeout-seconds=120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", concurrency=8)
    try:
        wait_ready(client, proc)
        exercise(client, reference_restorer, metrics)
    finally:
        client.close()
        stop(proc)
