"""`supir-rt serve`: the generated Ray Serve config file and flag errors (the command itself runs in
test_ray_serve.py)."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("ray")

from supir_rt.cli import main  # noqa: E402


def test_print_config_is_a_valid_ray_serve_config(capsys):
    from ray.serve.schema import ServeDeploySchema

    from supir_rt.serve.app_config import AppConfig

    assert main(["serve", "--tiny-random", "--print-config", "--autoscale", "1:6", "--max-batch-size", "2"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "supir_rt.serve.ray_app:build_app" and app.route_prefix == "/"
    config = AppConfig.from_args(app.args)  # the builder accepts its own args
    assert (config.min_replicas, config.max_replicas, config.gpus_per_replica, config.max_batch_size) == (1, 6, 1.0, 2)
    assert doc["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("argv, words", [
    (["--autoscale", "3"], "--autoscale"),
    (["--max-batch-size", "8", "--max-ongoing-requests", "4"], "max_ongoing_requests"),
    (["--replicas", "0"], "replicas"),
    (["--address", "auto", "--metrics-export-port", "8080"], "--metrics-export-port"),
    (["--tile-workers-above", "4000000"], "--tile-workers-above is for --tile-workers N"),
    (["--tile-workers", "2", "--tile-workers-above", "-1"], "--tile-workers-above -1"),
    (["--tile-workers", "2", "--ray-address", "auto"], "--ray-address auto: a replica's tile workers"),
])
def test_bad_flags_are_one_error_line(argv, words, capsys):
    assert main(["serve", "--tiny-random", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_print_config_carries_the_tile_worker_settings(capsys):
    from supir_rt.serve.app_config import AppConfig

    assert main(["serve", "--tiny-random", "--print-config", "--tile-workers", "2", "--tile-workers-above", "4000000",
                 "--tile-worker-cpus", "0.5"]) == 0
    runtime = AppConfig.from_args(yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]).runtime
    assert (runtime.tile_workers, runtime.tile_workers_above, runtime.tile_worker_cpus) == (2, 4_000_000, 0.5)


def test_print_config_takes_the_workers_weight_paths_as_given(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no weights on this machine
    assert main(["serve", "--print-config", "--weights-dir", "/weights"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert (args["sdxl"], args["supir"]) == ("/weights/sd_xl_base_1.0_0.9vae.safetensors", "/weights/SUPIR-v0Q.ckpt")
    # without any weight flag (the README's command): placeholders under /weights, said in the header
    assert main(["serve", "--autoscale", "1:8", "--print-config"]) == 0
    out = capsys.readouterr().out
    args = yaml.safe_load(out)["applications"][0]["args"]
    assert (args["sdxl"], args["supir"]) == ("/weights/sd_xl_base_1.0_0.9vae.safetensors", "/weights/SUPIR-v0Q.ckpt")
    assert "mount them there or edit the paths" in out
    assert main(["serve", "--port", "1"]) == 2  # serving here needs the weights here
    err = capsys.readouterr().err
    assert "weights are missing" in err and "supir-rt serve --tiny-random" in err  # the command that was run
    assert "supir-rt restore" not in err


def test_triton_repo_without_weights_writes_placeholders(tmp_path, monkeypatch, capsys):
    """`supir-rt triton-repo models/` as the README shows it: the repository is for a Triton server
    elsewhere, so its weight paths are placeholders, as for --print-config."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no weights on this machine
    assert main(["triton-repo", str(tmp_path / "models")]) == 0
    config = (tmp_path / "models" / "supir" / "config.pbtxt").read_text()
    assert "/weights/sd_xl_base_1.0_0.9vae.safetensors" in config and "/weights/SUPIR-v0Q.ckpt" in config


@pytest.mark.parametrize("command", ["serve", "triton-repo", "triton", "caption"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"supir-rt {command} " in out.split("examples:", 1)[1]
