"""What the Snakemake rules ask of the config: file lists, command-line options, JSON settings.

Kept here rather than in the .smk files so the rules stay declarative and pytest reaches the logic.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from . import config as cfg
from .data import sources

SPLITS = sources.SPLITS
REPORT_FIGURES = {
    "accuracy_vs_epoch": "Accuracy",
    "accuracy_vs_time": "Accuracy",
    "accuracy_vs_batch": "Accuracy",
    "throughput": "Throughput",
    "lr_schedule": "Schedule",
}


def expand_presets(config: dict[str, Any], basedir: str | Path) -> dict[str, Any]:
    """``config["runs"]`` with presets (config/presets.yaml beside the workflow) expanded."""
    presets = cfg.load_presets(Path(basedir) / "config" / "presets.yaml")
    runs = config.get("runs", {})
    if isinstance(runs, str):
        # `--config runs=...` that YAML could not parse reaches here as the raw string.
        try:
            yaml.safe_load(runs)
        except yaml.YAMLError as error:
            raise cfg.ConfigError(f"runs: not valid YAML: {' '.join(str(error).split())}") from None
    return cfg.expand_presets(runs, presets)


def results(config: dict[str, Any], *parts: str) -> str:
    return str(Path(config["results_dir"], *parts))


# Each run's files the workflow asks for. model.pt is among them: Snakemake tolerates a missing
# file whose consumers are up to date (as it does a removed temp() file), so a model.pt deleted
# after evaluation would otherwise never be noticed.
RUN_TARGETS = ("summary.json", "model.pt", "eval.json")


def final_outputs(config: dict[str, Any]) -> list[str]:
    outputs = [results(config, "shards", split, "manifest.json") for split in SPLITS]
    for run in config["runs"]:
        outputs += [results(config, "runs", run, name) for name in RUN_TARGETS]
    outputs += [results(config, "report", "report.html")]
    return outputs


# --------------------------------------------------------------------------- data stage


# The generator's own folder: it writes nowhere else, so a data_dir elsewhere is never written to.
SAMPLE_DATA_DIR = "resources/sample-imagenet"


def generates_sample_data(config: dict[str, Any]) -> bool:
    """Whether the workflow generates its input: ``sample_data.generate`` resolved against data_dir.

    ``auto`` generates exactly when data_dir is the generator's folder, so pointing data_dir at a
    data set is all it takes to use it. ``true`` with data_dir elsewhere is ambiguous (train on the
    generated data or on the folder given?) and fails here, before any job.
    """
    generate = str(config["sample_data"]["generate"]).lower()  # --config passes "true"/"false" as text
    is_sample_dir = Path(config["data_dir"]).resolve() == Path(SAMPLE_DATA_DIR).resolve()
    if generate == "auto":
        return is_sample_dir
    if generate == "true" and not is_sample_dir:
        raise cfg.ConfigError(
            f"sample_data.generate is true, but data_dir is {config['data_dir']}: the generator writes only to "
            f"{SAMPLE_DATA_DIR}. To train on {config['data_dir']}, set sample_data.generate to auto (or false); "
            f"to train on generated data, leave data_dir at {SAMPLE_DATA_DIR}")
    return generate == "true"


def sample_data_files(config: dict[str, Any]) -> list[str]:
    data_dir = Path(SAMPLE_DATA_DIR)
    return [str(data_dir / name) for name in (sources.OFFICIAL_TRAIN, sources.OFFICIAL_VAL, sources.OFFICIAL_DEVKIT)]


def sample_data_args(config: dict[str, Any]) -> str:
    s = config["sample_data"]
    args = [f"--classes={s['classes']}", f"--train-per-class={s['train_per_class']}",
            f"--val-per-class={s['val_per_class']}", f"--min-side={s['min_side']}", f"--max-side={s['max_side']}",
            f"--quality={s['quality']}", f"--seed={s['seed']}"]
    if not s["odd_files"]:
        args.append("--no-odd-files")
    return " ".join(args)


def dataset_files(config: dict[str, Any]) -> list[str]:
    """The input files the index depends on, each directly in data_dir (see :func:`data_dir_of`).
    Detecting the layout here reports a wrong data_dir before any job starts."""
    if generates_sample_data(config):
        return sample_data_files(config)
    data_dir = Path(config["data_dir"])
    layout = sources.detect_layout(data_dir)
    names = {
        "official": [sources.OFFICIAL_TRAIN, sources.OFFICIAL_VAL, sources.OFFICIAL_DEVKIT],
        "extracted": ["train", "val"],
        "kaggle": [sources.KAGGLE_VAL_SOLUTION, sources.KAGGLE_SYNSETS, "ILSVRC"],
    }[layout]
    return [str(data_dir / name) for name in names]


def input_listing(config: dict[str, Any], split: str) -> str:
    """What a listing of the split's image files says (:func:`flashnet.data.sources.listing_fingerprint`):
    the index rule's tracked param, so adding or removing an image in an extracted or Kaggle layout
    plans the index and the shards again."""
    return sources.listing_fingerprint(Path(config["data_dir"]), split)


def input_listing_param(config: dict[str, Any]) -> dict[str, Any]:
    """The index rule's ``listing`` param where the images are files of their own; none for the
    official layout and the generated sample data (official tars), whose tars are the rule's input
    files: a param they do not need would only make Snakemake redo the data stage of every results
    folder written before it existed ("Params have changed")."""
    if generates_sample_data(config) or not sources.images_are_files(config["data_dir"]):
        return {}
    return {"listing": lambda wildcards: input_listing(config, wildcards.split)}


def data_dir_of(dataset_files: list[str]) -> str:
    return str(Path(dataset_files[0]).parent)


def shard_options(config: dict[str, Any]) -> str:
    s = config["shards"]
    options = [f"--quality={s['quality']}", f"--check={s['check']}"]
    if s["max_side"] is not None:
        options.append(f"--max-side={s['max_side']}")
    return " ".join(options)


def part_files(config: dict[str, Any], parts_dir: str) -> list[str]:
    return [f"{parts_dir}/{part}.json" for part in range(config["shards"]["jobs"])]


# --------------------------------------------------------------------------- training and evaluation


def run_config(config: dict[str, Any], run: str) -> cfg.RunConfig:
    return cfg.RunConfig.from_dict(config["runs"][run], run)


def run_json(config: dict[str, Any], run: str) -> str:
    """Every setting of the run, for ``flashnet train --run``."""
    return json.dumps(run_config(config, run).to_dict(), sort_keys=True)


def run_result_json(config: dict[str, Any], run: str) -> str:
    """The settings that decide the run's result (:data:`flashnet.config.RESULT_NEUTRAL_KEYS` left
    out): the train rule's tracked param, so adding a logger to a finished run retrains nothing."""
    return json.dumps(run_config(config, run).result_dict(), sort_keys=True)


