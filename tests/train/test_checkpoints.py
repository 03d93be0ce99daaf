"""The resume checkpoint on disk: an intact one is always chosen, a damaged one never loaded."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from flashnet.train import checkpoints


def write_checkpoint(path: Path, value: float) -> bytes:
    torch.save({"weights": torch.full((1000,), value)}, path)
    return path.read_bytes()


def test_a_truncated_newest_checkpoint_gives_way_to_the_previous_one(tmp_path):
    last = tmp_path / "last.ckpt"
    previous = checkpoints.previous_path(last)
    assert previous.name == "last.prev.ckpt"
    write_checkpoint(previous, 1.0)
    data = write_checkpoint(last, 2.0)
    last.write_bytes(data[: len(data) // 2])  # as a kill mid-write on a node that lost its cache leaves it
    said = []
    assert checkpoints.choose_resume(last, say=said.append) == previous
    assert said == [f"{last}: damaged resume checkpoint (BadZipFile: File is not a zip file); trying the previous "
                    "one, else training starts from scratch"]
    assert checkpoints.choose_resume(last, set_aside=True, say=None) == previous
    assert not last.exists() and len(list(tmp_path.glob("last.ckpt.damaged-*"))) == 1


def test_a_checkpoint_with_a_flipped_byte_fails_its_crc(tmp_path):
    last = tmp_path / "last.ckpt"
    data = bytearray(write_checkpoint(last, 3.0))
    with zipfile.ZipFile(last) as archive:
        info = next(i for i in archive.infolist() if i.file_size >= 4000)
    data[info.header_offset + 200] ^= 0xFF  # inside the stored tensor bytes
    last.write_bytes(bytes(data))
    assert "fails its CRC check" in checkpoints.damage(last)
    assert checkpoints.choose_resume(last, say=None) is None


def test_no_checkpoint_means_a_fresh_start_and_remove_takes_both(tmp_path):
    last = tmp_path / "last.ckpt"
    assert checkpoints.choose_resume(last) is None and not checkpoints.has_resume(last)
    write_checkpoint(last, 1.0)
    write_checkpoint(checkpoints.previous_path(last), 1.0)
    assert checkpoints.damage(last) is None
    checkpoints.remove_resume(last)
    assert list(tmp_path.iterdir()) == []


class FakeTrainer:
    """What save_resume asks of a Trainer: who writes, the write itself and the barrier."""

    def __init__(self, value: float, is_global_zero: bool = True):
        self.value, self.is_global_zero, self.barriers = value, is_global_zero, []
        self.strategy = self

    def save_checkpoint(self, path: Path) -> None:
        if self.is_global_zero:
            write_checkpoint(path, self.value)

    def barrier(self, name: str) -> None:
        self.barriers.append(name)


def test_save_keeps_the_previous_checkpoint_and_clears_a_killed_jobs_temporary_files(tmp_path):
    last = tmp_path / "last.ckpt"
    for leftover in (".last.ckpt.tmp", ".last.ckpt.tmp-4242"):  # a job killed mid-write (old and new names)
        (tmp_path / leftover).write_bytes(b"partial")
    checkpoints.save_resume(FakeTrainer(1.0), last)
    checkpoints.save_resume(FakeTrainer(2.0), last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert torch.load(last)["weights"][0] == 2.0
    assert torch.load(checkpoints.previous_path(last))["weights"][0] == 1.0


def test_other_ranks_write_nothing_but_join_the_barrier(tmp_path):
    other = FakeTrainer(1.0, is_global_zero=False)
    checkpoints.save_resume(other, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == [] and other.barriers == ["resume-checkpoint"]
