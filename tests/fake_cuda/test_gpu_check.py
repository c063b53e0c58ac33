"""The GPU check (benchmarks/cuda_check.py, run by gpu_check.sh) on the fake GPU: the compile time is on
disk as soon as the first compiled call returns, the 12 GB verdict counts what the driver sees, and the
whole ``bash benchmarks/gpu_check.sh --fake-cuda`` runs every phase end to end (so CI proves the script
the GPU machine will run works, up to what only a GPU shows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _cuda_check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=1800)


def test_compile_time_is_written_right_after_the_first_call(tmp_path):
    """Defect 6: the compiled phase wrote its first row only after the timed calls, so the phase's cap
    could kill a cold compile of the official UNet before any row existed (checked by hand: with the
    first-call row removed from `phase_compiled`, the first row here is "CFG step, compiled"). With no
    budget left after the first call the phase stops there, and that row is on disk."""
    proc = _cuda_check("--phase", "compiled", "--out", str(tmp_path), "--fake-cuda", "--budget", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "compiled.json").read_text())["rows"]
    assert rows[0]["row"] == "CFG step, compile (first call)" and rows[0]["first_s"] > 0
    assert len(rows) == 1 and json.loads((tmp_path / "compiled.json").read_text())["meta"]["fake_cuda"]


def test_12_gb_verdict_counts_reserved_and_driver_memory(fake, tmp_path):
    """Defect 9: the verdict used `max_memory_allocated` only, but a 12 GB card must also hold PyTorch's
    cache and the CUDA context (checked by hand: with the verdict on the allocated figure again, this
    test fails).
    Here: 11.0 GB allocated at peak, 11.8 GB reserved, + 0.5 GiB context = 12.3 GB in use."""
    from cuda_check import _peak, table

    gb = 1e9
    fake.device.peak_allocated, fake.device.peak_reserved = int(11.0 * gb), int(11.8 * gb)
    fake.device.reserved = int(11.8 * gb)
    row = {"row": "restore, eager fp16, offload", "ms": 70.0, "first_s": 9.0, "total_s": 4.2, "steps": 50,
           "tflop": 20.28}
    with _peak(torch.device("cuda:0"), row):
        pass
    used = (11.8 * gb + fake.device.context) / gb
    assert abs(row["driver_used_gib"] * 2**30 / gb - used) < 1e-6
    meta = {"device": fake.device.name, "torch": torch.__version__, "dry_run": False, "date": "today"}
    (tmp_path / "restore.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    text = table(tmp_path, dry_run=False)
    assert f"peak 11.0 GB allocated (11.8 GB reserved, {used:.1f} GB in use per the driver)" in text
    assert "target (12 GB) NOT met" in text


def test_gpu_check_script_runs_every_phase_on_the_fake_gpu(tmp_path):
    """``bash benchmarks/gpu_check.sh --fake-cuda`` with this interpreter: every phase's process runs on the
    fake GPU, the script exits 0 and prints the one table with every row present and "fake" in place of
    the times (a phase that crashed or was cut short leaves its rows "not measured" and says so)."""
    from cuda_check import ROW_ORDER

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH="")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fake-cuda"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| measurement"):]
    for label in ROW_ORDER:
        line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        assert "| fake |" in line and "not measured" not in line and "NON-FINITE" not in line, line
    assert "Phases with no result file" not in table and "FAKE CUDA" in proc.stdout
    assert "not judged (fake device: nothing measured)" in table
