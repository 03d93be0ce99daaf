"""Evaluation of a run's final checkpoint: exact over the val shards, and clear about bad input."""

from __future__ import annotations

import argparse
import csv
import json
import shutil

import pytest
import torch
import torchvision

from flashnet import evaluate, status
from flashnet.config import RunConfig
from flashnet.data.transforms import center_crop_box, decode_crop, normalize
from flashnet.data.manifest import read_shard_samples
from flashnet.data.sources import DataError
from flashnet.train.callbacks import StopRequest
from flashnet.train.recipe import TrainSpec, train

LOCAL = dict(cluster="local", cpus_per_task=1, ddp_timeout_s=120, poll_s=0.2)  # as the rule passes it


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    spec = TrainSpec("tiny", tiny_dataset.run(epochs=2), str(tiny_dataset.train_manifest),
                     str(tiny_dataset.val_manifest), str(out), tiny_dataset.launcher())
    train(spec, None, StopRequest())
    return out


def reference_predictions(model_path, val_manifest) -> tuple[int, int]:
    """(correct, total) computed directly: every val sample, decoded and classified one at a time."""
    record = torch.load(model_path, weights_only=True)
    run = RunConfig.from_dict(record["run"])
    model = torchvision.models.get_model(run.model, num_classes=record["num_classes"])
    model.load_state_dict(record["state_dict"])
    model.eval()
    manifest = json.loads(val_manifest.read_text())
    correct = total = 0
    for shard in manifest["shards"]:
        for _, fields in read_shard_samples(val_manifest.parent / shard["name"]):
            import simplejpeg

            height, width, _, _ = simplejpeg.decode_jpeg_header(fields["jpg"])
            box = center_crop_box(width, height, run.eval_resize, run.image_size)
            image = decode_crop(fields["jpg"], box, run.image_size).unsqueeze(0)
            with torch.no_grad():
                predicted = int(model(normalize(image, torch.contiguous_format)).argmax())
            correct += predicted == int(fields["cls"])
            total += 1
    return correct, total


def test_evaluation_counts_every_val_sample_once_and_agrees(trained, tiny_dataset):
    spec = evaluate.EvalSpec(str(trained / "model.pt"), str(tiny_dataset.val_manifest), batch_size=7, devices=1,
                             workers=2, launcher=tiny_dataset.launcher())
    results = evaluate.evaluate(spec, None)
    assert results["samples"] == 40
    correct, total = reference_predictions(trained / "model.pt", tiny_dataset.val_manifest)
    assert total == 40 and results["top1"] == pytest.approx(correct / total)
    with open(trained / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert results["top1"] == pytest.approx(float(last["val_top1"]), abs=1 / 40 + 1e-9)
    assert len(results["per_class_top1"]) == 4 and results["top5"] == 1.0  # 4 classes: top-5 is everything


def args_for(run_dir, tiny_dataset, out):
    return argparse.Namespace(run_dir=run_dir, val_manifest=tiny_dataset.val_manifest, launcher=LOCAL,
                              batch_size=10, devices=1, workers=0, out=out, progress_fd=None, log_file=None)


def test_evaluate_from_cli_writes_eval_json(trained, tiny_dataset, tmp_path):
    out = tmp_path / "eval.json"
    evaluate.evaluate_from_cli(args_for(trained, tiny_dataset, out))
    results = json.loads(out.read_text())
    assert results["samples"] == results["expected_samples"] == 40
    assert len(results["checkpoint_sha256"]) == 64 and results["wall_s"] > 0


def test_evaluation_over_three_ddp_processes_gives_the_same_result(trained, tiny_dataset, tmp_path):
    """Three local processes over gloo: the val shards dealt to ranks unevenly, so some ranks run
    masked padding batches; the gathered counts must equal one process's, sample for sample."""
    one, three = tmp_path / "one.json", tmp_path / "three.json"
    evaluate.evaluate_from_cli(args_for(trained, tiny_dataset, one))
    evaluate.evaluate_from_cli(argparse.Namespace(**{**vars(args_for(trained, tiny_dataset, three)), "devices": 3,
                                                     "batch_size": 7}))
    single, spread = json.loads(one.read_text()), json.loads(three.read_text())
    assert spread["samples"] == single["samples"] == 40
    for key in ("top1", "top5", "per_class_top1"):
        assert spread[key] == single[key], key


def test_unfinished_training_is_refused(trained, tiny_dataset, tmp_path):
    with pytest.raises(DataError, match="training did not finish"):
        evaluate.evaluate_from_cli(args_for(tmp_path, tiny_dataset, tmp_path / "eval.json"))


def test_a_sample_count_that_differs_from_the_manifest_fails(trained, tiny_dataset, tmp_path, monkeypatch):
    real = evaluate.run_job

    def one_short(*args, **kwargs):
        results = real(*args, **kwargs)
        return {**results, "samples": results["samples"] - 1}

    monkeypatch.setattr(evaluate, "run_job", one_short)
    with pytest.raises(DataError, match="evaluated 39 samples but .* lists 40"):
        evaluate.evaluate_from_cli(args_for(trained, tiny_dataset, tmp_path / "eval.json"))
    assert not (tmp_path / "eval.json").exists()


def test_a_val_shard_damaged_after_its_manifest_is_named_before_any_job(trained, tiny_dataset, tmp_path):
    """Issue 14, case 2: evaluation checked shard sizes only; a flipped byte keeps the size."""
    copy = tmp_path / "val"
    shutil.copytree(tiny_dataset.val_manifest.parent, copy)
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01
    shard.write_bytes(bytes(data))
    args = argparse.Namespace(**{**vars(args_for(trained, tiny_dataset, tmp_path / "eval.json")),
                                 "val_manifest": copy / "manifest.json"})
    with pytest.raises(DataError, match=rf"^{shard}: sha256 differs from {copy / 'manifest.json'}"):
        evaluate.evaluate_from_cli(args)
    assert not (trained / "jobs" / "active.json").exists() and not (tmp_path / "eval.json").exists()


def test_a_failed_evaluation_job_is_reported_on_stderr_as_training_is(trained, tiny_dataset, tmp_path, capsys):
    """Evaluation printed its job's failure to stdout, training to stderr: one message, one stream,
    through the job layer, and `flashnet status` reads it back from the rule's log."""
    args = argparse.Namespace(**{**vars(args_for(trained, tiny_dataset, tmp_path / "eval.json")), "workers": -1})
    with pytest.raises(SystemExit) as exit_:
        evaluate.evaluate_from_cli(args)  # a negative worker count fails inside the job
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert err.startswith("flashnet evaluate: job ") and "flashnet evaluate:" not in out, (out, err)
    assert status.failure(out + err, "evaluate").startswith("failed: ")
    assert not (tmp_path / "eval.json").exists()
