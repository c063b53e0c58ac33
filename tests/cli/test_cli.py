"""`supir-rt restore` and the `Restorer` API end to end: sizes, alpha/grayscale/EXIF, folder batches,
weights lookup, and every bad input giving one ``error:`` line, exit code 2 and no partial file.

Most runs use a `Restorer` over the toy engines of test_pipeline.py (patched into the CLI); one test runs
``--tiny-random`` for real.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supir_rt import cli
from supir_rt.api import Restorer, SetupError
from supir_rt.config import ModelConfig
from supir_rt.images import read_metadata
from supir_rt.restore_config import RestoreConfig

from toys import gradient_image, toy_engines


@pytest.fixture()
def toy_cli(monkeypatch):
    """The CLI with its Restorer built over toy engines (weights lookup bypassed)."""
    built = []

    def build(args, file_cfg):
        engines, calls = toy_engines()
        restorer = Restorer(engines, ModelConfig.tiny(), progress=not args.quiet,
                            captioner=cli.make_captioner_from_args(args),
                            **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
        built.append(calls)
        return restorer

    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", build)
    return built


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------
# end to end (toy engines)
# --------------------------------------------------------------------------------------------------


def test_settings_flags_reach_the_config():
    parser = cli.build_parser()
    args = parser.parse_args([
        "restore", "x.png", "--preset", "quality", "--steps", "7", "--cfg", "5", "--cfg-start", "2",
        "--control-scale", "0.9", "--control-scale-start", "0.1", "--linear-control-scale", "--restore-cfg", "4",
        "--s-churn", "3", "--s-noise", "1.02", "--seed", "9", "--upscale", "2", "--min-size", "512",
        "--color-fix", "AdaIn", "--prompt", "sharp.", "--negative-prompt", "blurry", "--no-linear-cfg",
    ])
    c = cli.restore_config_from_args(args)
    assert c == RestoreConfig(
        num_steps=7, cfg_scale=5.0, cfg_scale_start=2.0, use_linear_cfg=False, control_scale=0.9,
        control_scale_start=0.1, use_linear_control_scale=True, restore_cfg=4.0, s_churn=3.0, s_noise=1.02,
        seed=9, upscale=2.0, min_size=512, color_fix_type="adain", a_prompt="sharp.", n_prompt="blurry",
    )
    quality = cli.restore_config_from_args(parser.parse_args(["restore", "x.png", "--preset", "quality"]))
    assert quality.control_scale == 0.93


def test_folder_batch_with_alpha_grayscale_exif_and_bad_files(tmp_path, toy_cli, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgba = np.dstack([np.asarray(gradient_image(40, 30)), np.full((30, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    gradient_image(40, 30, "L").save(src / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    gradient_image(40, 20).save(src / "rotated.jpg", exif=exif.tobytes())
    (src / "notes.png").write_text("not an image")
    good = src / "cut.png"
    gradient_image(64, 64).save(good)
    good.write_bytes(good.read_bytes()[:60])
    (src / "readme.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    code, _, err = run(["restore", src, "-o", out, "--steps", 1, "--min-size", 64, "-q"], capsys)
    assert code == 2
    assert "notes.png: not an image" in err and "cut.png" in err and "2 of 5 images failed" in err
    assert "Traceback" not in err
    assert only_files(out) == ["alpha.png", "gray.png", "rotated.png"]  # nothing for the bad files, no temp files
    with Image.open(out / "alpha.png") as img:
        assert img.mode == "RGBA" and img.size == (40, 30) and img.getpixel((5, 5))[3] == 128
    with Image.open(out / "gray.png") as img:
        assert img.mode == "RGB" and img.size == (40, 30)
    with Image.open(out / "rotated.png") as img:
        assert img.size == (20, 40)


def test_same_seed_twice_identical_different_seed_different(tmp_path, toy_cli, capsys):
    src = tmp_path / "in.png"
    gradient_image(48, 40).save(src)
    for name, seed in (("a.png", 5), ("b.png", 5), ("c.png", 6)):
        assert run(["restore", src, "-o", tmp_path / name, "--steps", 2, "--min-size", 64, "--seed", seed, "-q"],
                   capsys)[0] == 0
    a, b, c = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "c.png"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_metadata_reproduces_the_result(tmp_path, toy_cli, capsys):
    src = tmp_path / "in.png"
    gradient_image(48, 40).save(src)
    assert run(["restore", src, "-o", tmp_path / "a.png", "--steps", 2, "--min-size", 64, "--seed", -1, "-q"],
               capsys)[0] == 0
    settings = read_metadata(tmp_path / "a.png")["settings"]
    assert 0 <= settings["seed"] <= 65535
    engines, _ = toy_engines()
    again = Restorer(engines, ModelConfig.tiny()).restore(src, RestoreConfig(**settings))
    assert np.array_equal(np.asarray(again.image), np.asarray(Image.open(tmp_path / "a.png")))


@pytest.mark.parametrize("case", ["output_is_input", "missing_folder", "parent_is_file", "file_for_batch",
                                  "bad_extension", "existing_output", "collision", "missing_input",
                                  "empty_folder", "huge", "bad_steps", "too_small"])
def test_bad_inputs_give_one_clear_error(tmp_path, toy_cli, capsys, case):
    src = tmp_path / "in.png"
    gradient_image(40, 30).save(src)
    other = tmp_path / "sub"
    other.mkdir()
    gradient_image(40, 30).save(other / "in.png")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    bomb = tmp_path / "bomb.png"
    from test_images import _png

    bomb.write_bytes(_png(50_000, 50_000, 8, 2, zlib.compress(b"\x00")))
    (tmp_path / "exists.png").write_bytes(b"old")
    argv, expect = {
        "output_is_input": ([src, "-o", src], "refusing to overwrite an input"),
        "missing_folder": ([src, "-o", tmp_path / "nope" / "out.png"], "does not exist"),
        "parent_is_file": ([src, "-o", tmp_path / "file" / "out.png"], "not a folder"),
        "file_for_batch": ([src, other / "in.png", "-o", tmp_path / "o.png"], "is a file name but there are 2 inputs"),
        "bad_extension": ([src, "-o", tmp_path / "out.xyz"], "unknown image extension"),
        "existing_output": ([src, "-o", tmp_path / "exists.png"], "--overwrite"),
        "collision": ([src, other / "in.png", "-o", tmp_path / "outdir"], "would both be written"),
        "missing_input": ([tmp_path / "nope.png"], "no such file"),
        "empty_folder": ([tmp_path / "empty"], "contains no image files"),
        "huge": ([bomb, "-o", tmp_path / "b.png"], "--max-pixels"),
        "bad_steps": ([src, "-o", tmp_path / "s.png", "--steps", 0], "--steps 0"),
        "too_small": ([src, "-o", tmp_path / "s.png", "--min-size", 0, "--upscale", 0.5], "--min-size"),
    }[case]
    before = only_files(tmp_path)
    code, _, err = run(["restore", *argv, "-q"], capsys)
    assert code == 2
    assert err.startswith("error: ") and expect in err, err
    assert "Traceback" not in err
    assert only_files(tmp_path) == before
    assert (tmp_path / "exists.png").read_bytes() == b"old"


def test_non_finite_output_is_not_saved(tmp_path, monkeypatch, capsys):
    def build(args, file_cfg):
        return Restorer(toy_engines(nan=True)[0], ModelConfig.tiny())

    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", build)
    src = tmp_path / "in.png"
    gradient_image(40, 30).save(src)
    code, _, err = run(["restore", src, "-o", tmp_path / "out.png", "--steps", 1, "--min-size", 64, "-q"], capsys)
    assert code == 2 and "--dtype fp32" in err
    assert not (tmp_path / "out.png").exists()


def test_caption_flag_and_sidecar(tmp_path, toy_cli, capsys):
    src = tmp_path / "in.png"
    gradient_image(40, 30).save(src)
    (tmp_path / "in.txt").write_text("a sidecar caption.\n")
    run(["restore", src, "-o", tmp_path / "a.png", "--steps", 1, "--min-size", 64, "--caption", "a cat.", "-q"], capsys)
    assert read_metadata(tmp_path / "a.png")["caption"] == "a cat."
    run(["restore", src, "-o", tmp_path / "b.png", "--steps", 1, "--min-size", 64, "--captioner", "sidecar", "-q"], capsys)
    meta = read_metadata(tmp_path / "b.png")
    assert meta["caption"] == "a sidecar caption." and meta["prompt"].startswith("a sidecar caption.Cinematic")


# --------------------------------------------------------------------------------------------------
# the API
# --------------------------------------------------------------------------------------------------


def test_restorer_loads_once_and_restores_many(tmp_path):
    engines, calls = toy_engines()
    with Restorer(engines, ModelConfig.tiny()) as restorer:
        cfg = RestoreConfig(num_steps=1, min_size=64)
        rgba = Image.fromarray(np.dstack([np.asarray(gradient_image(30, 20)), np.full((20, 30), 9, np.uint8)]), "RGBA")
        first = restorer.restore(rgba, cfg)
        assert first.image.mode == "RGBA" and first.image.size == (30, 20)
        src = tmp_path / "x.jpg"
        gradient_image(300, 400).save(src)
        second = restorer.restore_file(src, tmp_path / "x.png", RestoreConfig(num_steps=1))
        assert second.image.size == (300, 400) and second.result.sizes.processing == (1024, 1344)
    assert calls["text_encoders"] == 2  # both prompts encoded once for both images
    assert all(e.closed for e in engines.values())


def test_restorer_rejects_a_too_large_processing_size():
    engines, _ = toy_engines()
    restorer = Restorer(engines, ModelConfig.tiny(), max_processing_pixels=1024 * 1024)
    with pytest.raises(Exception, match="lower --upscale"):
        restorer.restore(gradient_image(600, 600), RestoreConfig(upscale=4))


# --------------------------------------------------------------------------------------------------
# weights lookup and setup errors
# --------------------------------------------------------------------------------------------------


def lookup_args(**kw) -> argparse.Namespace:
    base = {"sdxl": None, "supir": None, "supir_variant": None, "weights_dir": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_missing_weights_say_which_files_and_where(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in (cli.ENV_SDXL, cli.ENV_SUPIR, cli.ENV_WEIGHTS_DIR, cli.ENV_CONFIG):
        monkeypatch.delenv(var, raising=False)
    src = tmp_path / "in.png"
    gradient_image(40, 30).save(src)
    code, _, err = run(["restore", src, "-o", tmp_path / "out.png", "-q"], capsys)
    assert code == 2
    assert "sd_xl_base_1.0_0.9vae.safetensors" in err and "SUPIR-v0Q.ckpt" in err
    assert str(tmp_path / "cache" / "supir-rt" / "weights") in err and "--tiny-random" in err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


def test_weights_lookup_order(tmp_path, monkeypatch):
    for name in ("flag.safetensors", "env.safetensors", "file.safetensors", "SUPIR-v0F.ckpt",
                 "sd_xl_base_1.0_0.9vae.safetensors", "supir.ckpt"):
        (tmp_path / name).write_bytes(b"")
    env = {cli.ENV_SDXL: str(tmp_path / "env.safetensors")}
    file_cfg = {"weights": {"sdxl": str(tmp_path / "file.safetensors"), "dir": str(tmp_path)}}
    flag = cli.find_weights(lookup_args(sdxl=tmp_path / "flag.safetensors", supir=tmp_path / "supir.ckpt"), file_cfg, env)
    assert flag.sdxl.name == "flag.safetensors"
    from_env = cli.find_weights(lookup_args(supir=tmp_path / "supir.ckpt"), file_cfg, env)
    assert from_env.sdxl.name == "env.safetensors"
    from_file = cli.find_weights(lookup_args(supir_variant="F"), file_cfg, {})
    assert from_file.sdxl.name == "file.safetensors" and from_file.supir.name == "SUPIR-v0F.ckpt"
    from_dir = cli.find_weights(lookup_args(supir_variant="F"), {}, {cli.ENV_WEIGHTS_DIR: str(tmp_path)})
    assert from_dir.sdxl.name == "sd_xl_base_1.0_0.9vae.safetensors"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file(tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    if suffix == ".toml":
        path.write_text('[weights]\ndir = "/w"\nvariant = "F"\n[runtime]\ndtype = "bf16"\n')
    else:
        path.write_text("weights:\n  dir: /w\n  variant: F\nruntime:\n  dtype: bf16\n")
    doc = cli.read_config_file(path, {})
    assert doc["weights"] == {"dir": "/w", "variant": "F"} and doc["runtime"] == {"dtype": "bf16"}
    path.write_text("[weights]\nsdxel = 'typo'\n" if suffix == ".toml" else "weights: {sdxel: typo}\n")
    with pytest.raises(SetupError, match="sdxel"):
        cli.read_config_file(path, {})
    with pytest.raises(SetupError, match="not found"):
        cli.read_config_file(tmp_path / "none.toml", {})
    assert cli.read_config_file(None, {"XDG_CONFIG_HOME": str(tmp_path / "nothing")}) == {}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "in.png"
    gradient_image(40, 30).save(src)
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--tiny-random", "--device", "cuda", "-q"], capsys)
    assert code == 2 and "no CUDA GPU" in err and "--device cpu" in err


def test_missing_engines_dir_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "in.png"
    gradient_image(40, 30).save(src)
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--backend", "onnxruntime",
                        "--engines-dir", tmp_path / "engines", "-q"], capsys)
    assert code == 2 and "engines folder" in err and "does not exist" in err


def test_version_and_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and "supir-rt" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["restore", "x.png", "--color-fix", "sepia"])
    assert exit_.value.code == 2 and "Wavelet, AdaIn, None" in capsys.readouterr().err
    help_text = cli.build_parser().format_help()
    assert "restore" in help_text and "caption" in help_text


# --------------------------------------------------------------------------------------------------
# the real tiny random model through the CLI
# --------------------------------------------------------------------------------------------------


def test_from_weights_loads_checkpoints_and_runs_mixed_precision(tmp_path):
    """The torch path of `Restorer.from_weights`: meta build, diffusion networks in bf16, VAE/text in fp32,
    strict loading from an SDXL-like and a SUPIR-like file (the tiny model's tensors split in two)."""
    import torch
    from safetensors.torch import save_file

    from supir_rt.model.supir import build_model

    torch.manual_seed(0)
    state = build_model(ModelConfig.tiny()).state_dict()
    supir = {k: v.contiguous() for k, v in state.items() if k.startswith("model.control_model.")}
    sdxl = {k: v.contiguous() for k, v in state.items() if k not in supir}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    save_file(supir, tmp_path / "supir.safetensors")
    with Restorer.from_weights(tmp_path / "sdxl.safetensors", tmp_path / "supir.safetensors",
                               config=ModelConfig.tiny(), dtype="bf16") as restorer:
        assert restorer.engines["unet_adaptor"].dtype == torch.bfloat16
        assert restorer.engines["vae_decoder"].dtype == torch.float32
        out = restorer.restore(gradient_image(40, 30), RestoreConfig(num_steps=1, min_size=64))
    assert out.image.size == (40, 30)
    assert out.metadata["runtime"]["sdxl"] == "sdxl.safetensors"
