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
])
def test_bad_flags_are_one_error_line(argv, words, capsys):
    assert main(["serve", "--tiny-random", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_print_config_takes_the_workers_weight_paths_as_given(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no weights on this machine
    assert main(["serve", "--print-config", "--weights-dir", "/weights"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert (args["sdxl"], args["supir"]) == ("/weights/sd_xl_base_1.0_0.9vae.safetensors", "/weights/SUPIR-v0Q.ckpt")
    assert main(["serve", "--print-config"]) == 2
    assert "--print-config needs the workers' weight paths" in capsys.readouterr().err
    assert main(["serve", "--port", "1"]) == 2  # serving here needs the weights here
    assert "weights are missing" in capsys.readouterr().err
