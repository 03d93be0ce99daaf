"""The progress lines of a waiting rule (flashnet/watch.py): what they say, that they say it once,
and that they reach the stderr of whoever ran the rule's shell line while the rest goes to the log.
A real `snakemake` run of the shipped config checks them on its terminal (tests/e2e/test_pipeline_local.py)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from flashnet.runfolder import METRICS_COLUMNS
from flashnet.watch import ProgressLines, Snapshot


def write_epochs(run_dir, count: int) -> None:
    rows = [",".join(METRICS_COLUMNS)]
    for epoch in range(1, count + 1):
        rows.append(f"{epoch},{10 * epoch},{20.0 * epoch},{1.5 / epoch},{0.2 * epoch},0.9,48.0,0.1,2.5")
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")


def lines(terminal: io.StringIO) -> list[str]:
    return terminal.getvalue().splitlines()


def test_a_slurm_job_from_queue_to_requeue(tmp_path, capsys):
    terminal = io.StringIO()
    progress = ProgressLines("train r", terminal, tmp_path, epochs=4, batch_size=16, train_samples=160)
    progress.submitted("slurm", "42", tmp_path / "r.log", tmp_path / "jobs")
    progress.update(Snapshot("PENDING"))
    progress.update(Snapshot("PENDING"))  # nothing new: no line
    progress.update(Snapshot("RUNNING", "n[1-2]"))
    write_epochs(tmp_path, 1)
    progress.update(Snapshot("RUNNING", "n[1-2]"), "epoch 1/4 step 10/40 loss 1.5\n")
    progress.update(Snapshot("RUNNING", "n[1-2]"), "stopped at step 15 (signal SIGUSR2); checkpoint c; requeueing\n")
    progress.update(Snapshot("PENDING", "", attempts=2))
    progress.update(Snapshot("RUNNING", "n1", attempts=2), "resuming from /r/checkpoints/last.ckpt\n")
    write_epochs(tmp_path, 3)
    progress.update(Snapshot("RUNNING", "n1", attempts=2))
    assert lines(terminal) == [
        f"[train r] submitted slurm job 42; log {tmp_path / 'r.log'}, job logs in {tmp_path / 'jobs'}",
        "[train r] queued, waiting for its nodes",
        "[train r] running on n[1-2]",
        "[train r] epoch 1/4, loss 1.5000, top-1 20.0 %, 48 img/s, 20 s trained, ETA 60 s",
        "[train r] stopped at step 15 (signal SIGUSR2); checkpoint c; the job is requeued",
        "[train r] requeued (run 2 of the job); back in the queue",
        "[train r] running on n1",
        "[train r] resumed from /r/checkpoints/last.ckpt",
        "[train r] epoch 2/4, loss 0.7500, top-1 40.0 %, 48 img/s, 40 s trained, ETA 40 s",
        "[train r] epoch 3/4, loss 0.5000, top-1 60.0 %, 48 img/s, 60 s trained, ETA 20 s",
    ]
    assert capsys.readouterr().out.splitlines() == lines(terminal)  # the log gets every line too


def test_between_epochs_at_most_one_step_line_a_minute(tmp_path):
    terminal = io.StringIO()
    progress = ProgressLines("train r", terminal, tmp_path, epochs=4, batch_size=16, train_samples=160, every_s=3600)
    progress.update(Snapshot("RUNNING", "n1"), "epoch 1/4 step 2/40 loss 2.1\nepoch 1/4 step 4/40 loss 2.0\n")
    assert lines(terminal) == ["[train r] running on n1"]  # the step line came too soon after it
    often = ProgressLines("train r", terminal, tmp_path, epochs=4, batch_size=16, train_samples=160, every_s=0)
    often.update(Snapshot("RUNNING", "n1"), "epoch 1/4 step 6/40 loss 1.9\nepoch 1/4 step 8/40 loss 1.8\n")
    assert lines(terminal)[-1] == "[train r] epoch 1/4 step 8/40 loss 1.8"  # the newest one, once


def test_epochs_finished_before_this_waiter_started_are_not_repeated(tmp_path):
    write_epochs(tmp_path, 2)
    terminal = io.StringIO()
    progress = ProgressLines("train r", terminal, tmp_path, epochs=4, batch_size=16, train_samples=160)
    progress.update(Snapshot("RUNNING", "n1"))
    write_epochs(tmp_path, 3)
    progress.update(Snapshot("RUNNING", "n1"))
    assert [line.split(",")[0] for line in lines(terminal)] == ["[train r] running on n1", "[train r] epoch 3/4"]


def test_a_requeue_seen_by_slurmctld_before_sacct_is_said_once():
    terminal = io.StringIO()
    progress = ProgressLines("train r", terminal)
    for snapshot in (Snapshot("RUNNING"), Snapshot("RUNNING", "n1"),  # nodes not in sacct yet: wait a poll
                     Snapshot("REQUEUED", "n1"), Snapshot("PENDING", "n1", attempts=2),
                     Snapshot("RUNNING", "n2", attempts=2)):
        progress.update(snapshot)
    assert lines(terminal) == ["[train r] running on n1", "[train r] requeued (run 2 of the job); back in the queue",
                               "[train r] running on n2"]


def test_lines_reach_the_callers_stderr_past_the_log_redirect(tmp_path):
    """The rule's shell line, for real: fd 3 is bash's stderr, stdout and stderr go to the log."""
    script = tmp_path / "say.py"
    script.write_text(textwrap.dedent("""
        import sys
        from flashnet.watch import ProgressLines, open_progress_fd
        ProgressLines("train r", open_progress_fd(3)).say("epoch 1/8")
        print("the full output", file=sys.stderr)
    """))
    log = tmp_path / "r.log"
    proc = subprocess.run(["bash", "-c", f"{sys.executable} {script} 3>&2 > {log} 2>&1"],
                          capture_output=True, text=True, check=True)
    assert proc.stderr == "[train r] epoch 1/8\n"
    assert proc.stdout == ""
    assert log.read_text() == "[train r] epoch 1/8\nthe full output\n"


def test_no_progress_fd_means_the_log_only(tmp_path):
    script = tmp_path / "say.py"
    script.write_text("from flashnet.watch import ProgressLines, open_progress_fd\n"
                      "ProgressLines('train r', open_progress_fd(7)).say('epoch 1/8')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert (proc.stdout, proc.stderr) == ("[train r] epoch 1/8\n", "")
