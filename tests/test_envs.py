"""The conda environments (envs/*.yaml) pin what constraints.txt pins, and cover the package's
dependencies for their rules. No conda channel is reachable here, so they are checked, not built."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Which extras of pyproject.toml each environment serves (the core is always included).
ENV_EXTRAS = {"data": [], "train": ["train"], "report": ["report"]}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def env_pins(name: str) -> tuple[dict[str, str], list[str]]:
    env = yaml.safe_load((ROOT / "envs" / f"{name}.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins, others = {}, []
    for requirement in pip:
        if "==" in requirement:
            package, version = requirement.split("==")
            pins[normalise(package)] = version
        else:
            others.append(requirement)
    return pins, others


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalise(re.split(r"[<>=!\[; ]", r, maxsplit=1)[0]) for r in requirements}


@pytest.mark.parametrize("name", sorted(ENV_EXTRAS))
def test_env_pins_agree_with_constraints(name):
    pins, others = env_pins(name)
    expected = constraints()
    assert {p: v for p, v in pins.items() if expected.get(p) != v} == {}
    assert others == ["-e ${FLASHNET_ROOT}"]


@pytest.mark.parametrize("name, extras", sorted(ENV_EXTRAS.items()))
def test_env_covers_the_package_dependencies_of_its_rules(name, extras):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = requirement_names(project["dependencies"])
    for extra in extras:
        needed |= requirement_names(project["optional-dependencies"][extra])
    pins, _ = env_pins(name)
    assert needed - set(pins) == set()


def test_every_rule_names_an_environment():
    rules = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    assert len(re.findall(r"^rule \w+:", rules, re.M)) == rules.count("conda:")
    for env in re.findall(r'conda:\s*"\.\./\.\./(envs/\w+\.yaml)"', rules):
        assert (ROOT / env).exists()


def test_constraints_pin_every_dependency_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = requirement_names(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        names |= {n for n in requirement_names(requirements) if n != "flashnet"}
    assert names - set(constraints()) == set()
