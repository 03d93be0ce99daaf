"""A hang watchdog in every training job: a daemon thread per rank that fails the job, naming the
stalled rank(s), long before the collective timeout (``ddp_timeout_s``) would end it anonymously.

A stopped process or a dead NIC holds every other rank inside a collective; nothing raises until the
timeout, and then the error names no rank. Here each rank's thread looks, every few seconds, at the
time of the last training step (the only thing the training path does for it: a time stamp and a
step interval stored in memory at each batch end). When no step came for

    max(watchdog_floor_s, watchdog_step_multiple × median step time)

(``watchdog_grace_s`` instead from the start of this rank's first step, and from the start of a
validation or a checkpoint until the next training step, that step included; before this rank's
first step, through start-up, warm-up and compilation, only the collective timeout applies), the
thread

1. writes every thread's Python stack of this rank into its job log (``faulthandler``);
2. answers in the job's rendezvous store (the c10d TCPStore on rank 0's node, through a connection
   of its own) with its last step and the
   innermost frame its main thread waits in; the first rank to answer waits
   ``ANSWER_S`` for the others and names the stalled ones: ranks that never answered (stopped,
   dead, or cut off) and ranks behind the others' step;
3. records the failure (``failure.json``, kind ``hung``), ends what cannot end itself (SLURM: the
   job is cancelled; local: the silent ranks' processes of this job are killed) and ends the
   process with :data:`STALL_EXIT`. The first rank to answer exits last, after writing the record.

Nothing happens in the store until a rank detects a stall, so a healthy run costs no collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl

from ..runfolder import record_failure

STALL_EXIT = 75  # the process's exit status after a detected stall
ANSWER_S = 15.0  # how long the first rank to answer waits for the others
KEY = "flashnet/watchdog"
INTERVALS = 64  # recent step intervals the median is taken over
WARM_INTERVALS = 3  # fewer measured steps than this: the grace allowance still holds


@dataclasses.dataclass(frozen=True)
class WatchdogLimits:
    """When a stall is declared (the launcher's ``watchdog_*`` keys)."""

    step_multiple: float  # no step for this many median step times; 0: no watchdog
    floor_s: float  # ... but never less than this
    grace_s: float  # the first steps, and from a validation's or checkpoint's start to the next step's end

    @classmethod
    def from_launcher(cls, launcher) -> "WatchdogLimits":
        """The launcher's limits, each capped at half of ``ddp_timeout_s``: the watchdog must speak
        before the collective timeout ends the job without naming anyone."""
        cap = launcher.ddp_timeout_s / 2
        return cls(launcher.watchdog_step_multiple, min(launcher.watchdog_floor_s, cap),
                   min(launcher.watchdog_grace_s, cap))

    def limit_s(self, intervals: list[float], graced: bool) -> float:
        if graced or len(intervals) < WARM_INTERVALS:
            return self.grace_s
        return max(self.floor_s, self.step_multiple * statistics.median(intervals))

    @property
    def poll_s(self) -> float:
        return max(0.2, min(5.0, self.floor_s / 5))


def main_thread_frame() -> str:
    """``file:line in function`` of the innermost Python frame the main thread is in."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} in {frame.f_code.co_name}"


def stalled_ranks(world_size: int, answers: dict[int, dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ranks that never answered, ranks that answered from a step behind the furthest one)."""
    silent = [rank for rank in range(world_size) if rank not in answers]
    furthest = max((answer["step"] for answer in answers.values()), default=0)
    behind = sorted(rank for rank, answer in answers.items() if answer["step"] < furthest)
    return silent, behind


def stall_message(quiet_s: float, limit_s: float, world_size: int, answers: dict[int, dict[str, Any]]) -> str:
    silent, behind = stalled_ranks(world_size, answers)
    parts = [f"watchdog: no training step for {quiet_s:.3g} s (limit {limit_s:.3g} s); "]
    if silent:
        parts.append(f"rank(s) {', '.join(map(str, silent))} did not answer (stopped, dead or unreachable: "
                     "look at that node)")
    if behind:
        parts.append(("; " if silent else "") + f"rank(s) {', '.join(map(str, behind))} are behind the others' step")
    if not silent and not behind:
        parts.append("every rank answered from the same step: look at the stacks for the odd one out")
    where = "; ".join(f"rank {rank} after step {a['step']} in {a['where']}" for rank, a in sorted(answers.items()))
    return "".join(parts) + f". Where each answering rank waits: {where or 'none answered'}. Failing the job."


def with_deadline(seconds: float, work: Callable[[], Any]) -> Any:
    """``work()``'s result, or None when it has not returned within ``seconds`` (a store whose host
    is stopped never answers; the thread doing it is left behind, a daemon)."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(work()), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None


class Watchdog(pl.Callback):
    """The job's hang watchdog on this rank (module docstring); started at the start of training."""

    def __init__(self, limits: WatchdogLimits, run_dir: Path, answer_s: float = ANSWER_S,
                 exit: Callable[[int], None] = os._exit):
        self.limits, self.run_dir, self.answer_s, self._exit = limits, Path(run_dir), answer_s, exit
        self._intervals: list[float] = []  # a ring of the last INTERVALS step intervals
        self._count = 0
        self._last_beat = time.monotonic()
        self._graced = True
        self._armed = False  # before this rank's first step (start-up, compilation) the collective timeout rules
        self._step = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.rank, self.world_size, self.address, self.store = 0, 1, None, None

    # ---- on the training path: a time stamp and an interval in memory, nothing else
    def on_train_start(self, trainer, pl_module) -> None:
        if self.limits.step_multiple <= 0 or self._thread is not None:
            return
        self.rank, self.world_size, self.address = trainer.global_rank, trainer.world_size, rendezvous_address()
        self._step = trainer.global_step
        self._grace()
        self._thread = threading.Thread(target=self._watch, name="flashnet-watchdog", daemon=True)
        self._thread.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # After a long phase (start-up, warm-up and compilation, validation, a checkpoint) the
        # allowance runs from the step that follows it; the first step arms the watchdog.
        if self._graced:
            self._armed, self._last_beat = True, time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if not self._graced:
            interval = now - self._last_beat
            if len(self._intervals) < INTERVALS:
                self._intervals.append(interval)
            else:
                self._intervals[self._count % INTERVALS] = interval
            self._count += 1
        self._last_beat, self._graced, self._step = now, False, trainer.global_step

    def _grace(self, *args, **kwargs) -> None:
        self._last_beat, self._graced = time.monotonic(), True

    # validation batches and checkpoint writes may take longer than a step: the grace allowance
    on_train_epoch_start = on_validation_start = on_validation_batch_end = on_save_checkpoint = _grace

    def on_train_end(self, trainer, pl_module) -> None:
        self._stopped.set()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stopped.set()

    # ---- the thread
    def _watch(self) -> None:
        while not self._stopped.wait(self.limits.poll_s):
            quiet = time.monotonic() - self._last_beat
            limit = self.limits.limit_s(list(self._intervals), self._graced)
            if quiet > limit and self._armed and not self._stopped.is_set():
                self._fail(quiet, limit)
                return

    def _fail(self, quiet_s: float, limit_s: float) -> None:
        print(f"watchdog (rank {self.rank}): no training step for {quiet_s:.3g} s (limit {limit_s:.3g} s) after "
              f"step {self._step}; every thread's Python stack on this rank follows", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        answer = {"step": self._step, "where": main_thread_frame()}
        order = with_deadline(self.answer_s, lambda: self._answer(answer)) if self.address else None
        if self.address is not None and order is None:  # the store's host (rank 0) is the one stopped
            silent, behind = [0], []
            message = (f"watchdog: no training step for {quiet_s:.3g} s (limit {limit_s:.3g} s); rank(s) 0 did not "
                       "answer: the rendezvous store on its node does not answer (stopped, dead or unreachable: look "
                       f"at that node). This is rank {self.rank}, after step {answer['step']} in {answer['where']}. "
                       "Failing the job.")
        elif order is not None and order > 1:  # another rank reports; wait for it to finish, then go
            print(f"watchdog (rank {self.rank}): the first rank to answer names the stalled ranks; exiting",
                  file=sys.stderr, flush=True)
            time.sleep(self.answer_s + 5)
            self._exit(STALL_EXIT)
            return
        else:  # the first to answer (or a single process): wait for the others, then name the stalled ones
            if self.address is not None:
                time.sleep(self.answer_s)
            answers = (with_deadline(self.answer_s, self._read_answers) if self.address else None) or \
                {self.rank: answer}
            message = stall_message(quiet_s, limit_s, self.world_size, answers)
            silent, behind = stalled_ranks(self.world_size, answers)
        print(message, file=sys.stderr, flush=True)
        print(message, flush=True)
        try:
            record_failure(self.run_dir, "hung", message, step=self._step, silent_ranks=silent, behind_ranks=behind)
        except OSError as error:
            print(f"watchdog: could not record the failure in {self.run_dir}: {error}", file=sys.stderr, flush=True)
        print(end_stalled_tasks(silent), file=sys.stderr, flush=True)
        self._exit(STALL_EXIT)

    def _answer(self, answer: dict[str, Any]) -> int:
        self.store = connect_store(self.address, self.answer_s)
        self.store.set(f"{KEY}/rank/{self.rank}", json.dumps(answer))
        return int(self.store.add(f"{KEY}/answers", 1))

    def _read_answers(self) -> dict[int, dict[str, Any]]:
        answers = {}
        for rank in range(self.world_size):
            key = f"{KEY}/rank/{rank}"
            if self.store.check([key]):
                answers[rank] = json.loads(self.store.get(key))
        return answers


def end_stalled_tasks(silent: list[int]) -> str:
    """End what cannot end itself: a stopped rank never exits, and the job (SLURM's step, submitit's
    local controller) waits for every task. SLURM: the job is cancelled (``scancel``; the record
    above says why). Local: this job's own tasks of the silent ranks are killed, found as the
    controller's children whose SUBMITIT_LOCAL_GLOBALID is a silent rank. Returns what was done."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        try:
            subprocess.run(["scancel", job_id], timeout=30, check=True, capture_output=True)
            return f"watchdog: cancelled SLURM job {job_id}"
        except (OSError, subprocess.SubprocessError) as error:
            return f"watchdog: could not cancel SLURM job {job_id}: {error}"
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or not silent:
        return "watchdog: no other task to end"
    killed = []
    for pid, rank in local_sibling_tasks(os.getppid()):
        if rank in silent:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(f"rank {rank} (pid {pid})")
    return f"watchdog: killed {', '.join(killed) or 'no task'} of this local job"


def local_sibling_tasks(controller: int) -> list[tuple[int, int]]:
    """(pid, rank) of the local controller's task processes other than this one (Linux /proc)."""
    tasks = []
    try:
        children = {int(pid) for tid in Path(f"/proc/{controller}/task").iterdir()
                    for pid in (tid / "children").read_text().split()}
    except OSError:
        return []
    for pid in children - {os.getpid()}:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"SUBMITIT_LOCAL_GLOBALID="):
                tasks.append((pid, int(entry.split(b"=", 1)[1])))
    return tasks


def rendezvous_address() -> tuple[str, int] | None:
    """Where the job's rendezvous store listens (rank 0's node), for several processes; None for one.
    Lightning exports MASTER_ADDR and MASTER_PORT when it starts the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        return None


def connect_store(address: tuple[str, int], timeout_s: float):
    """A connection of its own to the rendezvous store, made only once a stall is seen: the process
    group's connection may be held by the main thread, waiting in the very collective that hangs."""
    import torch.distributed as dist

    return dist.TCPStore(address[0], address[1], is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)
