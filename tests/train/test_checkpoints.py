"""The resume checkpoint on disk: an intact one is always chosen, a damaged one never loaded."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
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


def test_write_keeps_the_previous_checkpoint_and_clears_a_killed_jobs_temporary_files(tmp_path):
    last = tmp_path / "last.ckpt"
    for leftover in (".last.ckpt.tmp", ".last.ckpt.tmp-4242"):  # a job killed mid-write (old and new names)
        (tmp_path / leftover).write_bytes(b"partial")
    checkpoints.write_resume({"weights": torch.full((10,), 1.0)}, last)
    checkpoints.write_resume({"weights": torch.full((10,), 2.0)}, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert torch.load(last)["weights"][0] == 2.0
    assert torch.load(checkpoints.previous_path(last))["weights"][0] == 1.0


def test_the_host_copy_is_independent_of_the_training_state():
    weights = torch.zeros(4)
    rows = [{"step": 1}]
    state = {"state_dict": {"w": weights}, "callbacks": {"records": {"steps": rows}}, "epoch": 0}
    copy = checkpoints.host_copy(state)
    weights += 1  # the next optimizer step, in place
    rows.append({"step": 2})  # the next log row
    assert copy["state_dict"]["w"].tolist() == [0.0] * 4
    assert copy["callbacks"]["records"]["steps"] == [{"step": 1}]


def test_the_background_writer_writes_one_at_a_time_and_reports_a_failure_naming_the_file(tmp_path):
    last = tmp_path / "last.ckpt"
    writer = checkpoints.BackgroundWriter(last)
    writer.start({"weights": torch.full((1000,), 1.0)})
    writer.start({"weights": torch.full((1000,), 2.0)})  # waits for the first
    writer.wait()
    assert not writer.busy
    assert torch.load(last)["weights"][0] == 2.0 and torch.load(checkpoints.previous_path(last))["weights"][0] == 1.0
    writer = checkpoints.BackgroundWriter(tmp_path / "gone" / "last.ckpt")  # a folder that is not there
    writer.start({"weights": torch.zeros(1)})
    with pytest.raises(OSError, match=f"writing the resume checkpoint {tmp_path / 'gone' / 'last.ckpt'} failed"):
        writer.wait()


def test_checkpoints_never_pass_through_tmpdir(tmp_path, monkeypatch):
    """Issue 22, case 3: Lightning's fsspec atomic save wrote the whole file to the system temp
    folder first; with a temp folder that cannot be written, the checkpoint is still written."""
    import tempfile

    (tmp_path / "a-file").write_text("")  # a temp folder under a file: nothing can create or write it
    monkeypatch.setenv("TMPDIR", str(tmp_path / "a-file" / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a-file" / "tmp"))
    with pytest.raises(NotADirectoryError):
        tempfile.mkstemp()  # what fsspec's transaction (Lightning's atomic save) does first
    last = tmp_path / "run" / "last.ckpt"
    last.parent.mkdir()
    checkpoints.write_resume({"weights": torch.ones(3)}, last)
    assert torch.load(last)["weights"].tolist() == [1.0] * 3


KILLED_WRITER = """
import sys, torch
from pathlib import Path
from flashnet.train import checkpoints
last = Path(sys.argv[1])
checkpoints.write_resume({"weights": torch.full((10,), 1.0)}, last)
writer = checkpoints.BackgroundWriter(last)
big = {f"layer{i}": torch.full((4_000_000,), 2.0) for i in range(20)}  # 320 MB: killed long before the end
writer.start(big)
print("writing", flush=True)
writer.wait()
"""


def test_a_kill_mid_write_leaves_the_previous_checkpoint_chosen(tmp_path):
    """Issue 20: the process dies while its background thread writes; the checkpoint before survives
    intact, is chosen, and the next write clears the partial file."""
    import signal
    import subprocess
    import sys
    import time

    last = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 1_000_000 for p in tmp_path.glob(".last.ckpt.tmp-*")):
        assert time.monotonic() < deadline and writer.poll() is None, "the write never started"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert checkpoints.choose_resume(last, say=None) == last
    assert torch.load(last)["weights"].tolist() == [1.0] * 10
    assert list(tmp_path.glob(".last.ckpt.tmp-*")), "the killed write left its partial file"
    checkpoints.write_resume({"weights": torch.full((10,), 3.0)}, last)
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))
    assert torch.load(checkpoints.previous_path(last))["weights"].tolist() == [1.0] * 10


def test_the_settings_travel_inside_the_checkpoint(tiny_dataset, tmp_path):
    settings = checkpoints.run_settings(tiny_dataset.run(), tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    last = tmp_path / "last.ckpt"
    checkpoints.write_resume({"state_dict": {"w": torch.zeros(2)}, checkpoints.SETTINGS_KEY: settings}, last)
    assert checkpoints.saved_settings(last) == settings
    assert settings["run"]["lr"] == tiny_dataset.run()["lr"] and len(settings["train"]) == 64
    checkpoints.write_resume({"state_dict": {"w": torch.zeros(2)}}, last)  # an older format
    assert checkpoints.saved_settings(last) is None
