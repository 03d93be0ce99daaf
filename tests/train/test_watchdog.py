"""flashnet.train.watchdog: two real gloo ranks stepping in lockstep (an all-reduce per step), one of
them stopped with SIGSTOP; the other's watchdog dumps its stacks, names the stopped rank and ends
its process long before the collective timeout."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flashnet.config import LauncherConfig
from flashnet.train.watchdog import STALL_EXIT, Watchdog, WatchdogLimits, stall_message, stalled_ranks

LIMITS = WatchdogLimits(step_multiple=5, floor_s=1.0, grace_s=4.0)
COLLECTIVE_TIMEOUT_S = 120  # what would end the job without the watchdog


def test_limit_is_a_multiple_of_the_median_step_with_a_floor_and_a_grace():
    assert LIMITS.limit_s([0.1, 0.1, 0.1], graced=False) == 1.0  # 5 × 0.1 s is under the floor
    assert LIMITS.limit_s([0.5, 0.4, 9.0], graced=False) == 2.5  # the median, not one slow step
    assert LIMITS.limit_s([0.5, 0.4, 0.6], graced=True) == 4.0  # around validation and checkpoints
    assert LIMITS.limit_s([0.5], graced=False) == 4.0  # before the first measured steps


def test_the_launcher_limits_are_capped_below_the_collective_timeout():
    launcher = LauncherConfig.from_dict({"cluster": "local", "ddp_timeout_s": 120})
    limits = WatchdogLimits.from_launcher(launcher)
    assert (limits.step_multiple, limits.floor_s, limits.grace_s) == (20, 60, 60)  # grace 300 capped at 120 / 2


def test_silent_and_behind_ranks_are_named():
    answers = {0: {"step": 12, "where": "a"}, 2: {"step": 11, "where": "b"}, 3: {"step": 12, "where": "c"}}
    assert stalled_ranks(4, answers) == ([1], [2])
    message = stall_message(70, 60, 4, answers)
    assert "rank(s) 1 did not answer" in message and "rank(s) 2 are behind" in message
    assert "rank 2 after step 11 in b" in message


def test_start_up_never_trips_it_and_the_first_step_arms_it(tmp_path):
    exits = []
    watchdog = Watchdog(WatchdogLimits(step_multiple=5, floor_s=0.2, grace_s=0.5), tmp_path, exit=exits.append)
    trainer = types.SimpleNamespace(global_rank=0, world_size=1, global_step=0)
    watchdog.on_train_start(trainer, None)
    time.sleep(1.5)  # compiling, warming up: three grace periods without a step
    assert exits == []
    watchdog.on_train_batch_start(trainer, None, None, 0)  # the first step starts, and never ends
    time.sleep(1.5)
    assert exits == [STALL_EXIT]
    assert json.loads((tmp_path / "failure.json").read_text())["step"] == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, run_dir: Path, steps) -> None:
    """Steps forever: an all-reduce (the lockstep DDP imposes) and a batch end for the watchdog."""
    sys.stderr = open(run_dir / f"rank{rank}.log", "w", buffering=1)  # the job log, as a job's stderr is
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    trainer = types.SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
    watchdog = Watchdog(LIMITS, run_dir, answer_s=2.0)
    watchdog.on_train_start(trainer, None)
    value = torch.ones(1)
    while True:
        watchdog.on_train_batch_start(trainer, None, None, trainer.global_step)
        dist.all_reduce(value)
        trainer.global_step += 1
        watchdog.on_train_batch_end(trainer, None, None, None, trainer.global_step)
        steps[rank] = trainer.global_step
        time.sleep(0.05)


def run_and_stop(tmp_path: Path, stopped_rank: int) -> tuple[dict[int, int | None], float]:
    """Two ranks; ``stopped_rank`` is stopped after 20 steps. Returns each process's exit code (None:
    still there, stopped) and the seconds from the stop to the live rank's exit."""
    context = multiprocessing.get_context("fork")
    steps = context.Array("i", 2)
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, tmp_path, steps), daemon=True) for rank in (0, 1)]
    for process in ranks:
        process.start()
    live = ranks[1 - stopped_rank]
    try:
        deadline = time.monotonic() + 60
        while min(steps) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert min(steps) >= 20, f"the ranks did not step: {list(steps)}"
        os.kill(ranks[stopped_rank].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        live.join(timeout=60)
        took = time.monotonic() - stopped_at
        return {0: ranks[0].exitcode, 1: ranks[1].exitcode}, took
    finally:
        for process in ranks:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join()


@pytest.mark.parametrize("stopped_rank", [1, 0])
def test_a_stopped_rank_is_named_and_the_job_fails_long_before_the_collective_timeout(tmp_path, stopped_rank):
    codes, took = run_and_stop(tmp_path, stopped_rank)
    live = 1 - stopped_rank
    assert codes[live] == STALL_EXIT
    assert took < 20 < COLLECTIVE_TIMEOUT_S  # limit 1-4 s, 2 s for the answers (4 s when rank 0 is the one stopped)
    log = (tmp_path / f"rank{live}.log").read_text()
    assert "no training step for" in log
    assert "Most recent call first" in log or "most recent call first" in log  # faulthandler's stacks
    assert "_watch" in log and "all_reduce" in log  # the watchdog thread's and the main thread's frames
    assert f"rank(s) {stopped_rank} did not answer" in log
    record = json.loads((tmp_path / "failure.json").read_text())
    assert record["kind"] == "hung" and record["silent_ranks"] == [stopped_rank]
    assert f"rank {live} after step" in record["message"] or f"This is rank {live}, after step" in record["message"]
    if stopped_rank == 0:  # the store lives in rank 0's process: nobody can answer there
        assert "the rendezvous store on its node does not answer" in record["message"]


# --------------------------------------------------------------------------- a whole training job


@pytest.mark.e2e
def test_a_stopped_rank_fails_a_training_job_naming_it(tiny_dataset, tmp_path):
    """A 2-process local DDP job through submitit, rank 1 stopped mid-epoch: the job fails within
    the watchdog's limits (not ddp_timeout_s), rank 0's log names rank 1, and status says hung."""
    from flashnet.jobs import follow
    from flashnet.jobs.lock import JobFailed
    from flashnet.runfolder import failure_state, read_failure
    from flashnet.train import launch
    from flashnet.train.recipe import TrainSpec

    run = tiny_dataset.run(devices_per_node=2, batch_size=16, epochs=4, log_every_steps=1)
    launcher = tiny_dataset.launcher(ddp_timeout_s=300, poll_s=0.5, watchdog_step_multiple=10,
                                     watchdog_floor_s=3, watchdog_grace_s=60)
    out = tmp_path / "run"
    job = launch.submit_training(TrainSpec("hang", run, str(tiny_dataset.train_manifest),
                                           str(tiny_dataset.val_manifest), str(out), launcher))
    deadline = time.monotonic() + 300
    while " step 13/" not in (job.paths.stdout.read_text() if job.paths.stdout.exists() else ""):
        assert time.monotonic() < deadline, "step 13 not reached"
        time.sleep(0.2)
    found = subprocess.run(["pgrep", "-f", f"submitit.core._submit {out / 'jobs'}"], capture_output=True, text=True)
    pids = [int(pid) for pid in found.stdout.split()]
    rank1 = [pid for pid in pids if b"SUBMITIT_LOCAL_GLOBALID=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(rank1) == 1, pids
    os.kill(rank1[0], signal.SIGSTOP)
    stopped = time.monotonic()
    with pytest.raises(JobFailed):
        follow.wait(job, 0.5)
    assert time.monotonic() - stopped < 120 < 300  # the watchdog, not the collective timeout
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "rank(s) 1 did not answer" in log and "most recent call first" in log.lower()
    record = read_failure(out)
    assert record["kind"] == "hung" and record["silent_ranks"] == [1]
    assert failure_state(record).startswith("failed: hung: watchdog: no training step for")
