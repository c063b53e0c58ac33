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


def test_table_reports_utilisation_and_targets_from_gpu_results(tmp_path):
    """The table's arithmetic on results as a GPU run writes them (an H100 SXM: 989.5 dense fp16 TFLOPS)."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cuda_check import table

    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "dry_run": False, "date": "2026-12-01 10:00 UTC"}
    rows = {"compiled": [{"row": "CFG step, compiled", "tflop": 20.28, "ms": 50.0, "first_s": 120.0,
                          "peak_gib": 9.0, "reserved_gib": 9.5, "compile_failed": False}],
            "restore": [{"row": "restore, eager fp16, offload", "tflop": 20.28, "ms": 70.0, "first_s": 9.0,
                         "total_s": 4.2, "steps": 50, "peak_gib": 11.5, "reserved_gib": 12.0}]}
    for phase, rs in rows.items():
        (tmp_path / f"{phase}.json").write_text(json.dumps({"meta": meta, "rows": rs}))
    text = table(tmp_path, dry_run=False)
    compiled = next(line for line in text.splitlines() if line.startswith("| CFG step, compiled |"))
    assert f"| {20.28 / 0.050:.0f} |" in compiled and f"{100 * 20.28 / 0.050 / 989.5:.0f} %" in compiled  # 406, 41 %
    assert "target (40 %) MET" in text
    assert f"peak {11.5 * 2**30 / 1e9:.1f} GB" in text and "target (12 GB) NOT met" in text  # 12.3 GB > 12 GB
    assert "| CFG step, eager fp16 (contiguous) | not measured" in text
    assert "Phases with no result file: step, vae, restore-compiled." in text
