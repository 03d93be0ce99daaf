import math

import pytest

from flashnet.config import RunConfig
from flashnet.train.schedule import WarmupPolySchedule, schedule_for_run, total_steps


def test_linear_warmup_reaches_the_peak_on_its_last_step():
    schedule = WarmupPolySchedule(peak_lr=10.0, warmup_steps=4, total_steps=12, power=2.0, end_lr=0.0)
    assert [schedule(s) for s in range(4)] == [2.5, 5.0, 7.5, 10.0]


def test_polynomial_decay_values():
    schedule = WarmupPolySchedule(peak_lr=10.0, warmup_steps=4, total_steps=12, power=2.0, end_lr=1.0)
    # step 4: progress 0 → peak; step 8: progress 1/2 → 1 + 9·(1/2)² = 3.25; step 12: the end value
    assert schedule(4) == 10.0
    assert schedule(8) == pytest.approx(1.0 + 9.0 * 0.25)
    assert schedule(11) == pytest.approx(1.0 + 9.0 * (1 / 8) ** 2)
    assert schedule(12) == 1.0
    assert schedule(20) == 1.0  # clamped past the end


def test_power_one_is_linear_decay():
    schedule = WarmupPolySchedule(peak_lr=3.2, warmup_steps=0, total_steps=100, power=1.0, end_lr=0.0)
    assert schedule(0) == 3.2
    assert schedule(25) == pytest.approx(2.4)
    assert schedule(50) == pytest.approx(1.6)


def test_mlperf_b3264_schedule_from_the_run_config(tiny_run):
    # MLPerf LARS at batch 3,264: 1,281,167 // 3,264 = 392 steps an epoch, 2 warmup epochs, 35 epochs.
    run = RunConfig.from_dict(tiny_run(batch_size=3264, lr=10.5, warmup_epochs=2, epochs=35, end_lr=0.0001))
    schedule = schedule_for_run(run, 1_281_167 // 3264)
    assert schedule.warmup_steps == 784 and schedule.total_steps == 13_720
    assert schedule(783) == pytest.approx(10.5)
    assert schedule(392) == pytest.approx(10.5 * 393 / 784)
    halfway = 784 + (13_720 - 784) // 2
    assert schedule(halfway) == pytest.approx(0.0001 + (10.5 - 0.0001) * 0.25)


def test_fractional_epochs_round_up_to_whole_steps():
    assert total_steps(2.5, 10) == 25
    assert total_steps(35.3, 392) == math.ceil(35.3 * 392)
