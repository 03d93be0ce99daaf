"""The smoke run of flashnet bench gpu, shared by the tests of its modules: one run of every
configuration on the CPU (about 30 s on 2 cores), its exit code, JSON report and printed table."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from flashnet.bench.gpu import cli


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "results.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["--smoke", "--configs", "all", "--out", str(out)])
    return code, json.loads(out.read_text()), printed.getvalue()

