"""What the rules ask of the config (flashnet.pipeline)."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from flashnet import config as cfg
from flashnet import pipeline
from flashnet.data.sources import DataError

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
        "results/runs/default/summary.json", "results/runs/default/model.pt", "results/runs/default/eval.json",
        "results/report/report.html",
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


def test_more_evaluation_workers_than_cpus_per_task_are_refused_naming_both(config):
    config["evaluate"]["workers"] = 3
    with pytest.raises(cfg.ConfigError, match=r"evaluate\.workers: 3 loader processes per device, but "
                                              r"launcher\.cpus_per_task is 1"):
        pipeline.evaluate_launcher_json(config, "default", Resources(), "slurm")


def test_a_run_without_loader_workers_follows_the_launcher(config):
    """The default (auto) is cpus_per_task - 1, at least 1: a preset added on this file's CPU
    launcher (1 CPU a task) is accepted, and takes 7 workers on a GPU node's 8."""
    config["runs"] = pipeline.expand_presets({"runs": {"b32k": {"preset": "mlperf-lars-b32768"}}}, ROOT)
    pipeline.train_launcher_json(config, "b32k", Resources(), "slurm")
    run = pipeline.run_config(config, "b32k")
    assert run.loader_workers == "auto"
    assert [run.loader_processes(cpus) for cpus in (1, 2, 8)] == [1, 1, 7]
    assert run.replace(loader_workers=3).loader_processes(8) == 3


@pytest.mark.parametrize("executor, train_cores, evaluate_cores", [
    ("local", 2 * 3, 1 * 3),  # the job's processes run here: devices × cpus_per_task (evaluate.devices: 1)
    ("slurm", 1, 1),  # the rule only waits on its SLURM job
])
def test_waiting_rules_declare_the_cores_their_job_takes_on_this_host(config, executor, train_cores, evaluate_cores):
    config["launcher"]["cpus_per_task"] = 3
    assert pipeline.host_cores(config, "default", executor) == train_cores
    assert pipeline.host_cores(config, "default", executor, evaluation=True) == evaluate_cores


def test_slurm_profile_can_keep_as_many_runs_in_flight_as_it_allows():
    """Snakemake 9 runs local rules on a pool of --cores + 5 threads under a cluster executor (and
    ignores --local-cores): runs_in_flight above that would wait for a thread, not for the resource."""
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert "local-cores" not in profile
    in_flight = dict(item.split("=") for item in profile["resources"])["runs_in_flight"]
    assert int(in_flight) + 1 <= profile["cores"] + 5  # every run's rule, and the report's


def test_slurm_extra_that_is_not_an_option_is_refused():
    with pytest.raises(cfg.ConfigError, match="slurm_extra"):
        pipeline.parse_slurm_extra("qos=high")


def test_sample_data_arguments(config):
    args = pipeline.sample_data_args(config)
    assert "--classes=10" in args and "--train-per-class=100" in args and "--no-odd-files" not in args


def extracted_layout(folder: Path) -> Path:
    for split in ("train", "val"):
        (folder / split / "n01440764").mkdir(parents=True)
    return folder


def test_by_default_the_generator_feeds_the_index_from_its_own_folder(config):
    assert config["sample_data"]["generate"] == "auto"
    assert pipeline.generates_sample_data(config)
    assert pipeline.dataset_files(config) == pipeline.sample_data_files(config)
    assert pipeline.data_dir_of(pipeline.dataset_files(config)) == pipeline.SAMPLE_DATA_DIR


@pytest.mark.parametrize("generate", ["auto", False])
def test_a_data_dir_elsewhere_is_used_as_given_and_the_generator_stays_off(config, tmp_path, generate):
    """Issue 14, case 1: with the generator at its default, a user's data_dir was written into
    (official-layout tars beside the user's folders) and then trained on."""
    config["sample_data"]["generate"] = generate
    config["data_dir"] = str(extracted_layout(tmp_path / "imagenet"))
    assert not pipeline.generates_sample_data(config)
    files = pipeline.dataset_files(config)
    assert files == [str(tmp_path / "imagenet" / "train"), str(tmp_path / "imagenet" / "val")]
    assert pipeline.data_dir_of(files) == str(tmp_path / "imagenet")
    assert not any(str(tmp_path) in f for f in pipeline.sample_data_files(config)), "the generator's folder is its own"


def test_generate_true_with_a_data_dir_elsewhere_is_ambiguous_and_fails_naming_what_to_set(config, tmp_path):
    config["sample_data"]["generate"] = True
    config["data_dir"] = str(extracted_layout(tmp_path / "imagenet"))
    with pytest.raises(cfg.ConfigError) as error:
        pipeline.dataset_files(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"sample_data.generate is true, but data_dir is {tmp_path / 'imagenet'}")
    assert "set sample_data.generate to auto (or false)" in message and pipeline.SAMPLE_DATA_DIR in message


@pytest.mark.parametrize("generate", ["auto", False, True])
def test_a_file_as_data_dir_is_named_before_any_job(config, tmp_path, generate):
    (tmp_path / "imagenet.tar").write_bytes(b"not a folder")
    config["sample_data"]["generate"] = generate
    config["data_dir"] = str(tmp_path / "imagenet.tar")
    expected = "sample_data.generate is true" if generate is True else "is not a directory"
    with pytest.raises((cfg.ConfigError, DataError), match=expected) as error:
        pipeline.dataset_files(config)
    assert str(tmp_path / "imagenet.tar") in str(error.value)


