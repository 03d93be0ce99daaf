"""The config files that ship validate against the schema, and the typed views catch bad runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from flashnet import config as cfg

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
PRESETS = cfg.load_presets(ROOT / "config" / "presets.yaml")


def validated(path: Path, runs_override=None) -> dict:
    config = yaml.safe_load(path.read_text())
    if runs_override is not None:
        config["runs"] = runs_override
    config["runs"] = cfg.expand_presets(config.get("runs", {}), PRESETS)
    validate(config, str(SCHEMA))
    return config


@pytest.mark.parametrize("name", ["config.yaml", "sweep.yaml"])
def test_shipped_configs_validate_and_every_run_checks(name):
    config = validated(ROOT / "config" / name)
    for run_name, run in config["runs"].items():
        cfg.RunConfig.from_dict(run, run_name)


def test_schema_fills_defaults():
    config = validated(ROOT / "config" / "config.yaml", runs_override={"r": {"batch_size": 8}})
    run = config["runs"]["r"]
    assert run["model"] == "resnet50" and run["optimizer"] == "lars" and run["crop_scale"] == [0.08, 1.0]
    assert config["launcher"]["cluster"] == "auto"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_a_valid_run(preset):
    config = validated(ROOT / "config" / "config.yaml", runs_override={"r": {"preset": preset}})
    run = cfg.RunConfig.from_dict(config["runs"]["r"], "r")
    assert run.preset == preset and run.model == "resnet50"


def test_a_runs_own_keys_win_over_its_preset():
    runs = cfg.expand_presets({"r": {"preset": "mlperf-lars-b3264", "epochs": 40, "nodes": 51}}, PRESETS)
    assert runs["r"]["epochs"] == 40 and runs["r"]["nodes"] == 51 and runs["r"]["lr"] == 10.5


def test_fujitsu_preset_matches_the_published_recipe():
    fujitsu = PRESETS["fujitsu-mlperf-v0.6"]
    assert (fujitsu["batch_size"], fujitsu["lr"], fujitsu["warmup_epochs"], fujitsu["lr_decay_power"],
            fujitsu["momentum"], fujitsu["lars_eta"], fujitsu["epochs"]) == (86016, 13.0, 36, 2.2, 0.96, 0.0025, 90)
    assert fujitsu["batch_size"] % (fujitsu["nodes"] * fujitsu["devices_per_node"]) == 0


def test_unknown_preset_is_named():
    with pytest.raises(cfg.ConfigError, match=r"runs\.r\.preset: unknown preset 'nope'"):
        cfg.expand_presets({"r": {"preset": "nope"}}, PRESETS)


def test_schema_rejects_an_unknown_key_naming_it():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["runs"]["default"]["learning_rate"] = 1.0
    with pytest.raises(Exception, match="learning_rate"):
        validate(config, str(SCHEMA))


def test_schema_rejects_a_bad_value():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["runs"]["default"]["precision"] = "fp8"
    with pytest.raises(Exception, match="fp8"):
        validate(config, str(SCHEMA))


def base_run(**overrides) -> dict:
    config = validated(ROOT / "config" / "config.yaml")
    return {**config["runs"]["default"], **overrides}


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 63}, r"runs\.x\.batch_size: 63 does not divide by the world size 2"),
    ({"precision": "16-mixed", "accelerator": "cpu"}, r"runs\.x\.precision: 16-mixed needs a GPU"),
    ({"model": "vgg16"}, r"runs\.x\.model: unknown model 'vgg16'"),
    ({"optimizer": "adam"}, r"runs\.x\.optimizer: unknown optimizer 'adam'"),
    ({"crop_scale": [0.9, 0.1]}, r"runs\.x\.crop_scale"),
    ({"warmup_epochs": 16}, r"runs\.x\.warmup_epochs"),
    ({"decode_device": "cuda", "accelerator": "cpu"}, r"runs\.x\.decode_device"),
])
def test_bad_runs_are_named(overrides, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.RunConfig.from_dict(base_run(**overrides), "x")


def test_unknown_and_missing_run_keys():
    with pytest.raises(cfg.ConfigError, match=r"unknown key\(s\) colour"):
        cfg.RunConfig.from_dict(base_run(colour="red"), "x")
    run = base_run()
    del run["lr"]
    with pytest.raises(cfg.ConfigError, match=r"missing key\(s\) lr"):
        cfg.RunConfig.from_dict(run, "x")


def test_run_config_round_trips():
    run = cfg.RunConfig.from_dict(base_run(), "x")
    assert cfg.RunConfig.from_dict(run.to_dict(), "x") == run
    assert run.world_size == 2 and run.per_device_batch == 32 and run.eval_resize == round(run.image_size * 256 / 224)
