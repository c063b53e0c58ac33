"""benchmarks/gpu_check.sh is one prepared command for a GPU machine; its --dry-run runs every phase
on the tiny model on the CPU, so the script is known to work end to end except for CUDA itself."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # every phase on the tiny model, dynamo tracing twice: ~1-3 min on 2 CPU cores
def test_gpu_check_dry_run_prints_the_whole_table(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cuda_check import ROW_ORDER

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, BUDGET_S="900")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout[proc.stdout.index("| measurement"):]
    for label in ROW_ORDER:
        line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        assert "not measured" not in line and "NON-FINITE" not in line, line
    assert "compile FAILED" not in table  # dynamo's graph capture worked on the CPU
    (result,) = tmp_path.iterdir()
    assert (result / "table.md").read_text().strip() == proc.stdout[proc.stdout.index("supir-rt PyTorch"):].strip()
