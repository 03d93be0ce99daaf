"""Benchmarks: each times the project's code against a baseline in the same run (docs/benchmarks/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_data_module_copy(path: Path) -> ModuleType:
    """Another version of a ``flashnet.data`` module (say, from an older commit), imported inside
    that package so that its relative imports resolve, to be timed beside the current one."""
    name = f"flashnet.data._bench_{path.stem.replace('-', '_').replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
