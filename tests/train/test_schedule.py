import math

import pytest

from flashnet.config import ConfigError, RunConfig
from flashnet.train.schedule import WarmupPolySchedule, schedule_for_run, steps_per_epoch, total_steps


def test_linear_warmup_reaches_the_peak_on_its_last_step():
    schedule = WarmupPolySchedule(peak_lr=10.0, warmup_steps=4, decay_steps=8, power=2.0, end_lr=0.0)
    assert [schedule(s) for s in range(4)] == [2.5, 5.0, 7.5, 10.0]


def test_polynomial_decay_reaches_the_end_on_its_last_decay_step():
    schedule = WarmupPolySchedule(peak_lr=10.0, warmup_steps=4, decay_steps=8, power=2.0, end_lr=1.0)
    # step 4 is decay step 1 of 8: 1 + 9·(7/8)²; step 7 is decay step 4: 1 + 9·(1/2)²; step 11 the 8th: end
    assert schedule(4) == pytest.approx(1.0 + 9.0 * (7 / 8) ** 2)
    assert schedule(7) == pytest.approx(1.0 + 9.0 * 0.25)
    assert schedule(10) == pytest.approx(1.0 + 9.0 * (1 / 8) ** 2)
    assert schedule(11) == 1.0
    assert schedule(500) == 1.0  # held at the floor past the horizon
    assert schedule.horizon_steps == 12


def test_power_one_is_linear_decay():
    schedule = WarmupPolySchedule(peak_lr=3.2, warmup_steps=0, decay_steps=100, power=1.0, end_lr=0.0)
    assert schedule(24) == pytest.approx(2.4)
    assert schedule(49) == pytest.approx(1.6)


def test_the_decay_horizon_is_its_own_key(tiny_run):
    # MLPerf LARS at batch 32,768 (RCP row resnet_ref_32768): 1,281,167 // 32,768 = 39 steps an epoch,
    # 16 warmup epochs = 624 steps, then 2,267 decay steps, whatever `epochs` says.
    spe = steps_per_epoch(1_281_167, 32768)
    run = RunConfig.from_dict(tiny_run(batch_size=32768, lr=21.2, warmup_epochs=16, epochs=60,
                                       lr_decay_steps=2267, end_lr=0.0001))
    schedule = schedule_for_run(run, spe)
    assert (spe, schedule.warmup_steps, schedule.decay_steps) == (39, 624, 2267)
    assert schedule(623) == pytest.approx(21.2)
    assert schedule(624 + 2266) == pytest.approx(0.0001)
    assert schedule(total_steps(60, spe) - 1) > 0.0001  # 60 epochs end before the LR reaches its floor


def test_decay_epochs_and_the_default_horizon(tiny_run):
    by_epochs = schedule_for_run(RunConfig.from_dict(tiny_run(epochs=10, warmup_epochs=1, lr_decay_epochs=4.5)), 10)
    assert (by_epochs.warmup_steps, by_epochs.decay_steps) == (10, 45)
    default = schedule_for_run(RunConfig.from_dict(tiny_run(epochs=10, warmup_epochs=1)), 10)
    assert default.horizon_steps == total_steps(10, 10)  # decays until the run ends


def test_both_horizons_at_once_are_refused(tiny_run):
    with pytest.raises(ConfigError, match=r"lr_decay_steps: set lr_decay_steps or lr_decay_epochs, not both"):
        RunConfig.from_dict(tiny_run(lr_decay_steps=10, lr_decay_epochs=1.0))


def test_fractional_epochs_round_up_to_whole_steps():
    assert total_steps(2.5, 10) == 25
    assert total_steps(35.3, 392) == math.ceil(35.3 * 392)


def test_steps_per_epoch_drops_the_partial_batch():
    assert steps_per_epoch(1_281_167, 3264) == 392
    with pytest.raises(ConfigError, match="batch_size 100 exceeds the 99 train samples"):
        steps_per_epoch(99, 100)
