"""Conversion jobs that survive being killed, rerun, run twice at once or with other settings: the
journal and the part lock (flashnet.data.journal), the shard format in every record, and a forced
rerun (--rewrite) that writes every shard again."""

from __future__ import annotations

import contextlib
import fcntl
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flashnet import cli
from flashnet.data import journal, shards

# Runs `flashnet write-shards` in a child process that SIGKILLs itself at a chosen moment:
# at the Nth call of a function of flashnet.data.shards, or right after a given shard is renamed
# to its final name (the moment between "the shard is complete" and "the journal says so").
KILLER = r"""
import os, signal, sys
from flashnet import cli
from flashnet.data import shards

how, what = sys.argv[1], sys.argv[2]
if how == "call":
    name, n = what.split(":")
    real, calls = getattr(shards, name), []
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(shards, name, dying)
else:
    real_replace = os.replace
    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        if os.path.basename(dst) == what:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
sys.exit(cli.main(sys.argv[3:]))
"""


def killed_write(run, split: str, part: int, how: str, what: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILLER, how, what, "write-shards", str(run.index_path(split)),
               "--part", str(part), "--parts", str(run.parts), "--out", str(run.part_paths(split)[part]),
               "--quality", str(run.quality)]
    if run.max_side is not None:
        command += ["--max-side", str(run.max_side)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


@pytest.fixture
def rewrites(monkeypatch):
    """The shards write_shard (re)writes in this process, in order."""
    written = []
    real = shards.write_shard

    def spy(plan, shard, *args, **kwargs):
        written.append(plan.shard_name(shard))
        return real(plan, shard, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", spy)
    return written


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def journal_path(run, split: str, part: int) -> Path:
    return run.shard_dir(split) / "parts" / f"{part}.journal.jsonl"


def test_job_killed_mid_shard_leaves_no_final_name_and_the_rerun_redoes_only_the_rest(
        official_results, sample_root, stage, rewrites):
    run = stage(sample_root / "official")
    run.index("train")
    killed_write(run, "train", 0, "call", "prepare_image:11")  # the 3rd image of the job's 2nd shard
    shard_dir = run.shard_dir("train")
    assert sorted(p.name for p in shard_dir.glob("train-*.tar")) == ["train-000000.tar"]
    leftovers = [p.name for p in shard_dir.glob(".train-000001.tar.tmp-*")]
    assert len(leftovers) == 1  # the half-written shard, under a name no reader takes for a shard
    assert not run.part_paths("train")[0].exists()
    first = identity(shard_dir / "train-000000.tar")

    run.write("train")
    assert rewrites == ["train-000001.tar", "train-000002.tar", "train-000003.tar"]
    assert identity(shard_dir / "train-000000.tar") == first
    assert not list(shard_dir.glob(".*tmp*")), "the rerun clears the killed job's temporary file"
    assert run.digests("train") == official_results.digests("train")
    assert run.manifest("train") == json.loads(official_results.manifest_path("train").read_text())


def test_job_killed_between_rename_and_journal_rewrites_that_shard(official_results, sample_root, stage, rewrites):
    run = stage(sample_root / "official")
    run.index("train")
    killed_write(run, "train", 1, "rename", "train-000002.tar")
    assert (run.shard_dir("train") / "train-000002.tar").exists()
    run.write("train", part=1)
    assert rewrites == ["train-000002.tar", "train-000003.tar"]
    run.write("train", part=0)
    assert run.digests("train") == official_results.digests("train")
    run.manifest("train")


def test_rerun_after_a_finished_job_rewrites_nothing(official_results, sample_root, stage, rewrites):
    run = stage(sample_root / "official")
    run.run("train")
    before = {p.name: identity(p) for p in run.shard_paths("train")}
    rewrites.clear()
    run.write("train")
    assert rewrites == []
    assert {p.name: identity(p) for p in run.shard_paths("train")} == before


def test_forcerun_rewrites_a_shard_damaged_since_its_journal_line(official_results, sample_root, stage, rewrites):
    """Issue 14, case 2: `--forcerun write_shards` deletes the parts' outputs and reruns them; the
    journal kept every shard whose size matched, a damaged one included. It now keeps only shards
    whose sha256 is the one it recorded (a rerun after a lost Snakemake must still keep those)."""
    run = stage(sample_root / "official")
    run.run("train")
    damaged = run.shard_dir("train") / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0x01
    damaged.write_bytes(bytes(data))
    for path in run.part_paths("train"):
        path.unlink()  # what Snakemake does to a forced job's outputs before running it
    rewrites.clear()
    run.write("train")
    assert rewrites == ["train-000001.tar"]
    assert run.digests("train") == official_results.digests("train")
    run.manifest("train")


def rewrite_journals(run, split: str, change) -> None:
    """Apply ``change`` to the settings of every finished record of the split's journals."""
    for path in (run.shard_dir(split) / "parts").glob("*.journal.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for line in lines:
            if "settings" in line:
                change(line["settings"])
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def as_before_the_format_had_a_name(settings: dict) -> None:
    del settings["format"]
    settings["conversion"] = 2  # what journals held before SHARD_FORMAT existed


@pytest.mark.parametrize("change", [as_before_the_format_had_a_name, lambda settings: settings.pop("format"),
                                    lambda settings: settings.update(format="flashnet-shards/1")],
                         ids=["conversion 2", "no format", "flashnet-shards/1"])
def test_shards_of_another_shard_format_are_rewritten_saying_so_once(official_results, sample_root, stage, rewrites,
                                                                     change, capsys):
    run = stage(sample_root / "official")
    run.run("train")
    rewrite_journals(run, "train", change)
    rewrites.clear()
    capsys.readouterr()
    run.write("train")
    assert rewrites == [p.name for p in run.shard_paths("train")]
    said = [line for line in capsys.readouterr().out.splitlines() if "another shard format" in line]
    assert [line.split(":")[0] for line in said] == [str(journal_path(run, "train", part)) for part in range(run.parts)]
    assert all(f"than {shards.SHARD_FORMAT} (2 in " in line for line in said), said
    rewrites.clear()
    run.write("train")
    assert rewrites == [], "the rewritten shards' records are of this format"
    assert run.digests("train") == official_results.digests("train")


def test_every_journal_record_names_the_shard_format(official_results, sample_root, stage):
    run = stage(sample_root / "official")
    run.run("train")
    for part in range(run.parts):
        lines = [json.loads(line) for line in journal_path(run, "train", part).read_text().splitlines()]
        assert lines and all(line.get("format", line.get("settings", {}).get("format")) == shards.SHARD_FORMAT
                             for line in lines)
        assert json.loads(run.part_paths("train")[part].read_text())["shard_format"] == shards.SHARD_FORMAT


def test_a_forced_rerun_rewrites_every_shard_of_its_part_under_the_lock(official_results, sample_root, stage,
                                                                        rewrites, monkeypatch, capsys):
    """`snakemake --forcerun write_shards` (or -F) passes --rewrite: the journal is not consulted, every
    shard of the part is written again (a new file: new inode), under the part's lock, atomically."""
    run = stage(sample_root / "official")
    run.run("train")
    before = {p.name: identity(p) for p in run.shard_paths("train")}
    journal_lines = journal_path(run, "train", 0).read_text().splitlines()
    locked = []
    real_lock = journal.part_lock

    def recording_lock(path):
        locked.append(path.name)
        return real_lock(path)

    monkeypatch.setattr(journal, "part_lock", recording_lock)
    rewrites.clear()
    part = run.part_paths("train")[0]
    assert cli.main(["write-shards", str(run.index_path("train")), "--part", "0", "--parts", str(run.parts),
                     "--out", str(part), "--quality", str(run.quality), "--rewrite"]) in (0, None)
    assert rewrites == ["train-000000.tar", "train-000001.tar"] and locked == ["0.lock"]
    after = {p.name: identity(p) for p in run.shard_paths("train")}
    assert all(after[name] != before[name] for name in rewrites)
    assert all(after[name] == before[name] for name in before if name not in rewrites), "part 1 is not touched"
    new_lines = [json.loads(line) for line in journal_path(run, "train", 0).read_text().splitlines()[len(journal_lines):]]
    assert [(line["name"], "writing" in line) for line in new_lines] == [
        ("train-000000.tar", True), ("train-000000.tar", False), ("train-000001.tar", True), ("train-000001.tar", False)]
    assert "forced rerun (--rewrite): writing every shard of part 0 again" in capsys.readouterr().out
    assert not list(run.shard_dir("train").glob(".*tmp*"))
    assert run.digests("train") == official_results.digests("train")

    rewrites.clear()
    run.write("train")  # an ordinary rerun after it keeps everything
    assert rewrites == []
    assert {p.name: identity(p) for p in run.shard_paths("train")} == after
    run.manifest("train")


def test_journal_line_cut_short_by_a_kill_is_dropped_and_later_lines_count(official_results, sample_root, stage,
                                                                           rewrites):
    run = stage(sample_root / "official")
    run.index("train")
    run.write("train", part=0)
    (run.shard_dir("train") / "train-000001.tar").unlink()
    with open(journal_path(run, "train", 0), "a") as f:
        f.write('{"bytes": 40960, "name": "train-0000')  # the kill came mid-line
    rewrites.clear()
    run.write("train", part=0)
    assert rewrites == ["train-000001.tar"]
    run.write("train", part=0)
    assert rewrites == ["train-000001.tar"], "the record after the torn line must be read"
    lines = journal_path(run, "train", 0).read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_a_second_job_of_a_part_waits_for_the_first_and_rewrites_nothing(official_results, sample_root, stage,
                                                                        rewrites, monkeypatch):
    """A rerun's job of a part that a killed Snakemake's job still converts (its lock held) waits,
    then finds every shard in the journal."""
    run = stage(sample_root / "official")
    run.index("train")
    lock_path = run.part_paths("train")[0].with_name("0.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first job, mid-part
        second = subprocess.Popen(
            [sys.executable, "-m", "flashnet", "write-shards", str(run.index_path("train")), "--part", "0",
             "--parts", str(run.parts), "--out", str(run.part_paths("train")[0]), "--quality", str(run.quality)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        waiting = second.stdout.readline()
        assert "another job is converting this part; waiting for it to end" in waiting, waiting
        assert second.poll() is None and not list(run.shard_dir("train").glob("*.tar"))
        with monkeypatch.context() as first_job:  # it holds the lock already (above)
            first_job.setattr(journal, "part_lock", lambda path: contextlib.nullcontext())
            run.write("train", part=0)
    first = {p.name: identity(p) for p in run.shard_dir("train").glob("*.tar")}
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 0, output
    assert rewrites == ["train-000000.tar", "train-000001.tar"]  # the first job's, in this process
    assert {p.name: identity(p) for p in run.shard_dir("train").glob("*.tar")} == first


def test_a_journal_made_with_other_settings_does_not_skip(official_results, sample_root, stage, rewrites):
    run = stage(sample_root / "official")
    run.run("train")
    rewrites.clear()
    smaller = stage(sample_root / "official", max_side=50)  # same folders, other settings
    smaller.write("train")
    assert rewrites == [f"train-{i:06d}.tar" for i in range(4)]
    assert smaller.manifest("train")["resized"] > 0
    assert all(a != b for a, b in zip(smaller.digests("train").values(), official_results.digests("train").values()))


def test_switching_settings_back_rewrites_shards_of_the_same_size(official_results, sample_root, stage, rewrites):
    """quality changes only the three converted images, so the shards keep their (512-byte padded)
    sizes: after 90 → 20 → 90 the journal's old records for quality 90 match the settings and the
    sizes, but the files hold quality 20. Only the newest journal line about a shard may count."""
    run = stage(sample_root / "official")
    run.run("train")
    low = stage(sample_root / "official", quality=20)
    low.write("train")
    changed = [n for n, d in low.digests("train").items() if d != official_results.digests("train")[n]]
    assert changed and all((run.shard_dir("train") / n).stat().st_size ==
                           (official_results.shard_dir("train") / n).stat().st_size for n in changed)
    rewrites.clear()
    run.write("train")
    assert set(changed) <= set(rewrites)
    assert run.digests("train") == official_results.digests("train")
    run.manifest("train")


def test_killed_rewrite_with_other_settings_does_not_leave_a_stale_shard(official_results, sample_root, stage):
    run = stage(sample_root / "official")
    run.run("train")
    low = stage(sample_root / "official", quality=20)
    # train-000000.tar holds a converted image, so quality 20 changes its bytes (not its size).
    killed_write(low, "train", 0, "rename", "train-000000.tar")
    assert run.digests("train")["train-000000.tar"] != official_results.digests("train")["train-000000.tar"]
    run.write("train")
    assert run.digests("train") == official_results.digests("train")
    run.manifest("train")
