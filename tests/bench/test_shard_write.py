"""Tests of flashnet.bench.shard_write beside tests/test_cli_data.py's run through the command line:
another revision's write_part (--also REV) timed in processes of its own, leaving this process's
modules as they were."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import flashnet
from flashnet.bench import shard_write as bench

PACKAGE = Path(flashnet.__file__).parent


def test_another_revision_is_timed_in_its_own_processes(tmp_path):
    modules_before = set(sys.modules)
    code = bench.main(["--images", "20", "--repeats", "1", "--jobs", "1", "--samples-per-shard", "8",
                       "--no-diagnostics", "--also", "HEAD", "--workdir", str(tmp_path / "work"),
                       "--out", str(tmp_path / "bench.json")])
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {row["what"] for row in report["summary"]} == {"tar -cf", "tar -cf + fsync", "write_part",
                                                          "write_part (check: header)", "write_part (HEAD)"}
    assert [t["samples"] for t in report["timings"] if t["what"] == "write_part (HEAD)"] == [[20]]
    added = [name for name in set(sys.modules) - modules_before if name.startswith("flashnet")]
    assert all(Path(sys.modules[name].__file__).is_relative_to(PACKAGE) for name in added), added


def test_an_unknown_revision_is_refused_before_anything_is_timed(tmp_path, capsys):
    code = bench.main(["--images", "20", "--also", "no-such-revision", "--workdir", str(tmp_path)])
    assert code == 2
    assert "flashnet bench shards: --also no-such-revision: git archive" in capsys.readouterr().err
