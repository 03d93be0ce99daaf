"""Tests of flashnet.bench.loader: a small run through the command line times both pipelines and
the decoders, and the table reports the ratio and the goal; also the older-version comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flashnet.bench import loader as bench

REPO = Path(__file__).resolve().parents[2]


def test_a_small_run_times_both_pipelines_against_each_other(tmp_path, capsys):
    # The --also copy is the current loader.py, imported as a module of its own: the path a
    # comparison with an older version (git show <commit>:workflow/flashnet/data/loader.py) takes.
    also = tmp_path / "loader_copy.py"
    also.write_text((REPO / "workflow/flashnet/data/loader.py").read_text())
    code = bench.main(["--images", "1000", "--size", "32", "--batch-size", "50", "--repeats", "1",
                       "--min-side", "48", "--max-side", "64", "--also", str(also), "--out", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["pipelines"]
    assert set(rows) == {bench.CANDIDATE, bench.BASELINE, f"{bench.CANDIDATE} (loader_copy.py)"}
    assert rows[bench.BASELINE]["ratio"] == 1.0
    assert all(row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0 for row in rows.values())
    assert report["images"]["count"] == 1000 and report["decode_only"]
    out = capsys.readouterr().out
    assert f"goal: {bench.CANDIDATE} >= 2x {bench.BASELINE} per core:" in out


def test_too_few_images_are_refused():
    proc = subprocess.run([sys.executable, "-m", "flashnet", "bench", "loader", "--images", "10"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--images must be at least 1000" in proc.stderr
