"""`supir-rt serve --tiny-random --replicas 2`, the README's command as written, on a machine with 2 CPUs.

The CPU count is limited to 2 for the server (a `sitecustomize` makes `os.cpu_count` and
`multiprocessing.cpu_count`, which Ray sizes itself from, answer 2), whatever this machine has. Before,
the two replicas took 1 CPU each, the HTTP front (0.1 CPU) was never scheduled and /v1/health never
answered. One server for the module (127.0.0.1), in this order:

* /v1/health answers 503 + Retry-After (JSON) from the first seconds until ready, then 200;
* /v1/restore answers 200;
* a second server on the same port is refused with one line (Ray's proxy binds with SO_REUSEPORT, so a
  second one would have shared the port silently);
* SIGTERM while a request runs: that request is answered 200, new ones get 503 JSON or no connection,
  the command exits 0 and the Ray processes it started are gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from serve_helpers import FAST, free_port, png_bytes  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), including those re-parented later."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server process, its URL, and what /v1/health answered while it started."""
    fake = tmp_path_factory.mktemp("two_cpus")
    (fake / "sitecustomize.py").write_text(
        "import multiprocessing, os\nos.cpu_count = lambda: 2\nmultiprocessing.cpu_count = lambda: 2\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "supir_rt.cli", "serve", "--tiny-random", "--replicas", "2",
                             "--port", str(port), "--retry-after", "3"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    answers = []  # (seconds since start, status, Retry-After, body) of every answer before 200
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() - started < 240, f"not ready in 240 s: {answers[-3:]}"
            try:
                r = requests.get(f"{base}/v1/health", timeout=5)
            except requests.RequestException:
                time.sleep(0.25)
                continue
            if r.status_code == 200:
                break
            answers.append((time.monotonic() - started, r.status_code, r.headers.get("retry-after"), r.text))
            time.sleep(0.5)
        yield proc, base, answers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_answers_503_with_retry_after_until_ready(server):
    _, _, answers = server
    assert answers, "never answered before ready"
    # From the first seconds: the answer starts before Ray does (which takes 10-30 s here); what comes before
    # it is the Python start and the CLI's imports (torch), several seconds on 2 busy cores.
    assert answers[0][0] < 15 and answers[-1][0] - answers[0][0] > 5, (answers[0], answers[-1])
    # Ray's HTTP proxy joins the port (SO_REUSEPORT) before the application's routes reach it: for a moment
    # it may answer 404 itself; anything else is ours, 503 JSON + Retry-After.
    handoff = [t for t, status, _, _ in answers if status == 404]
    assert not handoff or handoff[-1] - handoff[0] < 3, [(round(t, 1), status) for t, status, _, _ in answers]
    for _, status, retry, body in answers:
        if status != 404:
            assert status == 503 and retry == "3", (status, retry, body)
            assert json.loads(body)["status"] == "loading"


def test_restore_answers_200(server):
    _, base, _ = server
    r = requests.post(f"{base}/v1/restore", files={"image": ("in.png", png_bytes(1))},
                      data={"settings": json.dumps({**FAST, "seed": 3})}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text


def test_second_server_on_the_same_port_is_refused(server):
    _, base, _ = server
    port = base.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "supir_rt.cli", "serve", "--tiny-random", "--port", port],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: port {port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr


def test_sigterm_drains_then_stops_ray(server):
    proc, base, _ = server
    ray_processes = descendants(proc.pid)
    assert ray_processes, "no Ray processes under the server?"
    slow = {**FAST, "num_steps": 40, "seed": 4}
    result = {}

    def send():
        result["r"] = requests.post(f"{base}/v1/restore", files={"image": ("in.png", png_bytes(2))},
                                    data={"settings": json.dumps(slow)}, timeout=300)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(3)  # the request is in a replica now
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    try:  # a new request is refused: 503 JSON while draining, or no connection once stopped
        late = requests.post(f"{base}/v1/restore", files={"image": ("in.png", png_bytes(3))},
                             data={"settings": json.dumps(FAST)}, timeout=60)
        assert late.status_code == 503 and late.headers.get("retry-after"), late.text
        assert late.json()["error"]["kind"] == "stopping"
    except requests.ConnectionError:
        pass
    thread.join(timeout=300)
    assert result["r"].status_code == 200 and result["r"].headers["content-type"] == "image/png", result["r"].text
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ray_processes):
        left = [pid for pid in ray_processes if alive(pid)]
        names = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for p in left if alive(p)]
        assert time.monotonic() < deadline, f"Ray processes left running: {names}"
        time.sleep(1)
