"""Benchmarks: each times the project's code against a baseline in the same run (docs/benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def import_data_module_copy(path: Path) -> ModuleType:
    """Another version of a ``flashnet.data`` module (say, from an older commit), imported inside
    that package so that its relative imports resolve, to be timed beside the current one."""
    name = f"flashnet.data._bench_{path.stem.replace('-', '_').replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """The benchmark's results as JSON at ``out`` (if given), replaced atomically: a run cut short
    keeps what it last wrote."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)
