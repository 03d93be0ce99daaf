"""A small ImageNet stand-in, written exactly as image-net.org (or Kaggle) ships the real one.

Each class is a procedurally drawn shape in its own colour on a textured background, at a random
position, size and rotation, so a small network learns it from a few hundred images while the
files look like ImageNet's: JPEGs of a few hundred pixels a side, a devkit whose ILSVRC2012_IDs are
*not* in sorted-WNID order, val files numbered in shuffled class order, and the odd files the real
train set holds (a CMYK JPEG, a PNG named .JPEG, a greyscale JPEG). Same seed, same bytes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import math
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_path, write_bytes
from . import sources

LAYOUTS = ("official", "extracted", "kaggle")
# Written first into every folder the generator fills: it writes only into an empty folder or one
# holding this file, never into a data set that happens to be where it was pointed.
MARKER = ".flashnet-sample-data"
# A fixed timestamp keeps the archives byte-identical from run to run (ILSVRC2012's release year).
ARCHIVE_MTIME = 1_338_000_000

SHAPES = ("disc", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon", "bar", "crescent")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "magenta": (200, 50, 190),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (110, 40, 160),
}
# Odd files planted in train, as (class index, encoding): the real train set has 22 CMYK JPEGs,
# one PNG named .JPEG and a few greyscale JPEGs.
ODD_FILES = ((0, "cmyk"), (1, "png"), (2, "grey"))


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    classes: int = 10
    train_per_class: int = 100
    val_per_class: int = 30
    min_side: int = 240
    max_side: int = 500
    quality: int = 90
    odd_files: bool = True
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SampleClass:
    ilsvrc_id: int
    wnid: str
    shape: str
    colour: str

    @property
    def words(self) -> str:
        return f"{self.colour} {self.shape}"


def sample_classes(spec: SampleSpec) -> list[SampleClass]:
    """Classes in ILSVRC2012_ID order; their WNIDs are deliberately not sorted in that order."""
    rng = np.random.default_rng([spec.seed, 1])
    numbers = rng.choice(np.arange(1_000_000, 9_999_999), size=spec.classes, replace=False)
    wnids = [f"n0{n}" for n in numbers]
    # Guarantee the devkit order differs from the sorted order, whatever the draw.
    if wnids == sorted(wnids):
        wnids = wnids[::-1]
    colours = list(COLOURS)
    return [
        SampleClass(i + 1, wnid, SHAPES[i % len(SHAPES)], colours[(i * 3 + i // len(SHAPES)) % len(colours)])
        for i, wnid in enumerate(wnids)
    ]


# --------------------------------------------------------------------------- drawing


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def polygon(n, radius_of=lambda k: r, offset=0.0):
        return [
            (cx + radius_of(k) * math.cos(angle + offset + 2 * math.pi * k / n),
             cy + radius_of(k) * math.sin(angle + offset + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if shape == "square":
        return polygon(4, offset=math.pi / 4)
    if shape == "triangle":
        return polygon(3)
    if shape == "diamond":
        return polygon(4, radius_of=lambda k: r if k % 2 == 0 else 0.55 * r)
    if shape == "hexagon":
        return polygon(6)
    if shape == "star":
        return polygon(10, radius_of=lambda k: r if k % 2 == 0 else 0.42 * r)
    if shape in ("cross", "bar"):
        w = 0.28 * r
        arms = [(-r, -w), (r, -w), (r, w), (-r, w)]
        pts = [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
               for x, y in arms]
        return pts
    raise ValueError(shape)


def draw_image(cls: SampleClass, rng: np.random.Generator, spec: SampleSpec) -> Image.Image:
    """One RGB image of ``cls``: textured background, the class shape, a few small distractors."""
    width, height = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    # Smooth colour field plus grain: compresses like a photograph rather than flat colour.
    coarse = rng.integers(40, 216, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    field += rng.normal(0, 10, size=field.shape).astype(np.int16)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    for _ in range(int(rng.integers(2, 5))):  # distractors: small, grey, never a class colour
        r = float(rng.uniform(0.03, 0.07)) * min(width, height)
        x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
        grey = int(rng.integers(60, 200))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey, grey, grey))

    colour = np.array(COLOURS[cls.colour]) + rng.integers(-25, 26, size=3)
    fill = tuple(int(c) for c in np.clip(colour, 0, 255))
    r = float(rng.uniform(0.22, 0.36)) * min(width, height)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    angle = float(rng.uniform(0, 2 * math.pi))
    outline = (0, 0, 0) if sum(fill) > 300 else (255, 255, 255)
    if cls.shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=3)
    elif cls.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(4, int(0.3 * r)))
    elif cls.shape == "crescent":
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        back = tuple(int(v) for v in np.asarray(image)[int(cy + dy), int(cx + dx)])
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx + dx - 0.8 * r, cy + dy - 0.8 * r, cx + dx + 0.8 * r, cy + dy + 0.8 * r], fill=back)
    elif cls.shape == "cross":
        draw.polygon(_shape_points("cross", cx, cy, r, angle), fill=fill)
        draw.polygon(_shape_points("cross", cx, cy, r, angle + math.pi / 2), fill=fill)
    else:
        draw.polygon(_shape_points(cls.shape, cx, cy, r, angle), fill=fill, outline=outline)
    return image


def encode(image: Image.Image, encoding: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, "PNG")
    elif encoding == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif encoding == "grey":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the dataset


@dataclasses.dataclass(frozen=True)
class SampleImage:
    key: str  # file stem: n01234567_10026 or ILSVRC2012_val_00000001
    cls: SampleClass
    data: bytes


def train_images(spec: SampleSpec, cls: SampleClass):
    """The train images of one class, in file-name order."""
    rng = np.random.default_rng([spec.seed, 2, cls.ilsvrc_id])
    numbers = np.sort(rng.choice(np.arange(1, 40_000), size=spec.train_per_class, replace=False))
    odd = {index: encoding for index, encoding in ODD_FILES} if spec.odd_files else {}
    for position, number in enumerate(numbers):
        image_rng = np.random.default_rng([spec.seed, 3, cls.ilsvrc_id, int(number)])
        encoding = odd.get(cls.ilsvrc_id - 1) if position == 0 else None
        data = encode(draw_image(cls, image_rng, spec), encoding or "jpeg", spec.quality)
        yield SampleImage(f"{cls.wnid}_{number}", cls, data)


def val_images(spec: SampleSpec, classes: list[SampleClass]):
    """Val images numbered 1..N in a shuffled class order, as the real val set is."""
    rng = np.random.default_rng([spec.seed, 4])
    order = rng.permutation(np.repeat(np.arange(len(classes)), spec.val_per_class))
    for number, class_index in enumerate(order, 1):
        cls = classes[int(class_index)]
        image_rng = np.random.default_rng([spec.seed, 5, number])
        data = encode(draw_image(cls, image_rng, spec), "jpeg", spec.quality)
        yield SampleImage(f"ILSVRC2012_val_{number:08d}", cls, data)


def _tar_bytes(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = ARCHIVE_MTIME
    info.mode = 0o644
    return info, io.BytesIO(data)


SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")


def synsets_mat(rows: list[tuple]) -> bytes:
    """A devkit ``meta.mat``: the ``synsets`` struct array, one row of :data:`SYNSET_FIELDS` values
    per synset, as MATLAB writes it (and scipy.io.loadmat reads it)."""
    from scipy.io import savemat

    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for i, row in enumerate(rows):
        for field, value in zip(SYNSET_FIELDS, row):
            synsets[i, 0][field] = value
    buffer = io.BytesIO()
    savemat(buffer, {"synsets": synsets})
    return _fixed_mat_header(buffer.getvalue())


def _meta_mat(classes: list[SampleClass], train_counts: dict[str, int]) -> bytes:
    """devkit data/meta.mat: leaves first, then two inner synsets (``num_children > 0``), as the
    real devkit has 860 of them after its 1000 leaves."""
    rows = [
        (c.ilsvrc_id, c.wnid, c.words, f"procedurally drawn {c.words}", 0, np.zeros((1, 0)), 0,
         train_counts[c.wnid])
        for c in classes
    ]
    leaf_ids = np.array([[c.ilsvrc_id for c in classes]], dtype=float)
    n = len(classes)
    rows.append((n + 1, "n00001740", "entity", "that which is perceived", 1, np.array([[n + 2]], float), 3, 0))
    rows.append((n + 2, "n00002684", "object", "a tangible thing", n, leaf_ids, 2, 0))
    return synsets_mat(rows)


def _fixed_mat_header(mat: bytes) -> bytes:
    """savemat stamps the current time into the file's 116-byte text header; a fixed text keeps
    the devkit byte-identical from run to run (readers look only at the version bytes after it)."""
    text = time.strftime("MATLAB 5.0 MAT-file Platform: posix, Created on: %a %b %d %H:%M:%S %Y",
                         time.gmtime(ARCHIVE_MTIME))
    return text.encode().ljust(116, b"\0") + mat[116:]


def _devkit(classes: list[SampleClass], train_counts: dict[str, int], val: list[SampleImage]) -> bytes:
    truth = "".join(f"{image.cls.ilsvrc_id}\n" for image in val).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in ((sources.DEVKIT_META, _meta_mat(classes, train_counts)), (sources.DEVKIT_VAL_TRUTH, truth)):
            tar.addfile(*_tar_bytes(name, data))
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0) as f:
        f.write(raw.getvalue())
    return compressed.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)


def claim_folder(out: Path) -> None:
    """Mark ``out`` as the generator's, refusing a folder that holds anything else."""
    if out.exists() and not out.is_dir():
        raise sources.DataError(f"{out}: is a file, not a folder for the sample data")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise sources.DataError(
            f"{out}: not empty and not written by the sample-data generator (no {MARKER}); it writes only into an "
            "empty folder or its own (an old sample-data folder: remove it and rerun)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by flashnet sample-data; the generator may overwrite this folder\n")


