"""flashnet.mlperf.rcp: MLCommons' RCP checker (mlperf-logging) as flashnet holds runs against it."""

from __future__ import annotations

import pytest

from flashnet.mlperf.rcp import RCP_RESNET_EPOCHS, RUNS_PER_SUBMISSION, hold_runs, rcp_mean


def test_the_table_is_the_checkers_resnet_rows():
    assert sorted(RCP_RESNET_EPOCHS) == [1632, 3264, 4096, 8192, 13056, 32768, 49152, 58880, 65536, 67840]
    assert RUNS_PER_SUBMISSION == 5


def test_how_the_record_was_found():
    assert rcp_mean(32768).how == "row 32,768" and rcp_mean(32768).mean == pytest.approx(56.0)  # olympic mean
    assert rcp_mean(40000).how == "interpolated between rows 32,768 and 49,152"
    assert rcp_mean(40000).mean == pytest.approx(56 + (68 - 56) * (40000 - 32768) / (49152 - 32768))
    assert rcp_mean(256).how == "below the smallest row: row 1,632"
    missing = rcp_mean(86016)
    assert missing.how == "missing: above the largest row (67,840)" and missing.mean is None


def test_min_epochs_is_below_the_mean_and_is_the_bound_of_the_test():
    rcp = rcp_mean(3264)
    assert 34 < rcp.min_epochs < rcp.mean == pytest.approx(35.153846, rel=1e-6)
    at_bound = [rcp.min_epochs + 0.001] * 5
    below = [rcp.min_epochs - 0.05] * 5
    assert hold_runs(3264, at_bound).passed is True
    assert hold_runs(3264, below).passed is False


def test_the_olympic_mean_of_the_runs_is_judged_not_their_best():
    rcp = rcp_mean(3264)
    # one very fast run is dropped as the lowest; the other four hold the mean above the bound
    runs = [20.0, 36, 36, 36, 36]
    verdict = hold_runs(3264, runs)
    assert verdict.passed is True and verdict.olympic_mean == pytest.approx(36.0) and 36.0 > rcp.min_epochs


def test_fewer_runs_than_a_submission_are_not_judged():
    verdict = hold_runs(3264, [35, 35])
    assert verdict.passed is None and "a submission has 5" in verdict.message


def test_missing_rcp_above_the_largest_row_and_below_the_smallest_when_faster():
    assert hold_runs(86016, [90] * 5).message == "Missing RCP, please submit RCP with BS = 86016"
    assert hold_runs(1024, [40] * 5).passed is True  # slower than the smallest row: accepted
    fast = hold_runs(1024, [20] * 5)
    assert fast.passed is False and fast.message.startswith("Missing RCP")
