"""What the rules ask of the config (flashnet.pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from flashnet import config as cfg
from flashnet import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config() -> dict:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["runs"] = pipeline.expand_presets(config, ROOT)
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return config


class Resources(dict):
    """Stands in for Snakemake's resources object: the rules only call .get()."""


def test_final_outputs_cover_every_stage(config):
    outputs = pipeline.final_outputs(config)
    assert outputs == [
        "results/shards/train/manifest.json", "results/shards/val/manifest.json",
        "results/runs/default/summary.json", "results/runs/default/eval.json", "results/report/report.html",
    ]


@pytest.mark.parametrize("setting, executor, expected", [
    ("auto", "slurm", "slurm"), ("auto", "local", "local"), ("auto", None, "local"),
    ("local", "slurm", "local"), ("slurm", None, "slurm"),
])
def test_the_launcher_follows_the_executor_unless_told(config, setting, executor, expected):
    config["launcher"]["cluster"] = setting
    assert pipeline.resolve_cluster(config, executor) == expected


def test_site_keys_come_from_the_rule_resources(config):
    resources = Resources(slurm_partition="gpu", slurm_account="proj42", slurm_extra="--qos=high --constraint=h100")
    launcher = json.loads(pipeline.train_launcher_json(config, "default", resources, "slurm"))
    assert launcher["cluster"] == "slurm"
    assert (launcher["slurm_partition"], launcher["slurm_account"]) == ("gpu", "proj42")
    assert launcher["slurm_extra"] == {"qos": "high", "constraint": "h100"}
    assert launcher["gpus_per_node"] == 0  # the default run is a CPU run
    cfg.LauncherConfig.from_dict(launcher)


def test_gpu_runs_ask_for_their_devices(config):
    config["runs"]["big"] = {**config["runs"]["default"], "accelerator": "gpu", "devices_per_node": 4, "batch_size": 256}
    launcher = json.loads(pipeline.train_launcher_json(config, "big", Resources(), "slurm"))
    assert launcher["gpus_per_node"] == 4


def test_slurm_refuses_a_run_whose_accelerator_is_left_to_the_node(config):
    config["runs"]["big"] = {**config["runs"]["default"], "accelerator": "auto"}
    with pytest.raises(cfg.ConfigError, match=r"runs\.big\.accelerator: auto cannot size a SLURM job"):
        pipeline.train_launcher_json(config, "big", Resources(), "slurm")
    with pytest.raises(cfg.ConfigError, match=r"runs\.big\.accelerator"):
        pipeline.evaluate_launcher_json(config, "big", Resources(), "slurm")
    assert json.loads(pipeline.train_launcher_json(config, "big", Resources(), "local"))["gpus_per_node"] == 0


def test_presets_are_gpu_recipes(config):
    """Presets are record recipes: under SLURM they ask for GPUs, one per process."""
    presets = yaml.safe_load((ROOT / "config" / "presets.yaml").read_text())
    config["runs"] = pipeline.expand_presets({"runs": {name: {"preset": name} for name in presets}}, ROOT)
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    config["launcher"]["cpus_per_task"] = 8  # a GPU node's share per device (this file's 1 is for the CPU default)
    for name in presets:
        launcher = json.loads(pipeline.train_launcher_json(config, name, Resources(), "slurm"))
        assert launcher["gpus_per_node"] == config["runs"][name]["devices_per_node"], name


def test_more_loader_workers_than_cpus_per_task_are_refused_naming_both(config):
    config["runs"]["busy"] = {**config["runs"]["default"], "loader_workers": 3}
    with pytest.raises(cfg.ConfigError, match=r"runs\.busy\.loader_workers: 3 loader processes per device, but "
                                              r"launcher\.cpus_per_task is 1"):
        pipeline.train_launcher_json(config, "busy", Resources(), "local")


def test_slurm_extra_that_is_not_an_option_is_refused():
    with pytest.raises(cfg.ConfigError, match="slurm_extra"):
        pipeline.parse_slurm_extra("qos=high")


def test_sample_data_arguments(config):
    args = pipeline.sample_data_args(config)
    assert "--classes=10" in args and "--train-per-class=100" in args and "--no-odd-files" not in args


def test_dataset_files_detect_the_layout(config, tmp_path):
    config["sample_data"]["generate"] = False
    config["data_dir"] = str(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    files = pipeline.dataset_files(config)
    assert files == [str(tmp_path / "train"), str(tmp_path / "val")]
    assert pipeline.data_dir_of(files) == str(tmp_path)


def test_a_wrong_data_dir_fails_before_any_job(config, tmp_path):
    config["sample_data"]["generate"] = False
    config["data_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="does not exist"):
        pipeline.dataset_files(config)


def test_mlperf_settings_reach_the_train_command(config):
    assert json.loads(pipeline.mlperf_json(config)) == {"org": "flashnet", "platform": None, "status": "research",
                                                        "division": "auto"}
    config["mlperf"] = {**config["mlperf"], "division": "closed", "platform": "64xNVIDIA_H100"}
    assert json.loads(pipeline.mlperf_json(config))["division"] == "closed"
    config["mlperf"]["status"] = "available"
    with pytest.raises(cfg.ConfigError, match=r"mlperf\.status: 'available' is not one of"):
        pipeline.mlperf_json(config)
    assert "--mlperf {params.mlperf:q}" in (ROOT / "workflow" / "rules" / "train.smk").read_text()