def mlperf_json(config: dict[str, Any]) -> str:
    """The ``mlperf`` section, checked, for ``flashnet train --mlperf``."""
    return json.dumps(cfg.MlperfConfig.from_dict(config.get("mlperf", {})).to_dict(), sort_keys=True)


def resolve_cluster(config: dict[str, Any], executor: str | None) -> str:
    cluster = config["launcher"]["cluster"]
    if cluster == "auto":
        return "slurm" if executor == "slurm" else "local"
    return cluster


def parse_slurm_extra(extra: str | None) -> dict[str, str]:
    """``"--qos=high --constraint=h100"`` (the slurm executor's slurm_extra resource) → submitit's
    ``slurm_additional_parameters``."""
    options = {}
    for token in shlex.split(extra or ""):
        if not token.startswith("--"):
            raise cfg.ConfigError(f"resources.slurm_extra: {token!r} is not a --option[=value]")
        key, _, value = token[2:].partition("=")
        options[key.replace("-", "_")] = value
    return options


def launcher_json(config: dict[str, Any], resources: Any, executor: str | None, gpus_per_node: int = 0) -> str:
    """Launcher settings for submitit: the config's ``launcher`` section, the cluster resolved from
    the Snakemake executor, and the site keys (partition, account, extra sbatch options) from the
    rule's resources, which the slurm profile sets for every rule."""
    launcher = dict(config["launcher"])
    launcher["cluster"] = resolve_cluster(config, executor)
    launcher["slurm_partition"] = resources.get("slurm_partition") or None
    launcher["slurm_account"] = resources.get("slurm_account") or None
    launcher["slurm_extra"] = parse_slurm_extra(resources.get("slurm_extra"))
    launcher["gpus_per_node"] = gpus_per_node
    cfg.LauncherConfig.from_dict(launcher)  # fail at DAG time, not in the job
    return json.dumps(launcher, sort_keys=True)


