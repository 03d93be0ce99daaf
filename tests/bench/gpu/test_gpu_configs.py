"""Tests of flashnet.bench.gpu.configs: which configurations run, in which order, and how many steps
the data configurations time."""

from __future__ import annotations

import pytest

from flashnet.bench.gpu.configs import (DEFAULT_CONFIGS, RUN_ORDER, data_steps, parse_batch_sizes, select_configs,
                                        smoke_batch_size)


def test_data_configurations_time_enough_batches_to_outlast_the_prefetch_backlog():
    assert data_steps(10, 50, 14) == (28, 140)
    assert data_steps(40, 500, 14) == (40, 500)
    assert data_steps(1, 2, 0) == (2, 10)  # no workers: the main process is one stream


def test_configurations_run_in_a_fixed_order_and_unknown_ones_are_refused():
    assert [c.id for c in select_configs("5,1,3,2")] == ["5", "1", "2", "3"]
    assert [c.id for c in select_configs("all")] == list(RUN_ORDER)
    with pytest.raises(ValueError, match="unknown configuration"):
        select_configs("1,7")


def test_default_configurations_are_those_a_run_can_select():
    assert [c.id for c in select_configs("default")] == list(DEFAULT_CONFIGS)
    assert not {"2r", "2m"} & set(DEFAULT_CONFIGS)  # compile modes no run setting selects
    assert select_configs("2h")[0].precision == "16-mixed"


def test_batch_sizes_parse_in_order_and_bad_ones_are_refused():
    assert parse_batch_sizes("64,32") == (64, 32)
    with pytest.raises(ValueError, match="positive"):
        parse_batch_sizes("32,0")
    with pytest.raises(ValueError, match="integers"):
        parse_batch_sizes("32,big")
    assert [smoke_batch_size(b) for b in (32, 64, 128, 256, 8)] == [2, 4, 8, 16, 2]
