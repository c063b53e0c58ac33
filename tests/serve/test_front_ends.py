"""Every front end imports where its extra is installed, and says which extra to install where it is not.

CI installs ``.[all]`` and sets SUPIR_RT_REQUIRE_ALL_EXTRAS=1: there a front end that cannot be imported
fails the test (a broken combination of extras, such as numpy 1 under a pandas built for numpy 2) instead
of skipping it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supir_rt.cli import main

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("SUPIR_RT_REQUIRE_ALL_EXTRAS") == "1"

# front end module -> the third-party modules it runs on, and its extra
FRONT_ENDS = {
    "supir_rt.ui.layout": ("ui", ["gradio", "pandas"]),
    "supir_rt.serve.ray_app": ("serve", ["ray.serve", "fastapi"]),
    "supir_rt.serve.triton": ("triton", ["pytriton.triton", "tritonclient.http", "tritonclient.grpc"]),
    "supir_rt.caption.llava": ("llava", ["onnxruntime", "transformers"]),
    "supir_rt.backends.onnxruntime_backend": ("onnx", ["onnxruntime", "onnx"]),
}


@pytest.mark.parametrize("module", sorted(FRONT_ENDS))
def test_front_end_imports_in_a_fresh_process(module):
    """In a fresh interpreter, so that nothing this test session imported before can hide a failure."""
    extra, needs = FRONT_ENDS[module]
    code = "; ".join(f"import {m}" for m in [*needs, module])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    if out.returncode != 0 and not REQUIRED:
        pytest.skip(f"the {extra} extra is not installed here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, f"{module} (extra {extra}) does not import:\n{out.stderr[-3000:]}"


@pytest.mark.parametrize("argv, extra, module", [
    (["serve", "--tiny-random"], "serve", "ray"),
    (["triton", "--tiny-random"], "triton", "pytriton"),
    (["ui", "--tiny-random"], "ui", "gradio"),
])
def test_a_missing_extra_is_one_line_naming_it(argv, extra, module, monkeypatch, capsys):
    """The module is made unimportable (None in sys.modules), as on an install without the extra."""
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    importlib.invalidate_caches()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"pip install 'supir-rt[{extra}]'" in lines[0] and module in lines[0], lines[0]
