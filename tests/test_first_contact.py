"""What a new user meets first: the README's set-up command and sample photo, reproducing a PNG from
the command line, --tiny-random with the lightning preset, and docs free of internal tracker numbers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from supir_rt.cli import build_parser, main, restore_config_from_args
from supir_rt.images import read_metadata
from supir_rt.serve.protocol import parse_settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_setup_restores_a_photo_the_repository_has():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2, commands  # the README keeps exactly two set-up commands
    image = re.search(r"supir-rt restore (\S+)", commands[0]).group(1)
    with Image.open(ROOT / image) as img:  # shipped, and an image
        assert img.size[0] >= 64 and img.size[1] >= 64
    assert (ROOT / "docs/images/make_sample.py").is_file()  # made by a script of the project


def test_settings_from_reproduces_a_png(tmp_path):
    """`supir-rt restore in.png --settings-from out.png` gives out.png's pixels again: its settings, seed
    (-1 resolved to the one used) and caption, with a flag given beside it still winning."""
    src = ROOT / "docs/images/sample.png"
    first, again, changed = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "changed.png"
    assert main(["restore", str(src), "-o", str(first), "--tiny-random", "--steps", "2", "--min-size", "128",
                 "--seed", "-1", "--caption", "a harbour", "--color-fix", "adain", "-q"]) == 0
    stored = read_metadata(first)
    assert main(["restore", str(src), "-o", str(again), "--tiny-random", "--settings-from", str(first), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    meta = read_metadata(again)
    assert meta["settings"] == stored["settings"] and meta["caption"] == "a harbour"
    args = build_parser().parse_args(["restore", str(src), "--settings-from", str(first), "--steps", "3"])
    config = restore_config_from_args(args)
    assert config.num_steps == 3 and config.seed == stored["settings"]["seed"] and config.color_fix_type == "adain"
    assert main(["restore", str(src), "-o", str(changed), "--settings-from", str(src), "--tiny-random", "-q"]) == 2


def test_tiny_random_keeps_the_lightning_step_count():
    """--tiny-random shortens the official 50 steps to 4; lightning keeps its 8 (CLI and server agree)."""
    def cli(*flags):
        return restore_config_from_args(build_parser().parse_args(["restore", "x.png", "--tiny-random", *flags]))

    assert cli().num_steps == 4 and cli("--preset", "paper").num_steps == 4
    assert cli("--preset", "lightning").num_steps == 8 and cli("--preset", "lightning", "--steps", "2").num_steps == 2
    assert parse_settings({"preset": "lightning"}, tiny=True).num_steps == 8
    assert parse_settings({}, tiny=True).num_steps == 4


def test_docs_name_no_internal_issue_numbers():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/RESULTS.md"]
    for path in docs:
        text = re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)  # generated-section markers
        found = re.findall(r"\(issue \d+\)|\bissue \d+\b|-issue-\d+", text)
        assert not found, (path.name, found)
