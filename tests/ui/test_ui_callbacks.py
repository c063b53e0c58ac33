"""The UI's actions (`supir_rt.ui.callbacks.RestoreUI`) and knobs as plain functions, over the toy engines
of test_pipeline.py: sizes before running, bad uploads, caption files, prompt warnings, presets, stage 1,
restore with progress, cancel, one job at a time, the PNG's metadata and reproducing from it; and the
``ui`` command's option errors."""

from __future__ import annotations

import dataclasses
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from supir_rt import cli
from supir_rt.api import Restorer
from supir_rt.config import ModelConfig
from supir_rt.images import read_metadata, save_image
from supir_rt.restore_config import RestoreConfig
from supir_rt.ui.callbacks import Cancelled, RestoreUI, UIError
from supir_rt.ui.knobs import config_from_values, knobs_for

from toys import gradient_image, toy_engines

SMALL = {"min_size": 64}  # the server overlay on every preset (as --tiny-random's small sizes)


@pytest.fixture()
def ui(tmp_path):
    engines, _ = toy_engines()
    restorer = Restorer(engines, ModelConfig.tiny(), description={
        "backend": "onnxruntime", "device": "cuda:0", "dtype": "fp16", "model": "official", "supir": "SUPIR-v0Q.ckpt"})
    app = RestoreUI(restorer, tmp_path / "work", defaults=SMALL)
    yield app
    app.close()