def write_sample_data(out: str | Path, spec: SampleSpec, layouts=("official",)) -> dict[str, int]:
    """Write the sample data under ``out`` in each layout named (each to its own folder when more
    than one: ``out/<layout>``). Returns the image counts per split."""
    out = Path(out)
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layout(s) {sorted(unknown)}; expected {LAYOUTS}")
    claim_folder(out)
    roots = {layout: out if len(layouts) == 1 else out / layout for layout in layouts}
    classes = sample_classes(spec)
    train_counts = {}

    with contextlib.ExitStack() as pending:
        official_train = None
        if "official" in roots:
            roots["official"].mkdir(parents=True, exist_ok=True)
            # Renamed to its final name when the stack closes, after everything else is written.
            train_tmp = pending.enter_context(atomic_path(roots["official"] / sources.OFFICIAL_TRAIN))
            official_train = pending.enter_context(tarfile.open(train_tmp, "w"))
        for cls in sorted(classes, key=lambda c: c.wnid):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as inner_tar:
                count = 0
                for image in train_images(spec, cls):
                    name = f"{image.key}.JPEG"
                    inner_tar.addfile(*_tar_bytes(name, image.data))
                    if "extracted" in roots:
                        _write(roots["extracted"] / "train" / cls.wnid / name, image.data)
                    if "kaggle" in roots:
                        _write(roots["kaggle"] / sources.KAGGLE_ROOT / "train" / cls.wnid / name, image.data)
                    count += 1
            train_counts[cls.wnid] = count
            if official_train is not None:
                official_train.addfile(*_tar_bytes(f"{cls.wnid}.tar", inner.getvalue()))
        if official_train is not None:
            official_train.close()

        val = list(val_images(spec, classes))
        for layout, root in roots.items():
            if layout == "official":
                buffer = io.BytesIO()
                with tarfile.open(fileobj=buffer, mode="w") as tar:
                    for image in val:
                        tar.addfile(*_tar_bytes(f"{image.key}.JPEG", image.data))
                _write(root / sources.OFFICIAL_VAL, buffer.getvalue())
                _write(root / sources.OFFICIAL_DEVKIT, _devkit(classes, train_counts, val))
            elif layout == "extracted":
                for image in val:
                    _write(root / "val" / image.cls.wnid / f"{image.key}.JPEG", image.data)
            else:
                for image in val:
                    _write(root / sources.KAGGLE_ROOT / "val" / f"{image.key}.JPEG", image.data)
                _write(root / sources.KAGGLE_SYNSETS,
                       "".join(f"{c.wnid} {c.words}\n" for c in sorted(classes, key=lambda c: c.wnid)).encode())
                lines = io.StringIO()
                writer = csv.writer(lines, lineterminator="\n")
                writer.writerow(["ImageId", "PredictionString"])
                for image in sorted(val, key=lambda i: i.key):
                    writer.writerow([image.key, f"{image.cls.wnid} 10 10 100 100"])
                _write(root / sources.KAGGLE_VAL_SOLUTION, lines.getvalue().encode())
    return {"train": sum(train_counts.values()), "val": len(val)}