def train_launcher_json(config: dict[str, Any], run: str, resources: Any, executor: str | None) -> str:
    settings = cluster_run_config(config, run, executor)
    gpus = settings.devices_per_node if settings.accelerator == "gpu" else 0
    return launcher_json(config, resources, executor, gpus)


def evaluate_launcher_json(config: dict[str, Any], run: str, resources: Any, executor: str | None) -> str:
    settings = cluster_run_config(config, run, executor)
    refuse_more_workers_than_cpus("evaluate.workers", config["evaluate"]["workers"], config)
    gpus = config["evaluate"]["devices"] if settings.accelerator == "gpu" else 0
    return launcher_json(config, resources, executor, gpus)


def cluster_run_config(config: dict[str, Any], run: str, executor: str | None) -> cfg.RunConfig:
    """The run's settings, refused if the job cannot be sized: more loader processes than CPUs per
    task would oversubscribe the node, and under SLURM the GPUs a job asks for are fixed when it is
    queued, so ``accelerator: auto`` (decided on the node) would ask for none and leave a GPU recipe
    on the node's CPU."""
    settings = run_config(config, run)
    refuse_more_workers_than_cpus(f"runs.{run}.loader_workers",
                                  settings.loader_processes(config["launcher"]["cpus_per_task"]), config)
    if resolve_cluster(config, executor) == "slurm" and settings.accelerator == "auto":
        raise cfg.ConfigError(
            f"runs.{run}.accelerator: auto cannot size a SLURM job (its GPUs are requested when it is "
            "queued); set gpu (devices_per_node GPUs on each node) or cpu")
    return settings


def refuse_more_workers_than_cpus(key: str, workers: int, config: dict[str, Any]) -> None:
    cpus = config["launcher"]["cpus_per_task"]
    if workers > cpus:
        raise cfg.ConfigError(f"{key}: {workers} loader processes per device, but launcher.cpus_per_task is {cpus}: "
                              f"raise cpus_per_task or lower {key.rpartition('.')[2]}")


def host_cores(config: dict[str, Any], run: str, executor: str | None, evaluation: bool = False) -> int:
    """The cores the train (or evaluate) rule's job takes on the host Snakemake runs on, its
    ``threads``: with a local cluster, one process per device with cpus_per_task each, so Snakemake's
    --cores bounds how many run at once (a run asking more than --cores runs alone); under SLURM the
    rule only waits on its job, and ``resources.runs_in_flight`` bounds how many do."""
    if resolve_cluster(config, executor) != "local":
        return 1
    settings = run_config(config, run)
    devices = config["evaluate"]["devices"] if evaluation else settings.nodes * settings.devices_per_node
    return devices * config["launcher"]["cpus_per_task"]


def refuse_run_in_progress(config: dict[str, Any], run: str) -> list[str]:
    """No input files; raises when another invocation's job for this run still runs.

    Called from the train and evaluate rules' input, so at DAG time: once a job of this invocation
    started, Snakemake would already have deleted the running run's outputs (metrics.csv,
    steps.csv) and truncated its log."""
    folder = Path(results(config, "runs", run, "jobs"))
    if not (folder / "active.json").exists():
        return []
    from .jobs import lock

    try:
        lock.refuse_if_running(folder)
    except lock.JobFailed as error:
        raise cfg.ConfigError(f"runs.{run}: {error}") from None
    return []


