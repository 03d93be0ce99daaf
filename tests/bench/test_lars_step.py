"""The LARS step benchmark runs end to end (tiny: resnet18, a few steps) and reports every optimizer."""

from __future__ import annotations

import json

from flashnet.bench import lars_step


def test_benchmark_reports_all_three_optimizers(tmp_path, capsys):
    out = tmp_path / "lars.json"
    assert lars_step.main(["--device", "cpu", "--model", "resnet18", "--steps", "2", "--repeats", "1",
                           "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("torch SGD foreach", "flashnet LARS", "timm Lars"):
        assert name in printed
    assert json.loads(out.read_text())


def test_another_revisions_lars_is_timed_beside_the_current_one(tmp_path, capsys):
    out = tmp_path / "lars.json"
    assert lars_step.main(["--device", "cpu", "--model", "resnet18", "--steps", "1", "--repeats", "1",
                           "--warmup", "1", "--also", "HEAD", "--out", str(out)]) == 0
    assert "flashnet LARS (HEAD)" in capsys.readouterr().out
    rows = {row["optimizer"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["flashnet LARS (HEAD)"]["ms_per_step"] > 0
