"""flashnet bench epoch: the per-epoch arithmetic over a run folder's files, the 2,048-rank
simulation at this revision and at another (--also), and a tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flashnet
from flashnet.bench import epoch
from flashnet.bench.revision import exported

CURRENT = Path(flashnet.__file__).resolve().parents[1]


def write_run_folder(out: Path, walls: list[float], validations: dict[int, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["step,epoch,wall_s,lr,train_loss,images_per_s"]
    lines += [f"{step},{step / 15},{wall},0.1,1.0,10" for step, wall in enumerate(walls, start=1)]
    (out / "steps.csv").write_text("\n".join(lines) + "\n")
    rows = ["epoch,step,wall_s,train_loss,val_top1,val_top5,images_per_s,lr,validation_s"]
    rows += [f"{e},{15 * e},0,1,0.5,0.9,10,0.1,{seconds}" for e, seconds in validations.items()]
    (out / "metrics.csv").write_text("\n".join(rows) + "\n")
    (out / "summary.json").write_text(json.dumps({"train_seconds": walls[-1], "checkpoints": 2}))


def test_per_epoch_time_outside_is_each_gap_less_a_median_step_and_its_validation(tmp_path):
    # 3 epochs of 15 steps of 0.1 s; the gap after epoch 1 is 0.35 s (0.25 s outside the steps),
    # the one after epoch 2 is 2.15 s with a 2 s validation (0.05 s outside)
    durations = [0.1] * 45
    durations[15], durations[30] = 0.35, 2.15  # the first step of epochs 2 and 3
    walls = [round(sum(durations[:i + 1]), 6) for i in range(45)]
    write_run_folder(tmp_path, walls, {2: 2.0, 3: 2.0})
    figures = epoch.epoch_figures(tmp_path, 3)
    assert figures["median_step_ms"] == 100.0
    assert figures["outside_ms_per_epoch"] == [250.0, 50.0]
    assert figures["outside_ms_per_epoch_mean"] == 150.0 and figures["step_spread_ms"] == 0.0
    assert figures["validation_s"] == [2.0, 2.0] and figures["clock"]["checkpoints"] == 2


def test_a_run_with_other_than_15_steps_an_epoch_is_refused(tmp_path):
    write_run_folder(tmp_path, [0.1 * i for i in range(1, 33)], {2: 1.0})
    with pytest.raises(RuntimeError, match="32 steps, 3 epochs of 15"):
        epoch.epoch_figures(tmp_path, 3)


def test_val_balance_against_the_balanced_share():
    plan = {"plan": "p", "samples": [256, 0, 0, 44], "batches": [7, 7, 7, 7]}
    balance = epoch.val_balance(plan, 300, 4, 40)
    assert balance["balanced_share"] == 75.0 and balance["samples_ratio"] == round(256 / 75, 2)
    assert balance["batches_ratio"] == 3.5 and balance["ranks_with_no_samples"] == 2  # 7 batches, 2 balanced


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench-epoch")
    args = epoch.parse_args(["--per-device-batch", "2", "--val-images", "40", "--epochs", "2"])
    return workdir, args, epoch.prepare_data(workdir, args), epoch.resume_checkpoint_sample(workdir)


def test_the_data_gives_15_steps_an_epoch(bench_data):
    _, args, (train_manifest, _), _ = bench_data
    assert json.loads(train_manifest.read_text())["samples"] // (epoch.WORLD * args.per_device_batch) == 15


def test_simulation_here_and_at_another_revision(bench_data):
    workdir, _, manifests, checkpoint = bench_data
    here = epoch.simulate(CURRENT, manifests, checkpoint)
    with exported("HEAD", with_schemas=True) as package_root:
        there = epoch.simulate(package_root, manifests, checkpoint)
    for result in (here, there):
        assert result["val"]["balanced_share"] == pytest.approx(50_000 / 2048, abs=0.01)
        startup = result["startup"]
        assert startup["rank_0"]["checkpoint_bytes_read"] == epoch.RESNET50_CHECKPOINT_BYTES
        assert startup["counted_on_bench_data"]["resume_found"]
        assert startup["rank_0"]["stat"] > startup["imagenet_shards"]  # at least one stat per shard
    # this revision checks once on rank 0: the other ranks only read the two manifests
    assert here["startup"]["done_by"] == "rank 0"
    assert here["startup"]["each_other_rank"]["checkpoint_bytes_read"] == 0
    assert here["startup"]["each_other_rank"]["stat"] <= 2


def test_a_tiny_real_run(bench_data, capsys):
    """The real `flashnet train` job on 2 gloo ranks, 2 epochs of 15 steps (resnet18 at 16 px)."""
    workdir, _, _, _ = bench_data
    out = workdir / "report.json"
    assert epoch.main(["--workdir", str(workdir), "--epochs", "2", "--model", "resnet18", "--per-device-batch", "2",
                       "--val-images", "40", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    run = report["results"]["current"]["run"]
    assert len(run["outside_ms_per_epoch"]) == 1 and run["median_step_ms"] > 0
    assert run["clock"]["validations"] == 1 and len(run["validation_s"]) == 1  # after the last epoch only
    assert "outside the steps and validation per epoch" in capsys.readouterr().out
