"""The smoke run of flashnet bench gpu, shared by the tests of its modules: one run of every
configuration at one batch size (the GPU's 32, a sixteenth of it here) on the CPU (about 40 s on 2
idle cores), its exit code, JSON report, markdown table and printed table. The dry run over every batch size
is tests/bench/gpu/test_gpu_cli.py's e2e test."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from flashnet.bench.gpu import cli


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["--smoke", "--configs", "all", "--batch-sizes", "32", "--out", str(out)])
    return code, json.loads((out / "gpu.json").read_text()), printed.getvalue(), (out / "gpu.md").read_text()

