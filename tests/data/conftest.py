"""Shared data for the data-stage tests: a tiny sample ImageNet in all three layouts, built once per
session, and the tools the tests use to run the stage on it or to damage a copy of it.

The sample data: 4 classes × 8 train images and 3 val images per class, 40–80 px a side, so the
whole data suite runs in seconds. With 8 samples per shard that is 4 train shards (2 per conversion
job) and 2 val shards (8 + 4). Tests never change the session's copy: they damage a ``layout_copy``.

The official-layout helpers (``read_official`` / ``write_official``) build the tars and the devkit
with tarfile and scipy directly, independently of the generator, so a test can write exactly the
broken archive it wants.

Test modules cannot import this file under ``--import-mode=importlib``, so the constants and helpers
they share come as one fixture, ``kit``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import shutil
import tarfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.io import loadmat

from flashnet.data import sample, shards, sources
from flashnet.data.manifest import build_manifest, read_shard_samples

SPEC = sample.SampleSpec(classes=4, train_per_class=8, val_per_class=3, min_side=40, max_side=80, quality=90,
                         odd_files=True, seed=0)
COUNTS = {"train": 32, "val": 12}
SAMPLES_PER_SHARD = 8
PARTS = 2
MTIME = 1_338_000_000


# --------------------------------------------------------------------------- the sample data


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The sample data in every layout: ``<root>/official``, ``<root>/extracted``, ``<root>/kaggle``."""
    root = tmp_path_factory.mktemp("sample-imagenet")
    counts = sample.write_sample_data(root, SPEC, layouts=sample.LAYOUTS)
    assert counts == COUNTS
    return root


@pytest.fixture
def layout_copy(sample_root, tmp_path):
    """``layout_copy("kaggle")``: a private copy of one layout that the test may damage."""

    def copy(layout: str) -> Path:
        dest = tmp_path / f"data-{layout}"
        shutil.copytree(sample_root / layout, dest)
        return dest

    return copy


# --------------------------------------------------------------------------- running the stage


@dataclasses.dataclass
class Stage:
    """The data stage in-process, the way the rules chain it: index → write_part per job → manifest."""

    data_dir: Path
    out: Path  # results/shards
    seed: int = 0
    samples_per_shard: int = SAMPLES_PER_SHARD
    parts: int = PARTS
    max_side: int | None = None
    quality: int = 90
    max_rejected: int = 10

    def shard_dir(self, split: str) -> Path:
        return self.out / split

    def index_path(self, split: str) -> Path:
        return self.shard_dir(split) / "index.json"

    def part_paths(self, split: str) -> list[Path]:
        return [self.shard_dir(split) / "parts" / f"{part}.json" for part in range(self.parts)]

    def manifest_path(self, split: str) -> Path:
        return self.shard_dir(split) / "manifest.json"

    def index(self, split: str) -> sources.SplitIndex:
        index = sources.index_split(self.data_dir, split)
        shards.save_index(shards.shuffled(index, self.seed), self.data_dir, self.samples_per_shard, self.seed,
                          self.index_path(split))
        return index

    def write(self, split: str, part: int | None = None) -> list[dict[str, Any]]:
        parts = range(self.parts) if part is None else [part]
        return [shards.write_part(self.index_path(split), p, self.parts, self.part_paths(split)[p], self.max_side,
                                  self.quality) for p in parts]

    def manifest(self, split: str) -> dict[str, Any]:
        return build_manifest(self.index_path(split), self.part_paths(split), self.manifest_path(split),
                              self.max_rejected)

    def run(self, split: str) -> dict[str, Any]:
        self.index(split)
        self.write(split)
        return self.manifest(split)

    def shard_paths(self, split: str) -> list[Path]:
        return sorted(self.shard_dir(split).glob(f"{split}-*.tar"))

    def digests(self, split: str) -> dict[str, str]:
        return {path.name: sha256(path.read_bytes()) for path in self.shard_paths(split)}

    def samples(self, split: str) -> list[tuple[str, dict[str, bytes]]]:
        """Every (key, fields) of the split's shards, in shard order."""
        return [item for path in self.shard_paths(split) for item in read_shard_samples(path)]


@pytest.fixture
def stage(tmp_path):
    """``stage(data_dir, **settings)``: a :class:`Stage` writing under this test's tmp_path."""
    made = []

    def make(data_dir: Path, name: str = "results", **settings) -> Stage:
        made.append(Stage(Path(data_dir), tmp_path / name / "shards", **settings))
        return made[-1]

    return make