def write(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR (8-bit RGB) + IEND, without pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------
# knobs
# --------------------------------------------------------------------------------------------------


def test_every_restore_setting_has_a_knob_with_the_official_name_as_help():
    knobs = {k.name: k for k in knobs_for(RestoreConfig)}
    assert set(knobs) == {f.name for f in dataclasses.fields(RestoreConfig)}
    official = {"num_steps": "--edm_steps", "cfg_scale": "--s_cfg", "control_scale": "--s_stage2",
                "restore_cfg": "--s_stage1", "seed": "--seed", "upscale": "--upscale",
                "color_fix_type": "--color_fix_type", "s_churn": "--s_churn", "s_noise": "--s_noise",
                "min_size": "--min_size", "a_prompt": "--a_prompt", "n_prompt": "--n_prompt"}
    for name, flag in official.items():
        assert knobs[name].help.startswith(flag), knobs[name]
    assert {k.name for k in knobs.values() if k.group == "main"} == {
        "num_steps", "cfg_scale", "control_scale", "restore_cfg", "seed", "upscale", "color_fix_type"}


@dataclass(frozen=True)
class WithNewSettings(RestoreConfig):
    """A RestoreConfig as a later branch may extend it (tiling, a sampler choice)."""

    tiling: Literal["auto", "on", "off"] = "auto"
    tile_margin: int | None = None  # (not tile_size: RestoreConfig has a real one now)
    vae_tile_overlap: float = 0.25
    sampler: str = "edm"
    tile_windows: tuple[int, ...] = ()


def test_new_settings_get_knobs_from_their_types_tiling_in_its_own_group():
    knobs = {k.name: k for k in knobs_for(WithNewSettings)}
    assert knobs["tiling"].kind == "choice" and knobs["tiling"].choices == ("auto", "on", "off")
    assert knobs["tiling"].group == knobs["tile_margin"].group == knobs["vae_tile_overlap"].group == "tiling"
    assert knobs["tile_margin"].kind == "int" and knobs["tile_margin"].optional
    assert knobs["vae_tile_overlap"].kind == "float" and knobs["sampler"].kind == "text"
    assert knobs["sampler"].group == "advanced"
    assert "tile_windows" not in knobs  # a tuple is not editable: the preset's value is kept
    config = config_from_values({"tiling": "on", "tile_margin": None, "vae_tile_overlap": 0.5, "num_steps": 7.0},
                                tuple(knobs.values()), WithNewSettings())
    assert (config.tiling, config.tile_margin, config.vae_tile_overlap, config.num_steps) == ("on", None, 0.5, 7)


def test_bad_knob_values_name_the_knob():
    knobs = knobs_for(RestoreConfig)
    with pytest.raises(ValueError, match=r"^Steps: num_steps=0"):
        config_from_values({"num_steps": 0}, knobs, RestoreConfig())
    with pytest.raises(ValueError, match="Steps: 2.5 is not a whole number"):
        config_from_values({"num_steps": 2.5}, knobs, RestoreConfig())
    with pytest.raises(ValueError, match="Upscale"):
        config_from_values({"upscale": 0}, knobs, RestoreConfig())


def test_presets_set_their_knobs_but_not_the_seed_or_prompts(ui, monkeypatch):
    paper = ui.preset_values("paper")  # the paper: T = 100, constant CFG 7.5, tau_r = 4
    got = (paper["num_steps"], paper["cfg_scale"], paper["use_linear_cfg"], paper["restore_cfg"])
    assert got == (100, 7.5, False, 4.0)
    assert paper["min_size"] == 64  # the server's overlay (--tiny-random's small sizes) stays
    assert not {"seed", "a_prompt", "n_prompt"} & set(paper)
    from supir_rt import restore_config

    monkeypatch.setitem(restore_config.RESTORE_PRESETS, "night", RestoreConfig(num_steps=9))
    assert "night" in ui.presets and ui.preset_values("night")["num_steps"] == 9
    with pytest.raises(UIError, match="unknown preset"):
        ui.preset_values("nope")


# --------------------------------------------------------------------------------------------------
# uploads, sizes, captions, prompts
# --------------------------------------------------------------------------------------------------


def test_sizes_are_shown_before_running(ui, tmp_path):
    photo = write(tmp_path / "p.png", gradient_image(192, 144))
    # short side 144 -> 256: 192 * 256/144 = 341.3 -> 320 after snapping to 64; 256 stays
    assert "Input **192×144**" in ui.describe(photo, {"min_size": 256}) and "processing **320×256**" in \
        ui.describe(photo, {"min_size": 256})
    # upscale 2: 384 x 288, above min size; 288/64 = 4.5 rounds half to even -> 4 -> 256
    text = ui.describe(photo, {"upscale": 2.0, "min_size": 256})
    assert "processing **384×256**" in text and "output **384×288**" in text
    ui.restorer.max_processing_pixels = 10_000
    assert "Too large" in ui.describe(photo, {"min_size": 256})
    assert ui.describe(None, {}) == ""


@pytest.mark.parametrize("case", ["text", "empty", "bomb", "truncated"])
def test_bad_uploads_give_a_message_naming_the_file_not_the_server_path(ui, tmp_path, case):
    path = tmp_path / "upload" / "holiday.png"
    path.parent.mkdir()
    if case == "text":
        path.write_text("not a picture")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "bomb":
        path.write_bytes(png_header(100_000, 100_000))
    else:
        write(path, gradient_image(64, 64))
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UIError) as err:
        ui.describe(path, {})
    message = str(err.value)
    assert "holiday.png" in message and str(path.parent) not in message
    expected = {"text": "not an image", "empty": "not an image", "bomb": "decompression-bomb guard",
                "truncated": "damaged or truncated"}[case]
    assert expected in message
    if case == "bomb":
        assert "100000x100000" in message and "--max-pixels" in message


def test_caption_file_is_read_like_a_sidecar(ui, tmp_path):
    txt = tmp_path / "photo.txt"
    txt.write_text("  a red car\nparked at night  \n", encoding="utf-8")
    assert ui.read_caption_file(txt) == "a red car parked at night"
    txt.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UIError, match="not UTF-8"):
        ui.read_caption_file(txt)
    txt.write_bytes(b"a" * (64 * 1024 + 1))
    with pytest.raises(UIError, match="larger than 64 KB"):
        ui.read_caption_file(txt)


