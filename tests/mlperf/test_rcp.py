"""flashnet.mlperf.rcp against MLCommons' own RCP checker (mlperf-logging), row by row and between rows."""

from __future__ import annotations

import pytest
from mlperf_logging.rcp_checker.rcp_checker import RCP_Checker

from flashnet.mlperf.rcp import RCP_RESNET_EPOCHS, olympic_mean, pruned_rows, rcp_mean


@pytest.fixture(scope="module")
def checker() -> RCP_Checker:
    return RCP_Checker("training", "4.0.0", "resnet", verbose=False)


def checker_mean(checker: RCP_Checker, batch: int) -> float | None:
    """What check_directory holds a run at ``batch`` against (its pruned pass, the default)."""
    record = checker._find_rcp(batch, "pruned_rcps")
    if record is not None:
        return float(record["RCP Mean"])
    low, high = checker._find_top_min_rcp(batch, "pruned_rcps"), checker._find_bottom_max_rcp(batch, "pruned_rcps")
    if low is not None and high is not None:
        return float(checker._create_interp_rcp(batch, low, high)[1]["RCP Mean"])
    if high is not None:
        return float(checker._find_min_rcp("pruned_rcps")["RCP Mean"])
    return None


def test_table_is_the_checkers_own(checker):
    assert {r["BS"]: sorted(r["Epochs to converge"]) for r in checker.rcp_data.values()} == \
        {batch: sorted(epochs) for batch, epochs in RCP_RESNET_EPOCHS.items()}


def test_olympic_mean_drops_one_lowest_and_one_highest():
    assert olympic_mean([1, 10, 10, 100]) == 10
    assert olympic_mean(RCP_RESNET_EPOCHS[32768]) == pytest.approx(56.0)


def test_pruning_keeps_the_rows_the_checker_keeps(checker):
    assert [batch for batch, _ in pruned_rows()] == sorted(r["BS"] for r in checker.pruned_rcp_data.values())


def test_pruning_drops_a_row_slower_than_its_neighbours_line():
    table = {100: (9, 10, 10, 11), 200: (29, 30, 30, 31), 300: (19, 20, 20, 21), 400: (39, 40, 40, 41)}
    assert pruned_rows(table) == [(100, 10.0), (300, 20.0), (400, 40.0)]
    # and every row below the fastest one
    assert pruned_rows({100: (19, 20, 20, 21), 200: (9, 10, 10, 11), 300: (29, 30, 30, 31)})[0] == (200, 10.0)


@pytest.mark.parametrize("batch", [256, 1632, 2048, 3264, 4000, 4096, 6000, 8192, 16384, 32768, 40000, 65536, 67840,
                                   70000, 86016])
def test_mean_for_a_batch_size_is_the_checkers(checker, batch):
    ours = rcp_mean(batch)
    expected = checker_mean(checker, batch)
    if expected is None:
        assert ours.mean is None and ours.how.startswith("missing")
    else:
        assert ours.mean == pytest.approx(expected, rel=1e-12)


def test_how_the_mean_was_found():
    assert rcp_mean(32768).how == "row 32,768"
    assert rcp_mean(40000).how == "interpolated between rows 32,768 and 49,152"
    assert rcp_mean(40000).mean == pytest.approx(56 + (68 - 56) * (40000 - 32768) / (49152 - 32768))
    assert rcp_mean(256).how == "below the smallest row: row 1,632"
    assert rcp_mean(86016).how == "missing: above the largest row (67,840)"
