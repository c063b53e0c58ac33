"""``supir-rt caption`` through its own parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from supir_rt.caption.cli import add_caption_parser, output_paths, run_caption


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="supir-rt")
    add_caption_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["caption", *argv])


@pytest.fixture()
def images(tmp_path: Path, image) -> list[Path]:
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for p in paths:
        image.save(p)
    return paths


def test_prints_one_caption(exported: Path, images: list[Path], capsys) -> None:
    args = parse([str(images[0]), "--model-dir", str(exported), "--precision", "fp32", "--max-new-tokens", "6", "--greedy"])
    assert args.func is run_caption
    assert run_caption(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1


def test_writes_sidecars(exported: Path, images: list[Path], tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "captions"
    args = parse([*map(str, images), "--model-dir", str(exported), "--max-new-tokens", "6", "--seed", "1", "-o", str(out_dir)])
    assert run_caption(args) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.txt", "b.txt"]  # no temporary files left
    assert capsys.readouterr().out == ""


def test_refuses_collisions_and_missing_inputs(tmp_path: Path, image, exported: Path) -> None:
    (tmp_path / "x").mkdir()
    a, b = tmp_path / "a.png", tmp_path / "x" / "a.png"
    image.save(a)
    image.save(b)
    with pytest.raises(ValueError, match="both write"):
        output_paths([a, b], tmp_path / "out")
    assert run_caption(parse([str(tmp_path / "missing.png"), "--model-dir", str(exported)])) == 2


def test_missing_model_dir_is_a_clear_error(images: list[Path], tmp_path: Path, caplog) -> None:
    assert run_caption(parse([str(images[0]), "--model-dir", str(tmp_path / "nope")])) == 2
    assert "export_llava.py" in caplog.text
