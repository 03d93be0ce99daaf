"""Tests of flashnet.bench.revision: a revision's package exported whole from git, into a folder that
goes away afterwards, and an unknown revision refused by name."""

from __future__ import annotations

import subprocess

import pytest

from flashnet.bench.revision import REPOSITORY, RevisionError, RevisionWorker, exported


def test_the_export_is_the_revisions_package_and_is_removed_afterwards():
    with exported("HEAD") as package_root:
        exported_loader = (package_root / "flashnet" / "data" / "loader.py").read_text()
        assert (package_root / "flashnet" / "__init__.py").exists()
    committed = subprocess.run(["git", "-C", str(REPOSITORY), "show", "HEAD:workflow/flashnet/data/loader.py"],
                               capture_output=True, text=True, check=True).stdout
    assert exported_loader == committed
    assert not package_root.exists()


def test_an_unknown_revision_is_refused_by_name():
    with pytest.raises(RevisionError, match="--also no-such-revision: git archive of workflow/flashnet"):
        with exported("no-such-revision"):
            pass


def test_a_worker_that_fails_says_so(tmp_path):
    # write_part.py on an index that is not there: the worker answers with the error, not silence
    with exported("HEAD") as package_root:
        worker = RevisionWorker("write_part.py", package_root, {
            "index": str(tmp_path / "missing.json"), "part": 0, "parts": 1, "journal": str(tmp_path / "0.json"),
            "quality": 90}, quiet=True)
        assert worker.answer() == {"ready": True}
        worker.send({"start": True})
        with pytest.raises(RuntimeError, match="write_part.py at the other revision: .*missing.json"):
            worker.answer()
        worker.close()
