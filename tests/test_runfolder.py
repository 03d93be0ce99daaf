"""Reading a run folder that is still being written (flashnet/runfolder.py)."""

from __future__ import annotations

import pytest

from flashnet import runfolder


def test_rows_end_where_the_file_was_cut(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,wall_s,val_top1\n1,10,20.5,0.3\n2,20,41.0,0.")  # 0.35 being written
    assert runfolder.read_rows(path) == [{"epoch": 1, "step": 10, "wall_s": 20.5, "val_top1": 0.3}]
    path.write_text("epoch,step,wall_s,val_top1\n1,10,20.5,0.3\n2,20,,\n3,30,60,0.5\n")
    assert len(runfolder.read_rows(path)) == 1  # a row without its values ends the list
    assert runfolder.read_rows(tmp_path / "missing.csv") == []
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert runfolder.read_rows(path) == []


def test_json_that_is_not_whole_reads_as_none(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"finished": tr')
    assert runfolder.read_json(path) is None
    path.write_text("[1, 2]")
    assert runfolder.read_json(path) is None
    path.write_text('{"finished": true}')
    assert runfolder.read_json(path) == {"finished": True}


def test_steps_and_eta():
    assert runfolder.total_steps(8, 64, 1000) == 120  # 15 whole batches an epoch
    assert runfolder.total_steps(8, 64, None) is None
    assert runfolder.eta_s(30, 120, 60.0) == 180.0
    assert runfolder.eta_s(0, 120, 0.0) is None


def test_short_reason_names_the_exception_that_ended_the_job():
    message = ("job 42 (FAILED) failed:\nJob (task=0) failed during processing with trace:\n----\nTraceback:\n  ...\n"
               "flashnet.train.callbacks.NonFiniteLoss: loss became NaN or infinite at step 17; stopping\n"
               "logs: a and b; rerunning the workflow resumes from the last checkpoint if one was written")
    assert runfolder.short_reason(message) == ("job 42 (FAILED) failed: flashnet.train.callbacks.NonFiniteLoss: loss "
                                               "became NaN or infinite at step 17; stopping")
    assert runfolder.short_reason("interrupted (SIGTERM): cancelled job 42; rerunning resumes") == \
        "interrupted (SIGTERM): cancelled job 42; rerunning resumes"
    assert runfolder.short_reason("job 42 (FAILED) failed:\nno trace") == "job 42 (FAILED) failed"


def test_run_total_steps_counts_epochs_by_the_runs_rule():
    from flashnet.runfolder import run_total_steps

    nvidia = {"epochs": 2, "batch_size": 3264, "epoch_steps": "ceil_per_rank", "nodes": 2, "devices_per_node": 8}
    assert run_total_steps(nvidia, 1_281_167) == 2 * 393  # ceil(floor(1,281,167 / 16) / 204)
    assert run_total_steps({**nvidia, "epoch_steps": "floor"}, 1_281_167) == 2 * 392
    assert run_total_steps({"epochs": 2, "batch_size": 3264}, 1_281_167) == 2 * 392  # a run written before the key
def test_a_failure_record_reads_back_and_a_half_written_one_reads_as_none(tmp_path):
    from flashnet.runfolder import FAILURE_FILE, failure_state, read_failure, record_failure

    assert read_failure(tmp_path) is None
    record_failure(tmp_path, "diverged", "train loss 1e+15 is above ...\nmore", step=40)
    record = read_failure(tmp_path)
    assert record == {"kind": "diverged", "message": "train loss 1e+15 is above ...\nmore", "step": 40}
    assert failure_state(record) == "diverged: train loss 1e+15 is above ..."
    (tmp_path / FAILURE_FILE).write_text('{"kind": "hung", "mess')
    assert read_failure(tmp_path) is None
    with pytest.raises(ValueError, match="not one of"):
        record_failure(tmp_path, "tired", "x")