def forced(workflow: Any, rule: str) -> bool:
    """Whether this invocation was told to rerun ``rule`` (``--forcerun rule`` or ``--forceall``).
    Only meaningful for local rules: a job run remotely is told --force, never which rules."""
    settings = getattr(workflow, "dag_settings", None)
    return bool(settings and (settings.forceall or rule in set(settings.forcerun or ())))


# A forced rule's flag reaches its command through the environment, not a rule param: a param that
# differs between a forced run and the next makes that next run redo the job (Snakemake reruns a job
# whose params changed: the conversion jobs, then the manifests and training; or training afresh).
# And a job on SLURM is a new `snakemake --force <job>` that evaluates params without knowing which
# rules were forced, while it inherits the main process's environment (the SLURM executor submits
# with --export=ALL; local jobs are its children). The shell lines end in ${VARIABLE:-}.
FORCED_FLAGS = {
    "write_shards": ("FLASHNET_REWRITE_SHARDS", "--rewrite"),  # rewrite every shard, journal or not
    "train": ("FLASHNET_FRESH_TRAIN", "--fresh"),  # from scratch, not from a checkpoint
}
REWRITE_SHARDS_ENV = FORCED_FLAGS["write_shards"][0]


def pass_forced_flags(workflow: Any) -> None:
    """In the main process, set each rule's :data:`FORCED_FLAGS` variable for the jobs it starts:
    the flag where this invocation forces the rule, else empty (not inherited from a snakemake
    that started this one)."""
    if getattr(workflow, "remote_exec", False):
        return  # a job on SLURM keeps what its main process passed
    for rule, (variable, flag) in FORCED_FLAGS.items():
        os.environ[variable] = flag if forced(workflow, rule) else ""


def executor_name(workflow: Any) -> str | None:
    plugin = getattr(workflow, "executor_plugin", None)
    return getattr(plugin, "name", None)


# --------------------------------------------------------------------------- after a failed job


def report_what_finished(config: dict[str, Any], workflow: Any) -> None:
    """Snakemake's ``onerror`` hook: under --keep-going, build results/report/ from the runs that
    finished, listing the others with why.

    Snakemake never runs a job whose inputs failed, so one failed run would leave every other run
    of a sweep without a report. Without --keep-going the invocation stopped at the first failure
    and other runs may not have been tried, so nothing is reported then (a line says how to get a
    report). The partial report's files are dated before its inputs, so the next invocation
    builds the report again whatever it does (finishes the failed runs, or drops them from the config).
    """
    settings = getattr(workflow, "execution_settings", None)
    if not getattr(settings, "keep_going", False):
        print("flashnet: no report, as a job failed; with --keep-going the runs that finish are reported "
              "and the failed ones listed", file=sys.stderr)
        return
    from .report import build, runs as report_runs

    folders = [Path(results(config, "runs", run)) for run in config["runs"]]
    finished = [folder for folder in folders if report_runs.is_finished(folder)]
    if not finished or len(finished) == len(folders):
        return  # no run to report, or every run finished and the report rule itself is what failed
    out_dir = Path(results(config, "report"))
    try:
        files = build.build_report(folders, config["report"], out_dir, partial=True,
                                   logs_dir=Path(results(config, "logs")))
    except Exception as error:  # a hook must not hide the failure that called it
        print(f"flashnet: no report of the runs that finished: {error}", file=sys.stderr)
        return
    date_before_inputs(list(files.values()), finished)
    missing = [folder.name for folder in folders if folder not in finished]
    print(f"flashnet: report of the {len(finished)} run(s) that finished → {files[build.HTML_FILE]}; "
          f"without results: {', '.join(missing)} (listed there with why)", file=sys.stderr)


def date_before_inputs(files: list[Path], run_folders: list[Path]) -> None:
    """Set ``files``' times to before every file in ``run_folders``, so Snakemake (whose rerun
    triggers compare times) sees the report older than its inputs and builds it again."""
    oldest = min(path.stat().st_mtime for folder in run_folders for path in folder.iterdir() if path.is_file())
    for path in files:
        os.utime(path, (oldest - 1, oldest - 1))
