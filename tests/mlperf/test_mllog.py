"""flashnet.mlperf.mllog lines, read back by MLCommons' own parser (mlperf-logging)."""

from __future__ import annotations

from pathlib import Path

from mlperf_logging.compliance_checker.mlp_parser import parse_file

from flashnet.mlperf import mllog
from flashnet.resolve import IMAGENET_TRAIN_IMAGES, Resolved, mllog_lines, resolve_run


def test_lines_parse_with_mlcommons_parser(tmp_path):
    run, _ = resolve_run("mlperf-lars-b3264", [])
    lines = mllog_lines(Resolved.of(run, IMAGENET_TRAIN_IMAGES))
    lines.append(mllog.line("eval_accuracy", 0.7601, {"epoch_num": 35}, time_ms=1_700_000_000_000))
    path = tmp_path / "mllog.txt"
    path.write_text("\n".join(lines) + "\n")
    parsed, errors = parse_file(str(path), ruleset="4.0.0")
    assert errors == []
    values = {line.key: line.value["value"] for line in parsed}
    assert values["lars_opt_learning_rate_decay_steps"] == 14523 and values["model_bn_span"] == 204
    last = parsed[-1]
    assert last.timestamp == 1_700_000_000_000 and last.value["metadata"]["epoch_num"] == 35
    assert Path(last.value["metadata"]["file"]).name == "test_mllog.py"  # the caller, as mllog records it
