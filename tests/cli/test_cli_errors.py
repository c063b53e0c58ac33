"""What a new user trips over on the command line: every bad option or setup gives one ``error:`` line
naming the flag as typed and exit code 2; a bug is not turned into such a line; ``-q`` means quiet;
typos show the sub-command's usage; ``--help`` has examples.

Engine folders that need real exported engines are in tests/backends/test_engine_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supir_rt import cli
from supir_rt.backends import available_backends
from supir_rt.backends.manifest import Manifest, config_fingerprint, onnx_name, spec_to_json
from supir_rt.backends.specs import NETWORKS, network_specs
from supir_rt.config import ModelConfig
from supir_rt.errors import SettingError, UserError
from supir_rt.restore_config import RestoreConfig

from toys import toy_engines


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def src(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8), "RGB").save(path)
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------- flags, not fields

@pytest.mark.parametrize("flags, expect", [
    (["--steps", "0"], "error: --steps 0: use an integer number of steps in 1..1000"),
    (["--upscale", "-1"], "error: --upscale -1.0: must be > 0"),
    (["--s-noise", "-0.5"], "error: --s-noise -0.5: must be >= 0"),
    (["--seed", "-7"], "error: --seed -7: use a non-negative integer"),
    (["--noise-device", "nonsense"], "error: --noise-device 'nonsense': not a device name"),
])
def test_bad_settings_name_the_flag_the_user_typed(tmp_path, src, capsys, flags, expect, monkeypatch):
    from supir_rt.api import Restorer

    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", lambda args, cfg: Restorer(toy_engines()[0], ModelConfig.tiny()))
    code, _, err = run(["restore", src, "-o", tmp_path / "out.png", "--min-size", "64", "-q", *flags], capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(expect), line
    assert "num_steps" not in line and "noise_device" not in line
    assert not (tmp_path / "out.png").exists()


def test_every_setting_flag_exists_and_sets_its_field():
    """The one field -> flag table matches the parser: each flag's dest is the field it names."""
    parser = cli.build_parser()
    restore = next(a for a in parser._actions if a.dest == "command").choices["restore"]
    dest_of = {opt: a.dest for a in restore._actions for opt in a.option_strings}
    fields = set(RestoreConfig.__dataclass_fields__)
    for field, flag in cli.SETTING_FLAGS.items():
        assert dest_of[flag] == field
        assert field in fields or field == "preset"
    assert fields - set(cli.SETTING_FLAGS) == {"restore_cfg_s_tmin"}  # the one setting without a flag


def test_python_api_names_the_field():
    with pytest.raises(SettingError, match=r"^num_steps=0: ") as err:
        RestoreConfig(num_steps=0)
    assert err.value.for_flags(cli.SETTING_FLAGS).startswith("--steps 0: ")


def test_a_bug_is_a_traceback_not_a_one_line_error(tmp_path, src, monkeypatch, capsys):
    def broken(args, file_cfg):
        raise ValueError("internal invariant broken")  # a bug, not a UserError

    monkeypatch.setattr("supir_rt.cli.restore.build_restorer", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["restore", str(src), "-o", str(tmp_path / "o.png"), "-q"])
    assert not issubclass(ValueError, UserError)


# ---------------------------------------------------------------------------- backends and captioners

@pytest.mark.skipif(available_backends().get("tensorrt") is None, reason="TensorRT is usable here")
def test_tiny_random_with_an_absent_tensorrt(tmp_path, src, capsys):
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--tiny-random", "--backend", "tensorrt", "-q"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("error: --backend tensorrt is not available here") and "usable here: torch" in line


def test_garbage_engines_folder(tmp_path, src, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.onnx").write_bytes(b"\x00junk")
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--backend", "onnxruntime", "--engines-dir", garbage,
                        "-q"], capsys)
    assert code == 2
    assert one_error_line(err).startswith(f"error: --engines-dir {garbage}: ")
    assert sorted(p.name for p in garbage.iterdir()) == ["model.onnx"]


def _fake_tiny_folder(folder: Path) -> None:
    """Files whose manifests say "tiny model" (the check refuses them before any session is created)."""
    config = ModelConfig.tiny()
    specs = network_specs(config)
    folder.mkdir()
    for name in NETWORKS:
        (folder / onnx_name(name, "fp32")).write_bytes(b"onnx")
        Manifest(network=name, kind="onnx", precision="fp32", config_name="tiny",
                 config_fingerprint=config_fingerprint(config), spec=spec_to_json(specs[name]), files={},
                 weights_sha256="0", source={}, tools={}, build={}).write(folder / f"{name}_fp32.json")


@pytest.mark.parametrize("backend", [[], ["--backend", "onnxruntime"]])
def test_tiny_engines_without_tiny_random_say_tiny_random(tmp_path, src, capsys, backend):
    folder = tmp_path / "tiny-engines"
    _fake_tiny_folder(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--engines-dir", folder, *backend, "-q"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "--tiny-random" in line and "build_engines.py" not in line  # never "rebuild over this folder"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_tiny_random_refuses_to_overwrite_engines_of_another_model(tmp_path, src, capsys):
    folder = tmp_path / "official-engines"
    folder.mkdir()
    (folder / "dr_encoder_fp32.json").write_text(json.dumps({"config_name": "official"}))
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--tiny-random", "--engines-dir", folder, "-q"], capsys)
    assert code == 2
    assert "would overwrite them" in one_error_line(err)
    assert [p.name for p in folder.iterdir()] == ["dr_encoder_fp32.json"]


def test_engines_with_a_dtype_they_cannot_have(tmp_path, src, capsys):
    folder = tmp_path / "tiny-engines"
    _fake_tiny_folder(folder)
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--tiny-random", "--engines-dir", folder,
                        "--dtype", "bf16", "-q"], capsys)
    assert code == 2 and one_error_line(err).startswith("error: --dtype bf16: exported engines are built as fp32 or fp16")


def test_llava_captioner_names_the_restore_flag(tmp_path, src, capsys, monkeypatch):
    monkeypatch.delenv("SUPIR_RT_LLAVA_DIR", raising=False)
    code, _, err = run(["restore", src, "-o", tmp_path / "o.png", "--captioner", "llava", "--tiny-random", "-q"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "--llava-dir" in line and "--model-dir" not in line


# ---------------------------------------------------------------------------- quiet, usage, help

def test_quiet_silences_the_tiny_random_note(tmp_path, src, capsys):
    code, out, err = run(["restore", src, "-o", tmp_path / "o.png", "--tiny-random", "--steps", 1, "--min-size", 64,
                          "-q"], capsys)
    assert code == 0 and err == "" and out == ""


def test_typo_shows_the_subcommand_usage(tmp_path, src, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["restore", str(src), "--stesp", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "usage: supir-rt restore" in err and "supir-rt restore: error: unrecognized arguments: --stesp 3" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["restore", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "supir-rt restore photo.jpg -o photo_restored.png" in out
    assert "--preset lightning" in out and "--sampler" in out