def test_a_wrong_data_dir_fails_before_any_job(config, tmp_path):
    config["sample_data"]["generate"] = False
    config["data_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="does not exist"):
        pipeline.dataset_files(config)


def test_runs_given_as_malformed_yaml_are_reported_as_a_yaml_error():
    """`--config runs='{a: [1, 2}'` reaches the workflow as the string Snakemake could not parse."""
    with pytest.raises(cfg.ConfigError, match=r"^runs: not valid YAML: while parsing a flow sequence"):
        pipeline.expand_presets({"runs": "{default: {epochs: [1, 2}}"}, ROOT)


def test_forced_rules_are_read_from_the_invocation():
    def workflow(forcerun=(), forceall=False):
        return types.SimpleNamespace(dag_settings=types.SimpleNamespace(forcerun=frozenset(forcerun), forceall=forceall))

    assert pipeline.forced(workflow({"train"}), "train") and pipeline.forced(workflow(forceall=True), "train")
    assert not pipeline.forced(workflow({"write_shards"}), "train") and not pipeline.forced(workflow(), "train")
    assert not pipeline.forced(types.SimpleNamespace(), "train")


def test_a_forced_write_shards_reaches_its_jobs_through_the_environment(monkeypatch):
    """A conversion job on SLURM is started as `snakemake --force <job>`: it learns that write_shards
    was forced only from the environment it inherits from the main process."""
    def workflow(forcerun=(), forceall=False, remote=False):
        settings = types.SimpleNamespace(forcerun=frozenset(forcerun), forceall=forceall)
        return types.SimpleNamespace(dag_settings=settings, remote_exec=remote)

    monkeypatch.setenv(pipeline.REWRITE_SHARDS_ENV, "--rewrite")  # left by a snakemake that started this one
    pipeline.pass_forced_flags(workflow({"train"}))
    assert os.environ[pipeline.REWRITE_SHARDS_ENV] == ""
    for forcing in (workflow({"write_shards"}), workflow({"write_shards", "manifest"}), workflow(forceall=True)):
        pipeline.pass_forced_flags(forcing)
        assert os.environ[pipeline.REWRITE_SHARDS_ENV] == "--rewrite"
        pipeline.pass_forced_flags(workflow(remote=True))  # the job on SLURM keeps what it was passed
        assert os.environ[pipeline.REWRITE_SHARDS_ENV] == "--rewrite"
        pipeline.pass_forced_flags(workflow())
        assert os.environ[pipeline.REWRITE_SHARDS_ENV] == ""


def test_a_forced_train_starts_afresh_through_the_environment(monkeypatch):
    """--fresh reaches `flashnet train` through the environment, not a param: a param that differed
    between `--forcerun train` and the next plain run would make Snakemake train that run again."""
    variable = pipeline.FORCED_FLAGS["train"][0]
    monkeypatch.setenv(variable, "")
    settings = types.SimpleNamespace(forcerun=frozenset({"train"}), forceall=False)
    pipeline.pass_forced_flags(types.SimpleNamespace(dag_settings=settings))
    assert os.environ[variable] == "--fresh"
    assert os.environ[pipeline.REWRITE_SHARDS_ENV] == ""
    rule = (pipeline.cfg.WORKFLOW_ROOT / "workflow" / "rules" / "train.smk").read_text()
    assert "${{%s:-}}" % variable in rule and "params.fresh" not in rule
def test_mlperf_settings_reach_the_train_command(config):
    assert json.loads(pipeline.mlperf_json(config)) == {"org": "flashnet", "platform": None, "status": "research",
                                                        "division": "auto"}
    config["mlperf"] = {**config["mlperf"], "division": "closed", "platform": "64xNVIDIA_H100"}
    assert json.loads(pipeline.mlperf_json(config))["division"] == "closed"
    config["mlperf"]["status"] = "available"
    with pytest.raises(cfg.ConfigError, match=r"mlperf\.status: 'available' is not one of"):
        pipeline.mlperf_json(config)
    assert "--mlperf {params.mlperf:q}" in (ROOT / "workflow" / "rules" / "train.smk").read_text()


def test_result_neutral_keys_leave_the_train_rules_tracked_param_alone(config):
    """Issue 22, case 8: adding a tracker to a finished run retrained it ("Params have changed")."""
    from flashnet.config import RESULT_NEUTRAL_KEYS

    assert RESULT_NEUTRAL_KEYS >= {"loggers", "mlflow_tracking_uri", "wandb_mode", "log_every_steps", "loader_workers"}
    before = pipeline.run_result_json(config, "default")
    config["runs"]["default"].update(loggers=["csv", "tensorboard"], log_every_steps=1, loader_workers=0)
    assert pipeline.run_result_json(config, "default") == before
    assert json.loads(pipeline.run_json(config, "default"))["loggers"] == ["csv", "tensorboard"]  # the command has them
    config["runs"]["default"]["lr"] = 0.5
    assert pipeline.run_result_json(config, "default") != before


def test_the_input_listing_is_tracked_only_where_images_are_files(config, tmp_path):
    assert pipeline.input_listing_param(config) == {}  # the generator's tars are the index rule's input files
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    (tmp_path / "imagenet" / "train" / "n01440764" / "a.JPEG").write_bytes(b"x")
    config["data_dir"] = str(tmp_path / "imagenet")
    listing = pipeline.input_listing_param(config)["listing"]
    assert listing(types.SimpleNamespace(split="train")).startswith("extracted: 1 files, ")
    assert listing(types.SimpleNamespace(split="val")).startswith("extracted: 0 files, ")
