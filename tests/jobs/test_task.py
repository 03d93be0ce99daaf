"""What the job's own processes take from the job layer: the preemption signal, by submitit's public
name for it."""

from __future__ import annotations

import signal

import pytest
import submitit

from flashnet.jobs.task import Preemption, preemption_signal


def test_the_preemption_signal_is_the_one_submitit_binds_its_requeue_to(monkeypatch):
    assert preemption_signal() == signal.SIGUSR2
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR1")  # SUBMITIT_PREEMPT_SIGNAL=USR1
    assert preemption_signal() == signal.SIGUSR1
    # the private lookup submitit's own handler uses agrees (if it is renamed, this comparison breaks, not the job)
    assert preemption_signal() == submitit.JobEnvironment._usr_sig()


def test_a_preemption_signal_that_names_no_signal_is_refused(monkeypatch):
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR9")
    with pytest.raises(RuntimeError, match="SUBMITIT_PREEMPT_SIGNAL names no signal \\(SIGUSR9\\)"):
        preemption_signal()


def test_the_signal_asks_the_job_to_stop_and_keeps_submitits_handler_for_later():
    def submitits_handler(signum, frame):
        raise AssertionError("submitit's handler ran at the signal: it would requeue mid-step")

    previous = signal.signal(signal.SIGUSR2, submitits_handler)
    try:
        requests = []
        preemption = Preemption(requests.append)
        signal.raise_signal(signal.SIGUSR2)
        assert requests == ["signal SIGUSR2"]
        assert preemption._submitit_handler is submitits_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)
