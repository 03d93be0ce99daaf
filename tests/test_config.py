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
    ({"model": "vgg16"}, r"runs\.x\.model: 'vgg16' is not one of \['resnet18'"),
    ({"optimizer": "adam"}, r"runs\.x\.optimizer: 'adam' is not one of"),
    ({"crop_scale": [0.9, 0.1]}, r"runs\.x\.crop_scale: lower bound 0.9 exceeds upper bound 0.1"),
    ({"crop_ratio": [1.5]}, r"runs\.x\.crop_ratio: \[1.5\] is too short"),
    ({"crop_ratio": [1.5, 0.5]}, r"runs\.x\.crop_ratio: lower bound 1.5 exceeds upper bound 0.5"),
    ({"warmup_epochs": 16}, r"runs\.x\.warmup_epochs"),
    ({"decode_device": "cuda", "accelerator": "cpu"}, r"runs\.x\.decode_device: cuda needs a GPU"),
    ({"lars_epsilon": -1e-8}, r"runs\.x\.lars_epsilon: -1e-08 is less than the minimum of 0"),
    ({"lr_decay_steps": 0}, r"runs\.x\.lr_decay_steps: 0 is less than the minimum of 1"),
    ({"lr_decay_steps": 2.5}, r"runs\.x\.lr_decay_steps: 2.5 is not of type 'integer', 'null'"),
    ({"lr_decay_steps": 10, "lr_decay_epochs": 2}, r"runs\.x\.lr_decay_steps: set lr_decay_steps or lr_decay_epochs"),
    ({"eval_every_epochs": 0}, r"runs\.x\.eval_every_epochs: 0 is less than the minimum of 1"),
    ({"eval_every_epochs": 4, "eval_offset": 4}, r"runs\.x\.eval_offset: 4 must be below eval_every_epochs 4"),
    ({"stop_at_target": "yes"}, r"runs\.x\.stop_at_target: 'yes' is not of type 'boolean'"),
    ({"no_augment_from_epoch": 0}, r"runs\.x\.no_augment_from_epoch: 0 is less than the minimum of 1"),
    # 64 over 2 devices is 32 per device: a span of 48 is not whole devices, 128 is more devices than there are
    ({"bn_span": 48}, r"runs\.x\.bn_span: 48 samples cannot be covered by whole devices of 32 samples each"),
    ({"bn_span": 96}, r"runs\.x\.bn_span: groups of 3 devices \(96 / 32 per device\) do not divide the world size 2"),
    ({"bn_span": 64}, r"runs\.x\.bn_span: BatchNorm synchronised over groups of 2 devices needs GPUs"),
    ({"zero_init_residual": 1}, r"runs\.x\.zero_init_residual: 1 is not of type 'boolean'"),
])
def test_bad_runs_are_named(overrides, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.RunConfig.from_dict(base_run(**overrides), "x")


def test_unknown_keys_are_named_and_missing_keys_take_the_schema_default():
    with pytest.raises(cfg.ConfigError, match=r"runs\.x: unknown key\(s\) colour"):
        cfg.RunConfig.from_dict(base_run(colour="red"), "x")
    run = base_run()
    del run["lr"]
    assert cfg.RunConfig.from_dict(run, "x").lr == 10.5


def test_run_config_round_trips():
    run = cfg.RunConfig.from_dict(base_run(), "x")
    assert cfg.RunConfig.from_dict(run.to_dict(), "x") == run
    assert run.world_size == 2 and run.per_device_batch == 32 and run.eval_resize == round(run.image_size * 256 / 224)


def test_each_run_and_launcher_key_is_declared_once_in_the_schema():
    """The typed views are the schema's keys, with the schema's defaults: nothing declares them again."""
    schema = yaml.safe_load(SCHEMA.read_text())
    run_keys = schema["$defs"]["run"]["properties"]
    assert cfg.RunConfig.field_names() == tuple(run_keys)
    defaults = cfg.RunConfig()
    for key, spec in run_keys.items():
        expected = spec.get("default")
        assert cfg._thawed(getattr(defaults, key)) == expected, key
    assert "required" not in schema["$defs"]["run"]  # every key has a default instead
    launcher_keys = schema["properties"]["launcher"]["properties"]
    launcher = cfg.LauncherConfig.from_dict({"cluster": "local"})
    for key, spec in launcher_keys.items():
        if key == "cluster":  # auto is resolved by the workflow before a launcher is built
            continue
        assert cfg._thawed(getattr(launcher, key)) == spec["default"], key


def test_launcher_defaults_and_unknown_keys():
    with pytest.raises(cfg.ConfigError, match=r"launcher: unknown key\(s\) nodes"):
        cfg.LauncherConfig.from_dict({"cluster": "local", "nodes": 2})
    with pytest.raises(cfg.ConfigError, match=r"launcher\.timeout_min: 0 is less than the minimum of 1"):
        cfg.LauncherConfig.from_dict({"cluster": "local", "timeout_min": 0})


def test_eval_epochs_follow_nvidias_period_and_offset():
    run = cfg.RunConfig.from_dict(base_run(epochs=37, eval_every_epochs=4, eval_offset=2), "x")
    # NVIDIA's config_DGXH100_multi_8x8x50.sh: EVAL_PERIOD 4, EVAL_OFFSET 2 "Targeting epoch no. 35"
    assert [e for e in range(1, 38) if run.is_eval_epoch(e)] == [3, 7, 11, 15, 19, 23, 27, 31, 35, 37]
    every = cfg.RunConfig.from_dict(base_run(epochs=3), "x")
    assert [e for e in range(1, 4) if every.is_eval_epoch(e)] == [1, 2, 3]


def test_augmentation_stops_at_its_epoch():
    run = cfg.RunConfig.from_dict(base_run(no_augment_from_epoch=86, epochs=90), "x")
    # Fujitsu: `epoch < no_augument_epoch` with 0-based epochs augments 1-based epochs 1..85
    assert [e + 1 for e in range(90) if not run.augments(e)] == [86, 87, 88, 89, 90]
    assert all(cfg.RunConfig.from_dict(base_run(), "x").augments(e) for e in range(8))


def test_result_neutral_keys_are_the_ones_the_schema_marks():
    schema = yaml.safe_load(SCHEMA.read_text())["$defs"]["run"]["properties"]
    assert cfg.RESULT_NEUTRAL_KEYS == {name for name, spec in schema.items() if spec.get("x-result-neutral")}
    assert "lr" not in cfg.RESULT_NEUTRAL_KEYS and "loggers" in cfg.RESULT_NEUTRAL_KEYS
    run = cfg.RunConfig.from_dict({"loggers": ["csv", "mlflow"]})
    assert set(run.result_dict()) == set(run.to_dict()) - cfg.RESULT_NEUTRAL_KEYS
