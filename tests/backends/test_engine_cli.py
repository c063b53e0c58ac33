"""`supir-rt restore` over real exported tiny engines: ``--tiny-random --engines-dir DIR`` runs them on an
engine backend (as the docs say: auto = torch only without ``--engines-dir``), and the same folder without
``--tiny-random`` is refused with the flag that fixes it, leaving the folder untouched."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from supir_rt import cli
from supir_rt.images import read_metadata


def _folder_state(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_tiny_random_with_engines_dir_runs_the_engines(tmp_path, tiny_onnx_dir, capsys):
    engines = shutil.copytree(tiny_onnx_dir, tmp_path / "engines")
    before = _folder_state(engines)
    src = tmp_path / "in.png"
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8), "RGB").save(src)
    code = cli.main(["restore", str(src), "-o", str(tmp_path / "out.png"), "--tiny-random", "--engines-dir", str(engines),
                     "--steps", "1", "--min-size", "64", "-q"])
    assert code == 0, capsys.readouterr().err
    runtime = read_metadata(tmp_path / "out.png")["runtime"]
    assert runtime["backend"] == "onnxruntime" and runtime["engines_dir"] == engines.name  # a name, not a path
    assert _folder_state(engines) == before  # the same model's engines are reused, not exported again

    code = cli.main(["restore", str(src), "-o", str(tmp_path / "out2.png"), "--engines-dir", str(engines), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "--tiny-random" in err and "build_engines.py" not in err
    assert _folder_state(engines) == before and not (tmp_path / "out2.png").exists()
