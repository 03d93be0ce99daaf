"""Every kind of job goes one way through the job layer: submitted from a private folder, followed,
and on failure reported as ``flashnet <command>: ...`` on stderr, which ``flashnet status`` reads."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

from flashnet import status
from flashnet.jobs import submit
from flashnet.watch import ProgressLines

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import this module


class FailingKind:
    """A job kind whose job raises, as a training or evaluation job that meets bad input would."""

    activity = ""
    nodes = tasks_per_node = 1

    def __init__(self, command: str):
        self.command, self.run_name, self.job_name = command, "tiny", f"flashnet-test-{command}"

    def before_submit(self) -> str:
        return " (a note)"

    def __call__(self):
        raise ValueError("the job's own reason")


def test_job_folder_is_private(tmp_path):
    folder = submit.private_dir(tmp_path / "jobs")
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_failed_job_is_reported_on_stderr_with_its_command(command, tmp_path, capsys, tiny_dataset):
    """Evaluation printed its failures to stdout, training to stderr; both now go one way."""
    with pytest.raises(SystemExit) as exit_:
        submit.run_job(FailingKind(command), tiny_dataset.launcher(), tmp_path / "jobs",
                       ProgressLines(f"{command} tiny", None), tmp_path / "rule.log")
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"flashnet {command}: job ") and "ValueError: the job's own reason" in err, err
    assert f"flashnet {command}:" not in out
    assert "submitted local job " in out and " for run tiny (a note); 1 node(s) × 1 device(s)" in out
    assert f"[{command} tiny] failed: " in out
    assert status.failure(out + err, command).startswith("failed: ")
    assert not (tmp_path / "jobs" / "active.json").exists()
    assert (tmp_path / "jobs").stat().st_mode & 0o777 == 0o700
