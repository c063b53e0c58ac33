"""examples/cpp: the C++ host (pybind11 embedded interpreter) built with CMake and run on the tiny model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import FAST, assert_same_image, decode_png, png_bytes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("c++")), reason="needs cmake and a C++ compiler"),
]


def test_cpp_host_restores_many_images(tmp_path, reference_restorer):
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    inputs = []
    for i in range(3):
        path = tmp_path / f"in{i}.png"
        path.write_bytes(png_bytes(i))
        inputs.append(path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    # The host computes with as many CPU threads as the reference restorer in this process: the result of a
    # CPU convolution depends on how its sums are split across threads (one grey level here and there).
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run([str(build / "supir_host"), "--tiny-random", "--steps", str(FAST["num_steps"]), "--min-size",
                          str(FAST["min_size"]), "--seed", "9", "-o", str(out), str(inputs[0]), str(bad), *map(str, inputs[1:])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr  # one image failed, the others were restored
    assert run.stderr.count("error:") == 1 and "bad.png" in run.stderr and "Traceback" not in run.stderr
    from supir_rt.restore_config import RestoreConfig

    config = RestoreConfig(seed=9, **FAST)
    for path in inputs:
        want = np.asarray(reference_restorer.restore(path, config).image.convert("RGB"))
        got = decode_png((out / path.name).read_bytes())
        assert_same_image(got, want)
        np.testing.assert_array_equal(got, want)  # same single-image path: bit-identical
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs)  # nothing else, nothing half-written

    usage = subprocess.run([str(build / "supir_host"), "--tiny-random"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("error: give -o OUT_DIR")
