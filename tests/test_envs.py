"""The conda environments (envs/*.yaml) pin what constraints.txt pins, and cover the package's
dependencies for their rules. No conda channel is reachable here, so they are checked, not built."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


# --- The lent GPU machine's environment (scripts/gpu-image-packages.txt + the carried wheels) ---------------------
#
# The machine holds only its image's distributions (Python 3.12) plus the wheels scripts/gpu-bench-prepare.sh
# carries (scripts/gpu_wheels.py derives them). Here (Python 3.11) the same environment is imitated by an import
# blocker: a meta-path finder, installed by a sitecustomize.py in every process of the run (loader workers
# included), refuses every top-level module whose distributions are all neither on the image nor carried. This
# checks the names; that the cp312 wheels themselves install there is the first contact's job
# (scripts/gpu-first-contact.sh).

BLOCKER = '''
import importlib.abc, json, os, sys

_BLOCKED = frozenset(json.loads(os.environ["FLASHNET_BLOCKED_MODULES"]))
_REFUSED_LOG = os.environ["FLASHNET_REFUSED_LOG"]


class RefuseOffImage(importlib.abc.MetaPathFinder):
    """No module of a distribution the GPU machine's image lacks (and the wheels do not bring)."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in _BLOCKED:
            with open(_REFUSED_LOG, "a") as log:
                log.write(top + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine's image)", name=name)
        return None


sys.meta_path.insert(0, RefuseOffImage())
'''

# Two steps of the real module through Trainer.fit, as a run builds and prepares it (on the CPU), and the
# modules `flashnet train` imports on the way to it (launcher, recipe, callbacks, checkpoints).
TWO_STEP_FIT = '''
import sys
import pytorch_lightning as pl
import flashnet.cli, flashnet.train.launch, flashnet.train.recipe  # noqa: F401  what `flashnet train` imports
from flashnet.bench.gpu.configs import CONFIGS, Scale
from flashnet.bench.gpu.loops import RepeatedBatch
from flashnet.bench.gpu.project import bench_run, build_module, prepare_like_recipe, synthetic_project_batch
import torch

torch.set_num_threads(1)
scale = Scale(model="resnet18", image_size=32, batch_size=4, steps=2, warmup=1, matmul_size=8, num_classes=10,
              smoke=True)
run = bench_run(CONFIGS["1"], scale, torch.device("cpu"), workers=0)
module = build_module(run, scale.num_classes)
prepare_like_recipe(module, torch.device("cpu"), None, smoke=True)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=sys.argv[1])
trainer.fit(module, train_dataloaders=RepeatedBatch(synthetic_project_batch(scale, torch.device("cpu")), 2))
print("global_step", trainer.global_step)
'''


def gpu_wheels():
    """scripts/gpu_wheels.py, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def modules_off_the_gpu_image(on_machine: set[str]) -> set[str]:
    """Top-level modules installed here whose distributions are all missing from ``on_machine``."""
    import importlib.metadata

    provided = importlib.metadata.packages_distributions()
    return {module for module, dists in provided.items()
            if module != "flashnet" and not {normalise(d) for d in dists} & on_machine}


def test_carried_wheels_are_what_the_gpu_image_lacks_of_the_projects_needs():
    wheels = gpu_wheels()
    carried = wheels.carried_wheels()
    # flashnet.config validates with jsonschema, which brings referencing, its specifications and rpds-py;
    # a run's MLPerf log is written by mlperf-logging (its pandas, numpy, scipy and PyYAML are on the image)
    assert set(carried) == {"braceexpand", "jsonschema", "jsonschema-specifications", "mlperf-logging", "referencing",
                            "rpds-py", "simplejpeg", "submitit", "webdataset"}
    assert carried["jsonschema"] == constraints()["jsonschema"]
    image = wheels.image_packages()
    assert {"torch", "torchvision", "pytorch-lightning", "torchmetrics", "attrs", "pyyaml"} <= image
    assert not set(carried) & image


def test_a_name_the_image_gains_is_no_longer_carried():
    wheels = gpu_wheels()
    assert "jsonschema" not in wheels.carried_wheels(wheels.image_packages() | {"jsonschema"})


def run_off_image(tmp_path, *command: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``command`` with every module off the GPU machine's image refused; returns what was refused."""
    wheels = gpu_wheels()
    blocked = modules_off_the_gpu_image(wheels.image_packages() | set(wheels.carried_wheels()))
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    refused = tmp_path / "refused.log"
    # Not the process group address of a DDP run earlier in this pytest process (the bench's own tests).
    inherited = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env = {**inherited, "FLASHNET_BLOCKED_MODULES": json.dumps(sorted(blocked)), "FLASHNET_REFUSED_LOG": str(refused),
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "workflow"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
    return done, set(refused.read_text().split()) if refused.exists() else set()


def test_the_blocker_refuses_what_the_gpu_image_lacks(tmp_path):
    done, refused = run_off_image(tmp_path, "-c", "import snakemake")
    assert done.returncode == 1 and "not on the GPU machine's image" in done.stderr
    assert refused == {"snakemake"}


def test_benchmark_smoke_and_two_training_steps_run_with_only_the_gpu_images_packages(tmp_path):
    out = tmp_path / "bench"
    done, refused = run_off_image(tmp_path, "-m", "flashnet.bench.gpu", "--smoke", "--configs", "5,2,4",
                                  "--batch-sizes", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert {row["status"] for row in report["results"]} == {"ok"}
    done, refused_fit = run_off_image(tmp_path, "-c", TWO_STEP_FIT, str(tmp_path / "fit"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global_step 2" in done.stdout
    # Optional imports that were tried and refused (the code runs without them): none of the project's own needs.
    needed = gpu_wheels().needed_distributions(gpu_wheels().project_requirements())
    assert not {normalise(name) for name in refused | refused_fit} & needed