def test_prompt_warnings_when_clip_cuts_the_prompt(ui):
    defaults = RestoreConfig()
    assert ui.prompt_warnings("a red car. ", defaults.a_prompt, defaults.n_prompt, False) == ""
    long_caption = "word " * 60  # 60 tokens + the 53-token default quality prompt > 75
    warning = ui.prompt_warnings(long_caption, defaults.a_prompt, defaults.n_prompt, False)
    assert "Prompt cut" in warning and "quality prompt" in warning and "Quality prompt first" in warning
    assert ui.prompt_warnings(long_caption, defaults.a_prompt, defaults.n_prompt, True) == ""
    assert "Negative prompt cut" in ui.prompt_warnings("", defaults.a_prompt, "blurry, " * 40, False)


def test_footer_names_device_backend_and_model(ui):
    footer = ui.footer()
    for part in ("cuda:0", "onnxruntime", "fp16", "official", "SUPIR-v0Q.ckpt"):
        assert part in footer


# --------------------------------------------------------------------------------------------------
# model jobs
# --------------------------------------------------------------------------------------------------


def test_stage1_image_is_the_dr_encoder_then_the_decoder(ui, tmp_path):
    """Toy engines: DR encoder = 0.5 x 8x8 average pool, decoder = tanh(2 x latent) upsampled x8. At a size
    that needs no resizing the stage-1 image is tanh(pool(x)) per 8x8 block, in [-1, 1] -> uint8 (truncated)."""
    photo = write(tmp_path / "p.png", gradient_image(128, 64))
    got = np.asarray(ui.stage1(photo, {}), dtype=np.int32)
    x = np.asarray(gradient_image(128, 64), dtype=np.float64) / 255 * 2 - 1  # (64, 128, 3)
    pooled = x.reshape(8, 8, 16, 8, 3).mean(axis=(1, 3))
    expected = np.clip(np.tanh(pooled).repeat(8, 0).repeat(8, 1) * 127.5 + 127.5, 0, 255).astype(np.int32)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1  # fp32 vs fp64 at truncation


def test_restore_reports_progress_and_writes_a_png_with_its_settings(ui, tmp_path):
    photo = write(tmp_path / "street.png", gradient_image(100, 70))
    seen: list[tuple[float, str]] = []
    values = {"num_steps": 3, "seed": 5, "cfg_scale": 6.5, "upscale": 1.5, "color_fix_type": "adain"}
    out = ui.restore(photo, "a quiet street", values, report=lambda f, t: seen.append((f, t)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] >= 0.95
    assert any("step 1/3" in t for _, t in seen) and any("decoding" in t for _, t in seen)
    assert out.after.size == out.before.size == (150, 105)  # round(1.5 x 100), round(1.5 x 70)
    assert out.png.parent.parent == ui.outputs and out.png.name == "street_restored.png"
    with Image.open(out.png) as img:
        assert img.size == (150, 105)
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(out.after))
    meta = read_metadata(out.png)
    assert meta["source"] == "street.png" and meta["caption"] == "a quiet street"
    settings = meta["settings"]
    assert (settings["num_steps"], settings["seed"], settings["cfg_scale"], settings["upscale"],
            settings["color_fix_type"], settings["min_size"]) == (3, 5, 6.5, 1.5, "adain", 64)
    assert "seed 5" in out.status and "150×105" in out.status


def test_reproduce_reads_the_settings_back_and_gives_the_same_image(ui, tmp_path):
    photo = write(tmp_path / "street.png", gradient_image(96, 64))
    values = {"num_steps": 2, "seed": 11, "control_scale": 0.8, "restore_cfg": 3.0, "use_linear_cfg": False}
    first = ui.restore(photo, "a street", values)
    got = ui.reproduce(first.png)
    for name, value in values.items():
        assert got.values[name] == value
    assert got.caption == "a street" and "street.png" in got.status and "seed 11" in got.status
    again = ui.restore(photo, got.caption, got.values)
    assert np.array_equal(np.asarray(again.after), np.asarray(first.after))


