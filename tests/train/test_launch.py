"""The submitting side of training: what is checked before a job is queued, and resume checkpoints
set aside when they no longer fit the run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flashnet.config import ConfigError, RunConfig
from flashnet.data.sources import DataError
from flashnet.train import launch
from flashnet.train.recipe import TrainSpec

def test_checks_before_submitting(tiny_dataset, tmp_path):
    launcher = tiny_dataset.launcher()
    good = RunConfig.from_dict(tiny_dataset.run())
    launch.check_before_submitting(good, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    two_nodes = RunConfig.from_dict(tiny_dataset.run(nodes=2))
    with pytest.raises(ConfigError, match="nodes: 2, but launcher.cluster is local"):
        launch.check_before_submitting(two_nodes, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    too_big = RunConfig.from_dict(tiny_dataset.run(batch_size=1024))
    with pytest.raises(ConfigError, match="batch_size 1024 exceeds the 160 train samples"):
        launch.check_before_submitting(too_big, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    with pytest.raises(DataError, match="manifest missing"):
        launch.check_before_submitting(good, launcher, tmp_path / "manifest.json", tiny_dataset.val_manifest)
    if not torch.cuda.is_available():  # a local job runs on this machine: what it cannot do is refused now
        gpu = RunConfig.from_dict(tiny_dataset.run(accelerator="gpu"))
        with pytest.raises(ConfigError, match="accelerator: gpu, but this node has no CUDA device"):
            launch.check_before_submitting(gpu, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
        fp16 = RunConfig.from_dict(tiny_dataset.run(accelerator="auto", precision="16-mixed"))
        with pytest.raises(ConfigError, match="precision: 16-mixed needs a GPU"):
            launch.check_before_submitting(fp16, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)


def test_a_manifest_that_does_not_verify_stops_submission(tiny_dataset, tmp_path):
    manifest = json.loads(tiny_dataset.train_manifest.read_text())
    shard = tiny_dataset.train_manifest.parent / manifest["shards"][0]["name"]
    copy = tmp_path / "train"
    copy.mkdir()
    for entry in manifest["shards"]:
        (copy / entry["name"]).write_bytes((shard.parent / entry["name"]).read_bytes())
    (copy / manifest["shards"][0]["name"]).write_bytes(b"short")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000000\.tar: 5 bytes, the manifest says"):
        launch.check_before_submitting(RunConfig.from_dict(tiny_dataset.run()), tiny_dataset.launcher(),
                                       copy / "manifest.json", tiny_dataset.val_manifest)


def test_a_shard_damaged_after_its_manifest_stops_submission_naming_it(tiny_dataset, tmp_path):
    """Issue 14, case 2: a flipped byte keeps the shard's size, and training used to check only sizes."""
    copy = tmp_path / "train"
    shutil.copytree(tiny_dataset.train_manifest.parent, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01  # inside the first image
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{shard}: sha256 differs from {copy / 'manifest.json'} .*"
                                        r"snakemake --forcerun write_shards$"):
        launch.check_before_submitting(RunConfig.from_dict(tiny_dataset.run()), tiny_dataset.launcher(),
                                       copy / "manifest.json", tiny_dataset.val_manifest)


def test_forcerun_train_moves_an_interrupted_runs_checkpoints_aside(tiny_dataset, tmp_path, capsys):
    """Issue 14, case 3: `--forcerun train` (the rule passes --fresh) retrains from scratch, as the
    README says, even after an interrupted run left a resume checkpoint; a plain rerun resumes."""
    spec = TrainSpec("tiny", tiny_dataset.run(), str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest),
                     str(tmp_path), tiny_dataset.launcher())
    launch.set_aside_stale_checkpoint(spec)
    spec.checkpoint.write_bytes(b"an interrupted run's checkpoint")
    launch.set_aside_stale_checkpoint(spec)  # same settings, not forced: kept for resuming
    assert spec.checkpoint.exists()
    launch.set_aside_stale_checkpoint(spec, fresh=True)
    assert not spec.checkpoint.exists()
    (aside,) = tmp_path.glob("checkpoints.forced-*")
    assert (aside / "last.ckpt").read_bytes() == b"an interrupted run's checkpoint"
    assert f"--forcerun train: not resuming from {spec.checkpoint}: moved it to {aside}" in capsys.readouterr().out