@pytest.fixture(scope="session")
def official_results(sample_root, tmp_path_factory) -> Stage:
    """Both splits of the official layout written once with the default settings; read-only for
    tests (copy ``shard_dir`` before changing anything)."""
    run = Stage(sample_root / "official", tmp_path_factory.mktemp("official-results") / "shards")
    for split in sources.SPLITS:
        run.run(split)
    return run


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- official archives, by hand


@dataclasses.dataclass
class Official:
    """The contents of an official-layout data_dir, as plain values a test can change.

    ``synsets``: the devkit's leaf synsets as (ILSVRC2012_ID, WNID, num_train_images), in devkit
    order; ``train``: WNID → inner-tar members (name, bytes), in outer-tar order; ``val``: val-tar
    members; ``truth``: the ground truth, one ILSVRC2012_ID per val image in file-number order.
    """

    synsets: list[tuple[int, str, int]]
    train: dict[str, list[tuple[str, bytes]]]
    val: list[tuple[str, bytes]]
    truth: list[int]


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain tar of ``members``, names written as given (even absolute or with '..')."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_official(data_dir: Path) -> Official:
    with tarfile.open(data_dir / sources.OFFICIAL_DEVKIT, "r:gz") as tar:
        meta = tar.extractfile(sources.DEVKIT_META).read()
        truth = [int(v) for v in tar.extractfile(sources.DEVKIT_VAL_TRUTH).read().split()]
    table = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    synsets = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_train_images"]))
               for s in table if int(s["num_children"]) == 0]
    train = {name.removesuffix(".tar"): tar_members(data)
             for name, data in tar_members((data_dir / sources.OFFICIAL_TRAIN).read_bytes())}
    val = tar_members((data_dir / sources.OFFICIAL_VAL).read_bytes())
    return Official(synsets, train, val, truth)


def meta_mat(synsets: list[tuple[int, str, int]]) -> bytes:
    """devkit data/meta.mat: leaf synsets and one inner synset (``num_children`` > 0), which the
    reader must skip, as it skips the real devkit's 860."""
    rows = [(i, wnid, f"class {wnid}", "", 0, np.zeros((1, 0)), 0, count) for i, wnid, count in synsets]
    leaf_ids = np.array([[i for i, _, _ in synsets]], dtype=float)
    rows.append((len(synsets) + 1, "n00001740", "entity", "", len(synsets), leaf_ids, 1, 0))
    return sample.synsets_mat(rows)


def write_official(data_dir: Path, official: Official) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    outer = [(f"{wnid}.tar", tar_bytes(members)) for wnid, members in official.train.items()]
    (data_dir / sources.OFFICIAL_TRAIN).write_bytes(tar_bytes(outer))
    (data_dir / sources.OFFICIAL_VAL).write_bytes(tar_bytes(official.val))
    truth = "".join(f"{i}\n" for i in official.truth).encode()
    devkit = tar_bytes([(sources.DEVKIT_META, meta_mat(official.synsets)), (sources.DEVKIT_VAL_TRUTH, truth)])
    (data_dir / sources.OFFICIAL_DEVKIT).write_bytes(gzip.compress(devkit, mtime=0))
    return data_dir


@pytest.fixture
def official_parts(sample_root) -> Official:
    """The sample data's official layout as an :class:`Official` (a fresh copy per test)."""
    return read_official(sample_root / "official")


# --------------------------------------------------------------------------- bad images


def truncated_jpeg(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 2]


def corrupt_jpeg(jpeg: bytes) -> bytes:
    """Garbage over the middle of the entropy-coded data, headers intact: a decoder that does not
    check finds nothing wrong until it has decoded the whole image."""
    damaged = bytearray(jpeg)
    middle = len(damaged) // 2
    damaged[middle: middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    return bytes(damaged)


@pytest.fixture(scope="session")
def kit() -> types.SimpleNamespace:
    """The constants and helpers above, for test modules (which cannot import conftest)."""
    return types.SimpleNamespace(
        SPEC=SPEC, COUNTS=COUNTS, SAMPLES_PER_SHARD=SAMPLES_PER_SHARD, PARTS=PARTS, Stage=Stage, Official=Official,
        sha256=sha256, tar_members=tar_members, tar_bytes=tar_bytes, read_official=read_official,
        write_official=write_official, meta_mat=meta_mat, truncated_jpeg=truncated_jpeg, corrupt_jpeg=corrupt_jpeg,
    )