def test_reproduce_refuses_files_without_settings(ui, tmp_path):
    plain = write(tmp_path / "plain.png", gradient_image(32, 32))
    with pytest.raises(UIError, match="no supir-rt settings"):
        ui.reproduce(plain)
    junk = tmp_path / "junk.png"
    junk.write_text("hello")
    with pytest.raises(UIError, match="not an image with supir-rt settings"):
        ui.reproduce(junk)
    newer = tmp_path / "newer.png"
    save_image(newer, np.zeros((8, 8, 3), np.uint8), metadata={
        "settings": {"num_steps": 4, "warp_drive": 9}, "runtime": {"model": "tiny-random"}, "caption": "x"})
    got = ui.reproduce(newer)
    assert got.values["num_steps"] == 4 and "warp_drive" in got.status and "tiny-random" in got.status
    bad = tmp_path / "bad.png"
    save_image(bad, np.zeros((8, 8, 3), np.uint8), metadata={"settings": {"num_steps": 0}})
    with pytest.raises(UIError, match="not valid"):
        ui.reproduce(bad)


def test_restore_needs_a_photo_and_valid_settings(ui, tmp_path):
    with pytest.raises(UIError, match="Upload a photo first"):
        ui.restore(None, "", {})
    photo = write(tmp_path / "p.png", gradient_image(64, 64))
    with pytest.raises(UIError, match="Invalid setting: Steps"):
        ui.restore(photo, "", {"num_steps": 0})
    with pytest.raises(UIError, match="noise_device"):
        ui.restore(photo, "", {"noise_device": "quantum"})
    assert not ui.outputs.exists() or not any(ui.outputs.rglob("*.png"))


def test_cancel_stops_the_job_at_the_next_step_and_writes_nothing(ui, tmp_path):
    photo = write(tmp_path / "p.png", gradient_image(64, 64))
    steps: list[str] = []

    def report(fraction: float, text: str) -> None:
        if "step" in text:
            steps.append(text)
        if "step 1/" in text:
            assert "Cancelled" in ui.cancel("alice", 0)

    with pytest.raises(Cancelled):
        ui.restore(photo, "", {"num_steps": 4}, session="alice", ticket=0, report=report)
    assert steps == ["sampling: step 1/4"]  # the step after the cancel did not report: it never ran
    assert not ui.outputs.exists() or not any(ui.outputs.rglob("*.png"))
    # a job submitted after the cancel (the page sends the next ticket) runs; the lock was released
    assert ui.restore(photo, "", {"num_steps": 1}, session="alice", ticket=1).png.is_file()


def test_a_waiting_job_cancelled_before_its_turn_never_starts(ui, tmp_path):
    photo = write(tmp_path / "p.png", gradient_image(64, 64))
    calls = []
    inner = ui.restorer.restore
    ui.restorer.restore = lambda *a, **k: calls.append(1) or inner(*a, **k)
    ui.cancel("bob", 2)
    with pytest.raises(Cancelled):
        ui.restore(photo, "", {"num_steps": 1}, session="bob", ticket=2)
    assert calls == []
    assert ui.restore(photo, "", {"num_steps": 1}, session="carol", ticket=0).png.is_file()  # other sessions run
    assert calls == [1]


