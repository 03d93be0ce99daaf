#!/usr/bin/env python3
"""Which wheels a lent GPU machine needs carried to train and benchmark flashnet there.

The machine's image holds the distributions listed in ``scripts/gpu-image-packages.txt`` and
nothing can be fetched there. What the GPU path needs is the package's core dependencies plus its
``train`` extra (pyproject.toml), closed over each distribution's own ``Requires-Dist`` (read
from the metadata installed here, markers evaluated for CPython 3.12 on Linux x86-64); what the
image lacks of that is carried. For each, the version is constraints.txt's pin, else the one
installed here.

    scripts/gpu_wheels.py            one "name==version" a line (what gpu-bench-prepare.sh downloads)
    scripts/gpu_wheels.py --names    the names only

tests/test_envs.py imports this file and runs the benchmark and a training step with every
other top-level module refused (an import blocker), which checks the names, not the cp312 files.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = ROOT / "scripts" / "gpu-image-packages.txt"
# What a `flashnet train` and `flashnet bench gpu` on the machine import: the core and this extra.
GPU_EXTRAS = ("train",)
# The device machine's interpreter and platform, for requirement markers.
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def normalise(name: str) -> str:
    """PEP 503's normal form: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    names = {normalise(line.strip()) for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    if not names:
        raise ValueError(f"{path}: no package names")
    return names


def project_requirements(extras: tuple[str, ...] = GPU_EXTRAS) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether ``requirement`` holds on the device for a distribution installed with ``extras``."""
    if requirement.marker is None:
        return True
    marker: Marker = requirement.marker
    return any(marker.evaluate({**DEVICE_MARKERS, "extra": extra}) for extra in (extras or {""}))


def needed_distributions(requirements: list[Requirement], image: frozenset[str] = frozenset()) -> set[str]:
    """The requirements closed over their distributions' Requires-Dist (as installed here). The
    needs of a distribution on ``image`` are not followed: the image installed it with its own
    (pandas there brings its tzdata, whatever pandas here would ask for)."""
    needed: set[str] = set()
    todo = [(r, set()) for r in requirements]
    while todo:
        requirement, parent_extras = todo.pop()
        if not applies(requirement, parent_extras):
            continue
        name = normalise(requirement.name)
        key = name + "[" + ",".join(sorted(requirement.extras)) + "]"
        if key in needed:
            continue
        needed.update({name, key})
        if name in image:
            continue
        try:
            dependencies = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed on the device but not installed here, so its own needs are "
                             f"unknown; install the project (make install) first") from None
        todo += [(Requirement(line), set(requirement.extras)) for line in dependencies]
    return {n for n in needed if "[" not in n}


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            found[normalise(name)] = version
    return found


def carried_wheels(image: set[str] | None = None) -> dict[str, str]:
    """{distribution: version} for every needed distribution the device image lacks."""
    image = image_packages() if image is None else image
    missing = sorted(needed_distributions(project_requirements(), frozenset(image)) - image)
    pinned = pins()
    return {name: pinned.get(name) or metadata.version(name) for name in missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", action="store_true", help="names only, no versions")
    args = parser.parse_args(argv)
    for name, version in carried_wheels().items():
        print(name if args.names else f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
