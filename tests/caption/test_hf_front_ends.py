"""``--captioner hf --caption-model DIR`` through the runtime options (`supir_rt.runtime.open_captioner`):
the serve worker and the UI build their restorer with a tiny transformers captioner and caption with it.
The expected caption is `HfCaptioner`'s own on the 512-short-side stage-1 image, opened separately."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
sys.path.insert(0, str(Path(__file__).parent))
import tiny_vlm  # noqa: E402
from PIL import Image  # noqa: E402

from supir_rt.caption.hf import HfCaptioner  # noqa: E402
from supir_rt.restore_config import RestoreConfig  # noqa: E402

SETTINGS = RestoreConfig(num_steps=1, min_size=64, tiling="off")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.build_llava(tmp_path_factory.mktemp("llava"))


def picture() -> Image.Image:
    return Image.new("RGB", (64, 48), (120, 80, 40))


def expected_caption(restorer, folder: Path) -> str:
    from supir_rt.stages import caption_image

    with __import__("torch").no_grad():
        shown = caption_image(restorer.engines, picture(), SETTINGS.upscale, SETTINGS.min_size)
    return HfCaptioner(folder, device="cpu").caption(shown)


def test_serve_worker_restores_with_the_hf_captioner(folder: Path) -> None:
    from supir_rt.images import read_metadata
    from supir_rt.serve import Job, RestoreWorker, RuntimeOptions, decode_image
    from supir_rt.serve.cli import _runtime

    from supir_rt.cli import build_parser

    args = build_parser().parse_args(["serve", "--tiny-random", "--device", "cpu", "--captioner", "hf",
                                      "--caption-model", str(folder)])
    runtime = _runtime(args)
    assert runtime["captioner"] == "hf" and runtime["caption_model"] == str(folder.resolve())
    worker = RestoreWorker(RuntimeOptions(**runtime))
    try:
        assert isinstance(worker.restorer.captioner, HfCaptioner)
        buffer = io.BytesIO()
        picture().save(buffer, format="PNG")
        [outcome] = worker.run([Job(decode_image(buffer.getvalue()), SETTINGS)])
        assert outcome.error is None, outcome.error
        caption = expected_caption(worker.restorer, folder)
        assert caption and outcome.metadata["caption"] == caption
        assert read_metadata(io.BytesIO(outcome.png))["caption"] == caption
    finally:
        worker.restorer.close()


def test_ui_captions_and_restores_with_the_hf_captioner(folder: Path, tmp_path: Path) -> None:
    from supir_rt.cli import build_parser
    from supir_rt.runtime import build_restorer, options_from_args
    from supir_rt.ui.callbacks import RestoreUI

    args = build_parser().parse_args(["ui", "--tiny-random", "--device", "cpu", "--captioner", "hf",
                                      "--caption-model", str(folder)])
    restorer = build_restorer(options_from_args(args, {}), progress=False)
    try:
        overlay = {k: v for k, v in SETTINGS.as_dict().items() if v != getattr(RestoreConfig(), k)}
        ui = RestoreUI(restorer, tmp_path / "work", defaults=overlay)
        assert ui.has_captioner
        src = tmp_path / "in.png"
        picture().save(src)
        caption = ui.caption(str(src), ui.initial_values())
        assert caption and caption == expected_caption(restorer, folder)
        out = ui.restore(str(src), caption, ui.initial_values())
        assert out.after.size == picture().size
    finally:
        restorer.close()


def test_hf_without_a_model_folder_is_one_clear_error() -> None:
    from supir_rt.errors import SetupError
    from supir_rt.runtime import RuntimeOptions, build_restorer

    with pytest.raises(SetupError, match="--captioner hf needs --caption-model DIR"):
        build_restorer(RuntimeOptions(tiny_random=True, device="cpu", captioner="hf"))