def test_jobs_take_turns(ui, tmp_path):
    photo = write(tmp_path / "p.png", gradient_image(64, 64))
    active, most, lock = [0], [0], threading.Lock()
    inner = ui.restorer.restore

    def counted(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    ui.restorer.restore = counted
    errors: list[BaseException] = []

    def job(seed: int) -> None:
        try:
            ui.restore(photo, "", {"num_steps": 2, "seed": seed}, session=f"user{seed}")
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=job, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and most[0] == 1 and len(list(ui.outputs.rglob("*.png"))) == 3


def test_old_outputs_are_removed_on_a_long_running_server(ui, tmp_path):
    ui.keep_outputs = 2
    photo = write(tmp_path / "p.png", gradient_image(64, 64))
    pngs = [ui.restore(photo, "", {"num_steps": 1, "seed": s}).png for s in range(3)]
    assert [p.is_file() for p in pngs] == [False, True, True]
    ui.close()
    assert not ui.outputs.exists()


def test_llava_button_without_a_captioner_says_how_to_get_one(ui, tmp_path):
    photo = write(tmp_path / "p.png", gradient_image(64, 64))
    with pytest.raises(UIError, match="--captioner llava"):
        ui.caption(photo, {})

    class Echo:
        needs_image = True

        def caption(self, image, source=None):
            return f"an image of {image.size[0]}x{image.size[1]}"

    ui.restorer.captioner = Echo()
    # the captioner sees the stage-1 image at short side 512 (64 x 64 -> 512 x 512)
    assert ui.caption(photo, {}) == "an image of 512x512"


# --------------------------------------------------------------------------------------------------
# the page and the command
# --------------------------------------------------------------------------------------------------


def test_page_has_a_control_per_knob_and_errors_never_show_a_traceback(ui, caplog):
    gr = pytest.importorskip("gradio")
    from supir_rt.ui import layout
    from supir_rt.ui.layout import build_app, guarded, upload_path

    app = build_app(ui)
    # Gradio writes a .pyi stub beside any module that defines a component class: the page defines none
    assert list(Path(layout.__file__).parent.glob("*.pyi")) == []
    assert upload_path({"path": "/up/x.png", "orig_name": "x.png"}) == "/up/x.png" and upload_path(None) is None
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {f"knob-{k.name}" for k in ui.knobs} <= ids
    assert {"photo", "run-btn", "cancel-btn", "stage1-btn", "compare", "download", "reproduce", "footer"} <= ids
    assert isinstance(app, gr.Blocks)
    assert {"group-tiling", "knob-tiling", "knob-tile_size", "knob-vae_tiling"} <= ids  # RestoreConfig has tiling now

    extended = RestoreUI(ui.restorer, ui.workdir, config_type=WithNewSettings)
    ids = {getattr(b, "elem_id", None) for b in build_app(extended).blocks.values()}
    assert {"group-tiling", "knob-tiling", "knob-tile_size", "knob-vae_tile_overlap", "knob-sampler"} <= ids

    def fails_for_the_user():
        raise UIError("Upload a photo first")

    def has_a_bug():
        raise KeyError("oops")

    from supir_rt.ui.layout import knob_update

    cfg = next(k for k in ui.knobs if k.name == "cfg_scale")
    assert knob_update(cfg, 25.0)["maximum"] == 25.0  # a PNG made with CFG 25 still fits the slider
    assert knob_update(cfg, 5.0)["maximum"] == cfg.maximum
    assert guarded(fails_for_the_user, lambda m: m)() == "Upload a photo first"
    assert guarded(has_a_bug, lambda m: m)() == "internal error; the server log has the details"
    assert "KeyError" in caplog.text  # the details are in the server's log


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port 70000"),
    (["--queue-size", "0"], "--queue-size 0"),
    (["--captioner", "llava"], "--llava-dir"),
])
def test_ui_command_option_errors_are_one_line_and_leave_no_files(tmp_path, monkeypatch, capsys, argv, message):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = cli.main(["ui", "--tiny-random", "-q", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] and tempfile.tempdir == str(tmp_path)


def test_busy_port_is_refused_before_the_model_loads(capsys):
    import socket

    pytest.importorskip("gradio")  # without it the command says so first

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["ui", "--tiny-random", "-q", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "NOT a restoration" not in err  # refused before anything else happened


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_page_actions_on_a_gpu(tmp_path):
    """GPU check: the tiny random model on CUDA through the page's actions (stage 1 moves its input to the
    engines' device). Run: python -m pytest -q tests/ui/test_ui_callbacks.py -k gpu"""
    restorer = Restorer.tiny_random(device="cuda", dtype="fp32")
    ui = RestoreUI(restorer, tmp_path / "work", defaults={"min_size": 256})
    photo = write(tmp_path / "p.png", gradient_image(96, 64))
    assert ui.stage1(photo, {}).size == (96, 64)
    out = ui.restore(photo, "", {"num_steps": 2, "seed": 3})
    assert out.after.size == (96, 64) and read_metadata(out.png)["runtime"]["device"].startswith("cuda")
    restorer.close()
