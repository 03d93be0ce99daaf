"""What a job's own processes ask of the job layer: the cluster environment Lightning takes its
ranks from, the signal that announces a time limit or a preemption, and the resubmission that
requeues a job."""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable, NoReturn

import submitit
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment


def lightning_environment(job_env: submitit.JobEnvironment | None = None):
    """The cluster environment Lightning should take ranks from in this submitit job. Submitit owns
    requeueing, so Lightning's own SLURM requeue is off."""
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    job_env = job_env or submitit.JobEnvironment()
    if job_env.cluster == "slurm":
        return SLURMEnvironment(auto_requeue=False)
    # Local processes: export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK as torchrun would.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return LightningEnvironment()


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM (``--signal``) and its local runner to send before a time limit
    or a preemption, and binds its checkpoint-and-requeue handler to.

    ``JobEnvironment.USR_SIG`` is public (the name, ``USR2`` unless SUBMITIT_PREEMPT_SIGNAL says
    otherwise); the ``_usr_sig()`` classmethod that turns it into a signal is not, so the lookup is
    done here from the public name."""
    name = f"SIG{submitit.JobEnvironment.USR_SIG}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise RuntimeError(f"SUBMITIT_PREEMPT_SIGNAL names no signal ({name}); unset it or set e.g. USR2") from None


class Preemption:
    """Takes the preemption signal from submitit's handler for as long as the job runs.

    Submitit's handler would checkpoint and requeue at once, mid-step. Here the signal only calls
    ``request`` (the job stops at its next agreed boundary, every rank together); then
    :meth:`hand_over` gives rank 0's turn to submitit's handler, which calls the job's
    ``checkpoint()``, requeues it and exits."""

    def __init__(self, request: Callable[[str], None]):
        self.signal = preemption_signal()
        self._submitit_handler = signal.getsignal(self.signal)
        signal.signal(self.signal, lambda signum, frame: request(f"signal {signal.Signals(signum).name}"))

    def hand_over(self) -> NoReturn:
        if submitit.JobEnvironment().global_rank == 0 and callable(self._submitit_handler):
            self._submitit_handler(self.signal, None)  # checkpoint(), requeue, exit
        sys.exit(-1)


def resubmission(job: Callable[[], Any]) -> DelayedSubmission:
    """What a job's ``checkpoint()`` returns: ``job`` submitted again when it is requeued."""
    return DelayedSubmission(job)
