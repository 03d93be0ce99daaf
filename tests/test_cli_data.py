"""The data stage's command line (what the rules' shell lines call) and the workflow's wiring:
`snakemake -n` plans the expected jobs and `snakemake --lint` is clean."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flashnet import cli
from flashnet.data import sample

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TINY = ["--classes", "4", "--train-per-class", "8", "--val-per-class", "3", "--min-side", "40", "--max-side", "80"]


def flashnet(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-sample")
    assert cli.main(["sample-data", str(out), "--layout", "official", "--layout", "kaggle", *TINY]) == 0
    return out


def test_sample_data_writes_each_layout_to_its_folder(capsys, tmp_path):
    code, out, _ = flashnet(capsys, "sample-data", tmp_path / "data", "--layout", "extracted", "--layout", "kaggle", *TINY)
    assert code == 0
    assert out == f"wrote 32 train and 12 val images to {tmp_path / 'data'} (extracted, kaggle)\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".flashnet-sample-data", "extracted", "kaggle"]
    assert len(list((tmp_path / "data" / "extracted" / "train").rglob("*.JPEG"))) == 32


def test_sample_data_defaults_to_the_official_layout(capsys, tmp_path):
    code, out, _ = flashnet(capsys, "sample-data", tmp_path, *TINY, "--no-odd-files")
    assert code == 0 and out.endswith("(official)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".flashnet-sample-data", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"])


def test_the_data_stage_command_by_command(capsys, sample_dir, tmp_path):
    data_dir = sample_dir / "official"
    shards = tmp_path / "shards" / "train"
    code, out, _ = flashnet(capsys, "index", data_dir, "--split", "train", "--samples-per-shard", 8, "--seed", 0,
                            "--out", shards / "index.json")
    assert (code, out) == (0, f"train: 32 files in the official layout, 4 classes → {shards / 'index.json'}\n")
    lines = []
    for part in (0, 1):
        code, out, _ = flashnet(capsys, "write-shards", shards / "index.json", "--part", part, "--parts", 2,
                                "--quality", 90, "--out", shards / "parts" / f"{part}.json")
        assert code == 0
        lines.append(out)
    # The three odd files (CMYK, PNG, greyscale) are in the sample's train set; which job meets them
    # depends on the shuffle, the total does not.
    counts = [re.fullmatch(r"part (\d)/2: 2 shards, 16 samples, (\d) converted, 0 rejected\n", line) for line in lines]
    assert all(counts) and sum(int(m.group(2)) for m in counts) == 3
    code, out, _ = flashnet(capsys, "manifest", shards / "index.json", "--parts", shards / "parts" / "0.json",
                            shards / "parts" / "1.json", "--max-rejected", 0, "--out", shards / "manifest.json")
    assert (code, out) == (0, f"train: 32 samples in 4 shards verified; 3 converted, 0 rejected → "
                              f"{shards / 'manifest.json'}\n")
    code, out, _ = flashnet(capsys, "verify-shards", shards / "manifest.json", "--full")
    assert (code, out) == (0, f"{shards / 'manifest.json'}: 32 samples in 4 shards OK\n")

    # A byte changed in a shard: only --full notices, and says so in one line.
    path = shards / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[3000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert flashnet(capsys, "verify-shards", shards / "manifest.json")[0] == 0
    code, out, err = flashnet(capsys, "verify-shards", shards / "manifest.json", "--full")
    assert (code, out) == (2, "")
    assert err == (f"flashnet verify-shards: error: {path}: sha256 differs from {shards / 'manifest.json'} (damaged "
                   "since it was written); rewrite the shards: snakemake --forcerun write_shards\n")


def test_bad_input_is_one_line_on_stderr_and_exit_code_2(capsys, tmp_path):
    code, out, err = flashnet(capsys, "index", tmp_path / "nowhere", "--split", "val", "--samples-per-shard", 8,
                              "--seed", 0, "--out", tmp_path / "index.json")
    assert (code, out) == (2, "")
    assert err == f"flashnet index: error: data_dir {tmp_path / 'nowhere'}: does not exist\n"
    assert not (tmp_path / "index.json").exists()


def test_a_kaggle_val_image_without_a_label_stops_the_index(capsys, sample_dir, tmp_path):
    data_dir = tmp_path / "kaggle"
    shutil.copytree(sample_dir / "kaggle", data_dir)
    val = data_dir / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    shutil.copy(val / "ILSVRC2012_val_00000001.JPEG", val / "ILSVRC2012_val_00000077.JPEG")
    code, _, err = flashnet(capsys, "index", data_dir, "--split", "val", "--samples-per-shard", 8, "--seed", 0,
                            "--out", tmp_path / "index.json")
    assert code == 2
    assert err == ("flashnet index: error: ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000077.JPEG: "
                   "no label in LOC_val_solution.csv\n")


def test_bench_shards_runs_through_the_cli(capsys, tmp_path):
    code, out, _ = flashnet(capsys, "bench", "shards", "--images", 20, "--repeats", 1, "--jobs", 1,
                            "--samples-per-shard", 8, "--workdir", tmp_path / "work", "--out", tmp_path / "bench.json")
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (report["inputs"]["images"], report["inputs"]["shards"]) == (20, 3)
    rows = {row["what"]: row for row in report["summary"]}
    assert set(rows) == {"tar -cf", "tar -cf + fsync", "write_part", "write_part (check: header)",
                         "check only (prepare_image)", "write_part, no check"}
    assert rows["tar -cf"]["vs_tar"] == 1.0 and all(row["samples_per_s_per_process"] > 0 for row in rows.values())
    assert [t["samples"] for t in report["timings"] if t["what"] == "write_part"] == [[20]]
    assert "write_part" in out and "goal: write_part ≥ 0.5 × tar's per-process rate" in out
    assert not (tmp_path / "work" / "imagenet-like").exists(), "without --keep the inputs are removed"


# --------------------------------------------------------------------------- the workflow's wiring


def snakemake(*args: str, tmp_path: Path, config: tuple[str, ...] = (),
              configfiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The checkout's workflow run in ``tmp_path`` (``--directory``): its results/, resources/ and
    .snakemake/ there, so nothing the checkout's own runs left behind (`make run`'s sample data,
    results, metadata) changes what a test sees."""
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), *args, "--nolock", "--directory", str(tmp_path),
               "--configfile", str(ROOT / "config" / "config.yaml"), *configfiles]
    if config:
        command += ["--config", *config]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule → count."""
    table = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)
            if m.group(1) != "total"}


def run_data_stage(settings: Path, tmp_path: Path, *flags: str) -> str:
    """The workflow up to the manifests with ``settings`` as its config file; its output."""
    result = snakemake("--cores", "1", "--until", "manifest", *flags, configfiles=(str(settings),), tmp_path=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_dry_run_of_the_default_config_plans_every_step(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    result = snakemake("-n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs, parts = len(config["runs"]), config["shards"]["jobs"]
    assert job_counts(result.stdout + result.stderr) == {
        "sample_data": 1, "index_split": 2, "write_shards": 2 * parts, "manifest": 2,
        "train": runs, "evaluate": runs, "report": 1, "all": 1,
    }
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_a_data_dir_given_alone_is_read_as_given_and_never_written(tmp_path):
    """Issue 14, case 1: `--config data_dir=...` alone used to run the generator into that folder."""
    data_dir = tmp_path / "imagenet"
    for split in ("train", "val"):
        (data_dir / split / "n01440764").mkdir(parents=True)
    result = snakemake("-n", tmp_path=tmp_path, config=(f"data_dir={data_dir}",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample_data" not in job_counts(result.stdout + result.stderr)
    assert sorted(p.name for p in data_dir.iterdir()) == ["train", "val"]


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_generate_true_with_another_data_dir_fails_before_any_job(tmp_path):
    data_dir = tmp_path / "imagenet"
    data_dir.mkdir()
    result = snakemake("-n", tmp_path=tmp_path, config=(f"data_dir={data_dir}", "sample_data={generate: true}"))
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    assert (f"sample_data.generate is true, but data_dir is {data_dir}: the generator writes only to "
            "resources/sample-imagenet. To train on") in "\n".join(lines)
    assert list(data_dir.iterdir()) == [] and not (tmp_path / "results").exists()


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_lint_is_clean(tmp_path):
    result = snakemake("--lint", tmp_path=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in output, output[-3000:]


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_a_second_invocation_on_a_run_in_progress_stops_before_any_job(tmp_path, running_invocation):
    """Issue 14, case 6: a second invocation on the same results_dir failed in its train job, after
    Snakemake had deleted the running run's metrics.csv and steps.csv and truncated its log."""
    run_dir = tmp_path / "results" / "runs" / "default"
    record = running_invocation(run_dir / "jobs")
    files = {run_dir / "metrics.csv": "epoch,top1\n1,0.5\n", run_dir / "steps.csv": "step,loss\n10,2.0\n",
             tmp_path / "results" / "logs" / "train" / "default.log": "epoch 1 val top-1 0.5\n"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    result = snakemake("-n", tmp_path=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert (f"runs.default: local job {record['job_id']} of this run is being followed by another invocation "
            f"(host {socket.gethostname()}, pid {record['pid']}") in output, output[-2000:]
    assert {path: path.read_text() for path in files} == files


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_forcerun_train_passes_fresh_through_the_environment_not_the_command(tmp_path):
    """The train command is the same, forced or not: `--fresh` comes from FLASHNET_FRESH_TRAIN, set
    when execution starts (a command that differed would make the next plain run train again)."""
    plain = snakemake("-n", "-p", tmp_path=tmp_path)
    forced = snakemake("-n", "-p", "--forcerun", "train", tmp_path=tmp_path)
    assert plain.returncode == 0 and forced.returncode == 0, forced.stderr[-2000:]
    train_lines = [[line for line in (r.stdout + r.stderr).splitlines() if "flashnet train --name" in line]
                   for r in (plain, forced)]
    assert train_lines[0] and train_lines[0] == train_lines[1]
    assert all("${FLASHNET_FRESH_TRAIN:-}" in line for line in train_lines[0])


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_forcerun_write_shards_rewrites_every_shard_and_the_next_run_nothing(tmp_path):
    """The data stage of a tiny dataset, run for real three times: a forced rerun (--forcerun
    write_shards, -F alike) writes every shard again (new files), the next plain run finds nothing
    to do (the flag is no rule param, whose change would rerun the jobs)."""
    data_dir = tmp_path / "data"
    sample.write_sample_data(data_dir, sample.SampleSpec(classes=2, train_per_class=8, val_per_class=4, min_side=40,
                                                         max_side=60, seed=1))
    settings = tmp_path / "config.yaml"
    settings.write_text(yaml.safe_dump({"data_dir": str(data_dir), "shards": {"samples_per_shard": 4, "jobs": 2}}))

    def data_stage(*flags):
        return run_data_stage(settings, tmp_path, *flags)

    def shard_files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "results").rglob("*.tar")}

    data_stage()
    first = shard_files()
    assert len(first) == 6  # 16 train and 8 val images, 4 a shard
    output = data_stage("--forcerun", "write_shards")
    forced = shard_files()
    assert forced.keys() == first.keys() and all(forced[name] != first[name] for name in first)
    logs = sorted((tmp_path / "results" / "logs" / "write_shards").glob("*.log"))
    assert len(logs) == 4 and all("forced rerun (--rewrite)" in log.read_text() for log in logs), output[-2000:]
    assert "flashnet write-shards" not in data_stage("-p")  # nothing to do: no job ran
    assert shard_files() == forced


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_an_error_before_submission_reaches_the_terminal_without_the_profile(tmp_path):
    """Issue 22, case 9: an error raised before the job is submitted reached only the rule log (the
    terminal said "check log file(s)"), unless the profile's show-failed-logs was in effect."""
    settings = tmp_path / "config.yaml"
    settings.write_text(yaml.safe_dump({
        "sample_data": {"classes": 2, "train_per_class": 4, "val_per_class": 2, "min_side": 40, "max_side": 48,
                        "odd_files": False},
        "shards": {"samples_per_shard": 4, "jobs": 1},
        "runs": {"default": {"batch_size": 64, "devices_per_node": 1, "loader_workers": 0}},
    }))
    result = snakemake("--cores", "1", "--until", "train", configfiles=(str(settings),), tmp_path=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "flashnet train: error: batch_size 64 exceeds the 8 train samples" in output, output[-3000:]
    assert not (tmp_path / "results" / "runs" / "default" / "jobs").exists()  # nothing was submitted


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed next to this Python")
def test_an_image_added_to_or_removed_from_a_class_folder_plans_the_index_and_shards_again(tmp_path):
    """Issue 22, case 7: in an extracted (or Kaggle) layout only the folders train/ and val/ were
    inputs, so a file added to a class folder planned nothing and training used the old shards."""
    sample.write_sample_data(tmp_path / "data", sample.SampleSpec(classes=2, train_per_class=8, val_per_class=4,
                                                                  min_side=40, max_side=60, seed=1),
                             layouts=("extracted",))
    data_dir = tmp_path / "data"  # one layout: written straight into the folder
    settings = tmp_path / "config.yaml"
    settings.write_text(yaml.safe_dump({"data_dir": str(data_dir), "shards": {"samples_per_shard": 4, "jobs": 2}}))

    def data_stage(*flags):
        return run_data_stage(settings, tmp_path, *flags)

    data_stage()
    assert job_counts(data_stage("-n")) == {}
    image = sorted(next((data_dir / "train").iterdir()).iterdir())[0]
    added = image.with_name(f"{image.stem}_copy{image.suffix}")
    shutil.copy(image, added)
    again = {"index_split": 1, "write_shards": 4, "manifest": 2}  # the other split's shards too: both indexes feed them
    output = data_stage("-n")
    assert job_counts(output) == again, output[-3000:]
    data_stage()
    assert manifest_samples(tmp_path, "train") == 17
    added.unlink()
    assert job_counts(data_stage("-n")) == again
    data_stage()
    assert manifest_samples(tmp_path, "train") == 16


def manifest_samples(tmp_path: Path, split: str) -> int:
    return json.loads((tmp_path / "results" / "shards" / split / "manifest.json").read_text())["samples"]
