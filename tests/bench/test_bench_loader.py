"""Tests of flashnet.bench.loader: a small run through the command line times both pipelines and
the decoders, and the table reports the ratio and the goal; also another revision's loader (--also REV)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flashnet
from flashnet.bench import loader as bench

PACKAGE = Path(flashnet.__file__).parent


def test_a_small_run_times_both_pipelines_against_each_other(tmp_path, capsys):
    # --also HEAD: the committed loader, in a process of its own (bench/revision.py), the path a
    # comparison with an older commit takes; this process's flashnet modules stay the installed ones.
    modules_before = set(sys.modules)
    code = bench.main(["--images", "1000", "--size", "32", "--batch-size", "50", "--repeats", "1",
                       "--min-side", "48", "--max-side", "64", "--also", "HEAD", "--out", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["pipelines"]
    assert set(rows) == {bench.CANDIDATE, bench.BASELINE, f"{bench.CANDIDATE} (HEAD)"}
    assert rows[bench.BASELINE]["ratio"] == 1.0
    assert all(row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0 for row in rows.values())
    assert report["images"]["count"] == 1000 and report["decode_only"]
    out = capsys.readouterr().out
    assert f"goal: {bench.CANDIDATE} >= 2x {bench.BASELINE} per core:" in out
    added = [name for name in set(sys.modules) - modules_before if name.startswith("flashnet")]
    assert all(Path(sys.modules[name].__file__).is_relative_to(PACKAGE) for name in added), added


def test_too_few_images_are_refused():
    proc = subprocess.run([sys.executable, "-m", "flashnet", "bench", "loader", "--images", "10"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--images must be at least 1000" in proc.stderr
