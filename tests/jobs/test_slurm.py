"""SLURM's client answers, parsed once for following and for ``flashnet status``, and a cancel that
is repeated until it holds."""

from __future__ import annotations

from flashnet.jobs import slurm

# What `sacct -D -X -n -P -o JobID,State,NodeList,ElapsedRaw,ExitCode -j 42` prints, one line per run
# of the job: a first run requeued, a second preempted, the third one running; then another job.
SACCT_REQUEUED_TWICE = """42|REQUEUED|flashnet-n1|95|0:0
42|PREEMPTED|flashnet-n2|40|0:15
42|RUNNING|flashnet-n[1-2]|12|0:0
43|RUNNING|flashnet-n1|5|0:0
"""


def test_parse_sacct_keeps_one_record_per_run_of_the_job():
    attempts = slurm.parse_sacct(SACCT_REQUEUED_TWICE, "42")
    assert [(a.state, a.nodes, a.elapsed_s) for a in attempts] == [
        ("REQUEUED", "flashnet-n1", 95), ("PREEMPTED", "flashnet-n2", 40), ("RUNNING", "flashnet-n[1-2]", 12)]
    assert slurm.parse_sacct("42|CANCELLED by 0|flashnet-n1|30|0:0\n", "42")[0].state == "CANCELLED"
    assert slurm.parse_sacct("42|PENDING|None assigned|0|0:0\n", "42")[0].nodes == ""
    assert slurm.parse_sacct("garbage\n42|RUNNING\n", "42") == []


def test_without_slurm_here_every_query_reads_as_no_answer(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm.attempts("42") is None and slurm.job_state("42") is None
    assert slurm.node_states("flashnet-n1") == "unknown"
    assert slurm.current_state("42") == "UNKNOWN"


class LosesFirstCancel:
    """A SLURM job whose first scancel is lost (it stays pending), as seen after a NODE_FAIL."""

    job_id = "13"

    def __init__(self):
        self.cancels = 0

    def cancel(self, check: bool = True) -> None:
        self.cancels += 1


def test_a_lost_scancel_is_repeated_until_the_job_is_cancelled(monkeypatch):
    job = LosesFirstCancel()
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "CANCELLED" if job.cancels >= 2 else "PENDING")
    assert slurm.cancel(job, timeout_s=5, poll_s=0.01) == "CANCELLED"
    assert job.cancels == 2


def test_a_job_that_will_not_cancel_is_reported_not_waited_for_forever(monkeypatch):
    job = LosesFirstCancel()
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "PENDING")
    assert slurm.cancel(job, timeout_s=0.05, poll_s=0.01) == "PENDING"
    assert job.cancels >= 2
