"""The submitting side of training: what is checked before a job is queued, and resume checkpoints
set aside when they no longer fit the run."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from flashnet.config import ConfigError, RunConfig
from flashnet.data.sources import DataError
from flashnet.train import checkpoints, launch
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


def spec_of(tiny_dataset, out, **overrides) -> TrainSpec:
    return TrainSpec("tiny", tiny_dataset.run(**overrides), str(tiny_dataset.train_manifest),
                     str(tiny_dataset.val_manifest), str(out), tiny_dataset.launcher())


def interrupted_run(spec: TrainSpec, settings: bool = True) -> bytes:
    """A resume checkpoint as an interrupted run of ``spec`` leaves it (with its settings inside)."""
    state = {"state_dict": {"w": torch.arange(4.0)}}
    if settings:
        state[checkpoints.SETTINGS_KEY] = checkpoints.run_settings(spec.run, spec.train_manifest, spec.val_manifest)
    spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.write_resume(state, spec.checkpoint)
    return spec.checkpoint.read_bytes()


def test_forcerun_train_moves_an_interrupted_runs_checkpoints_aside(tiny_dataset, tmp_path):
    """Issue 14, case 3: `--forcerun train` (the rule passes --fresh) retrains from scratch, as the
    README says, even after an interrupted run left a resume checkpoint; a plain rerun resumes."""
    spec = spec_of(tiny_dataset, tmp_path)
    data = interrupted_run(spec)
    said = []
    assert launch.decide_resume(spec, say=said.append) == spec.checkpoint  # same settings: resumed
    assert said == []
    assert launch.decide_resume(spec, fresh=True, say=said.append) is None
    assert not spec.checkpoint.exists()
    (aside,) = tmp_path.glob("checkpoints.forced-*")
    assert (aside / "last.ckpt").read_bytes() == data
    assert said == [f"--forcerun train: not resuming from {spec.checkpoint}: moved it to {aside}; "
                    "training starts afresh"]


@pytest.mark.parametrize("change", [dict(loader_workers=2), dict(log_every_steps=5), dict(checkpoint_every_minutes=1),
                                    dict(loggers=["csv", "tensorboard"]), dict(wandb_mode="disabled")])
def test_a_result_neutral_key_change_resumes(tiny_dataset, tmp_path, change):
    """Issue 22, case 1: these keys change how fast data is read or what is logged, never the weights."""
    interrupted_run(spec_of(tiny_dataset, tmp_path))
    said = []
    changed = spec_of(tiny_dataset, tmp_path, **change)
    assert launch.decide_resume(changed, say=said.append) == changed.checkpoint
    assert said == [] and not list(tmp_path.glob("checkpoints.*"))


def test_a_result_key_change_sets_aside_naming_the_key_and_keeps_one_stale_copy(tiny_dataset, tmp_path):
    spec = spec_of(tiny_dataset, tmp_path)
    interrupted_run(spec)
    said = []
    assert launch.decide_resume(spec_of(tiny_dataset, tmp_path, lr=10.5, seed=3), say=said.append) is None
    (first,) = tmp_path.glob("checkpoints.stale-*")
    assert said == [f"the run's settings changed since {spec.checkpoint} (lr: 1.0 → 10.5; seed: 0 → 3): moved it to "
                    f"{first}; training starts afresh"]
    time.sleep(1.1)  # the set-aside folders are named by the second
    interrupted_run(spec)
    said.clear()
    assert launch.decide_resume(spec_of(tiny_dataset, tmp_path, epochs=3), say=said.append) is None
    (second,) = tmp_path.glob("checkpoints.stale-*")  # at most one stale copy (each ~200 MB at scale)
    assert second != first and said[0].endswith(f"(removed the earlier set-aside {first})")
    assert "(epochs: 2 → 3)" in said[0]


def test_other_shards_set_the_checkpoint_aside(tiny_dataset, tmp_path):
    spec = spec_of(tiny_dataset, tmp_path)
    state = {checkpoints.SETTINGS_KEY: {**checkpoints.run_settings(spec.run, spec.train_manifest, spec.val_manifest),
                                        "train": "0" * 64}}
    spec.checkpoint.parent.mkdir(parents=True)
    checkpoints.write_resume(state, spec.checkpoint)
    said = []
    assert launch.decide_resume(spec, say=said.append) is None
    assert "(train shards: manifest sha256 000000000000… → " in said[0]


def test_a_checkpoint_without_settings_is_set_aside_naming_it_unless_settings_json_vouches(tiny_dataset, tmp_path):
    """Issue 22, case 2: a last.ckpt without settings (an older flashnet, a backup, a warm start) was
    resumed under whatever the config said; an older run's settings.json beside it still counts."""
    spec = spec_of(tiny_dataset, tmp_path)
    interrupted_run(spec, settings=False)
    legacy = {"run": {k: v for k, v in spec.run.items() if k not in ("loggers", "mlflow_tracking_uri", "wandb_mode")},
              "train": checkpoints.sha256_file(tiny_dataset.train_manifest),
              "val": checkpoints.sha256_file(tiny_dataset.val_manifest)}
    (spec.checkpoint.parent / "settings.json").write_text(json.dumps(legacy))
    said = []
    assert launch.decide_resume(spec, say=said.append) == spec.checkpoint and said == []
    (spec.checkpoint.parent / "settings.json").unlink()
    assert launch.decide_resume(spec, say=said.append) is None
    (aside,) = tmp_path.glob("checkpoints.stale-*")
    assert said == [f"{spec.checkpoint} carries no run settings (written by an older flashnet or copied in), so "
                    f"nothing tells whether it fits this run; not resuming from it: moved it to {aside}; training "
                    "starts afresh"]


