"""Tests of flashnet.bench.gpu.configs: which configurations run, in which order, and how many steps
the data configurations time."""

from __future__ import annotations

import pytest

from flashnet.bench.gpu.configs import RUN_ORDER, data_steps, select_configs


def test_data_configurations_time_enough_batches_to_outlast_the_prefetch_backlog():
    assert data_steps(10, 50, 14) == (28, 140)
    assert data_steps(40, 500, 14) == (40, 500)
    assert data_steps(1, 2, 0) == (2, 10)  # no workers: the main process is one stream


def test_configurations_run_in_a_fixed_order_and_unknown_ones_are_refused():
    assert [c.id for c in select_configs("5,1,3,2")] == ["5", "1", "2", "3"]
    assert [c.id for c in select_configs("all")] == list(RUN_ORDER)
    with pytest.raises(ValueError, match="unknown configuration"):
        select_configs("1,7")
