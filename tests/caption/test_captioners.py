"""The captioner registry and the none/text/sidecar/llava captioners."""

from __future__ import annotations

from pathlib import Path

import pytest

from supir_rt.caption import CAPTIONERS, Captioner, make_captioner
from supir_rt.caption.layout import ModelDirError


def test_registry_kinds(tmp_path: Path, image) -> None:
    assert make_captioner("none").caption(image) == ""
    assert make_captioner("text", text="a red car").caption(image) == "a red car"
    with pytest.raises(ValueError, match="needs text"):
        make_captioner("text")
    with pytest.raises(ValueError, match="none, text, sidecar, llava, hf"):
        make_captioner("blip")
    for kind in ("none", "sidecar"):
        assert isinstance(make_captioner(kind), Captioner)
    assert CAPTIONERS == ("none", "text", "sidecar", "llava", "hf")


def test_sidecar(tmp_path: Path, image) -> None:
    src = tmp_path / "photo.png"
    image.save(src)
    cap = make_captioner("sidecar")
    with pytest.raises(FileNotFoundError, match="photo.txt"):
        cap.caption(image, source=src)
    (tmp_path / "photo.txt").write_text("A red car\non a street.\n", encoding="utf-8")
    assert cap.caption(image, source=src) == "A red car on a street."
    with pytest.raises(ValueError, match="source"):
        cap.caption(image)


def test_llava_captioner(exported: Path, image, monkeypatch) -> None:
    cap = make_captioner("llava", model_dir=exported, precision="int8", seed=3, max_new_tokens=16)
    assert isinstance(cap, Captioner)
    first = cap.caption(image)
    assert isinstance(first, str) and "\n" not in first
    assert cap.caption(image) == first  # seeded per caption
    cap.close()
    monkeypatch.setenv("SUPIR_RT_LLAVA_DIR", str(exported))
    greedy = make_captioner("llava", sample=False, precision="fp32", max_new_tokens=8)
    assert isinstance(greedy.caption(image), str)
    greedy.close()


def test_llava_captioner_without_model_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SUPIR_RT_LLAVA_DIR", raising=False)
    with pytest.raises(ModelDirError, match="SUPIR_RT_LLAVA_DIR"):
        make_captioner("llava")
    with pytest.raises(ModelDirError, match="export_llava.py"):
        make_captioner("llava", model_dir=tmp_path / "none")
