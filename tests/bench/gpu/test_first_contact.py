"""scripts/gpu-first-contact.sh's dry path (FLASHNET_FIRST_CONTACT_DRY=1): the same steps as on a GPU
machine, small and on the CPU: sample shards, `flashnet train` killed after its first resume
checkpoint and run again (it must resume), a second run, then the benchmark's smoke path, all
inside the budget, with the results in the folder it names. Minutes on 2 cores: e2e."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.e2e
def test_first_contact_dry_run_trains_resumes_and_benchmarks_within_its_budget(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "FLASHNET_FIRST_CONTACT_DRY": "1", "FLASHNET_FIRST_CONTACT_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "scripts" / "gpu-first-contact.sh"), "1200", str(results)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:]
    assert f"Results in {results}" in done.stdout
    assert sorted(p.name for p in results.iterdir()) == [
        "first-contact.log", "gpu.json", "gpu.md", "summary-bf16.json", "summary-fp16.json", "train-bf16.log",
        "train-fp16.log"]
    assert "resuming from" in (results / "train-bf16.log").read_text()
    bf16 = json.loads((results / "summary-bf16.json").read_text())
    assert bf16["finished"] is True and bf16["steps"] == 3 * bf16["steps_per_epoch"]
    assert json.loads((results / "summary-fp16.json").read_text())["finished"] is True
    bench = json.loads((results / "gpu.json").read_text())
    assert bench["complete"] is True
    assert {(row["config"], row["status"]) for row in bench["results"]} == {("5", "ok"), ("2", "ok"), ("4", "ok")}