def test_another_device_layout_at_the_same_global_batch_resumes_and_says_so(tiny_dataset, tmp_path):
    spec = spec_of(tiny_dataset, tmp_path, devices_per_node=2)
    interrupted_run(spec)
    said = []
    one = spec_of(tiny_dataset, tmp_path, devices_per_node=1)
    assert launch.decide_resume(one, say=said.append) == one.checkpoint
    assert said == ["resuming on another layout (devices_per_node 2 → 1, per_device_batch 8 → 16, bn_span 8 → 16): "
                    "sample order and learning rate continue exactly; BatchNorm now normalises over 16 samples, so "
                    "the weights differ from an uninterrupted run's (summary.json's layout_changes records it)"]
    assert launch.describe_layout_change({**spec.run, "nodes": 2, "devices_per_node": 1}, spec.run) == (
        "resuming on another layout (nodes 2 → 1, devices_per_node 1 → 2): sample order, learning rate and BN span "
        "unchanged")
    said.clear()
    bigger = spec_of(tiny_dataset, tmp_path, devices_per_node=1, batch_size=32)  # another global batch
    assert launch.decide_resume(bigger, say=said.append) is None and "batch_size: 16 → 32" in said[0]


def test_the_set_aside_line_reaches_the_terminal_of_the_person_running_snakemake(tiny_dataset, tmp_path):
    """Issue 22, case 1: the line was only in the train log. The rule's waiting process passes its
    progress lines' ``say`` (fd 3 → Snakemake's stderr); the pickled job keeps no terminal."""
    import io
    import pickle

    from flashnet.watch import ProgressLines

    terminal = io.StringIO()
    interrupted_run(spec_of(tiny_dataset, tmp_path))
    job = launch.TrainJob(spec_of(tiny_dataset, tmp_path, lr=2.0), say=ProgressLines("train tiny", terminal).say)
    assert job.before_submit() == ""
    assert terminal.getvalue().startswith("[train tiny] the run's settings changed since ")
    assert "(lr: 1.0 → 2.0)" in terminal.getvalue()
    assert pickle.loads(pickle.dumps(job)).say is print
