"""The projection's cost model against numbers worked out by hand.

Worked example (ResNet-50, bf16, P = 2,048 devices at 100 Gbit/s and 5 µs, 256 images per device at
a measured 2,560 images/s per device):
  compute     = 256 / 2,560                                  = 0.1 s
  G           = 25,557,032 parameters × 2 bytes              = 51,114,064 B
  bandwidth   = 2 × 2,047/2,048 × 51,114,064 B / 12.5e9 B/s  = 0.00817425695375 s
  latency     = 2 × 2,047 × 5 µs                             = 0.02047 s
  step        = 0.1 + 0.00817425695375 + 0.02047             = 0.12864425695375 s
  steps       = ⌈90 × 1,281,167 / 524,288⌉ = ⌈219.93⌉         = 220
  total       = 220 × 0.12864425695375 s                     = 28.301736529825 s
"""

from __future__ import annotations

import pytest

from flashnet.config import ConfigError
from flashnet.report import projection as proj
from flashnet.report.runs import load_runs

RESNET50_PARAMETERS = 25_557_032
SETTINGS = proj.ProjectionSettings(devices=2048, epochs=90, link_gbps=100, link_latency_us=5)


def test_parameter_counts_come_from_torchvision():
    assert proj.parameter_count("resnet50") == RESNET50_PARAMETERS
    assert proj.parameter_count("resnet18") == 11_689_512


def test_gradient_bytes_follow_the_training_precision():
    assert proj.gradient_bytes(RESNET50_PARAMETERS, "bf16-mixed") == 51_114_064
    assert proj.gradient_bytes(RESNET50_PARAMETERS, "16-mixed") == 51_114_064
    assert proj.gradient_bytes(RESNET50_PARAMETERS, "32-true") == 102_228_128
    with pytest.raises(ValueError, match="unknown precision"):
        proj.gradient_bytes(RESNET50_PARAMETERS, "64-true")


def test_ring_allreduce_small_cases():
    # Two devices, 1 GB at 1 GB/s, 1 ms latency: each sends half twice = 1 s, plus 2 hops = 2 ms.
    assert proj.ring_allreduce_seconds(1e9, 2, 1e9, 1e-3) == pytest.approx(1.002)
    # Four devices: 2·3/4 = 1.5 of the message, 6 hops.
    assert proj.ring_allreduce_seconds(4e9, 4, 2e9, 1e-3) == pytest.approx(3.0 + 0.006)
    assert proj.ring_allreduce_seconds(1e9, 1, 1e9, 1e-3) == 0.0  # one device: nothing to reduce


def test_settings_convert_units():
    assert SETTINGS.link_bytes_per_s == 12.5e9
    assert SETTINGS.latency_s == pytest.approx(5e-6)


def test_steps_round_up():
    assert proj.steps_for_epochs(90, 1_281_167, 524_288) == 220
    assert proj.steps_for_epochs(1, 1000, 100) == 10  # exact: no extra step from float noise
    assert proj.steps_for_epochs(1, 1001, 100) == 11


def test_worked_example():
    p = proj.project("h100", "resnet50", "bf16-mixed", "8 × NVIDIA H100", per_device_batch=256,
                     images_per_s_per_device=2560.0, settings=SETTINGS)
    assert p.parameters == RESNET50_PARAMETERS and p.gradient_bytes == 51_114_064
    assert p.global_batch == 524_288
    assert p.compute_s == pytest.approx(0.1, rel=1e-12)
    assert p.allreduce_bandwidth_s == pytest.approx(0.00817425695375, rel=1e-12)
    assert p.allreduce_latency_s == pytest.approx(0.02047, rel=1e-12)
    assert p.step_s == pytest.approx(0.12864425695375, rel=1e-12)
    assert p.steps == 220
    assert p.total_s == pytest.approx(28.301736529825, rel=1e-12)
    assert p.compute_share == pytest.approx(0.1 / 0.12864425695375)
    assert p.compute_share + p.communication_share == pytest.approx(1.0)
    assert p.ratio_to_fujitsu == pytest.approx(28.301736529825 / 74.7)
    assert p.images_per_s == pytest.approx(524_288 / 0.12864425695375)


def test_fp32_doubles_the_bandwidth_term():
    bf16 = proj.project("a", "resnet50", "bf16-mixed", "x", 256, 2560.0, SETTINGS, parameters=RESNET50_PARAMETERS)
    fp32 = proj.project("a", "resnet50", "32-true", "x", 256, 2560.0, SETTINGS, parameters=RESNET50_PARAMETERS)
    assert fp32.allreduce_bandwidth_s == pytest.approx(2 * bf16.allreduce_bandwidth_s)
    assert fp32.allreduce_latency_s == bf16.allreduce_latency_s


def test_project_run_uses_the_measured_run(make_run):
    # 64 images over 2 devices: 32 per device; 19.394 images/s per device (conftest's defaults).
    [run] = load_runs([make_run("lars-b64")])
    p = proj.project_run(run, SETTINGS)
    assert (p.model, p.precision, p.per_device_batch, p.measured_images_per_s_per_device) == \
           ("resnet18", "32-true", 32, 19.394)
    assert p.measured_on == "2 × AMD EPYC 7B13 (2 cores)"
    assert p.gradient_bytes == 11_689_512 * 4
    assert p.compute_s == pytest.approx(32 / 19.394)
    assert p.global_batch == 65_536 and p.steps == 1_760  # ⌈90 × 1,281,167 / 65,536⌉ = ⌈1,759.4⌉
    row = proj.projection_csv_rows([p])[0]
    assert row["kind"] == "estimate" and row["fujitsu_time_s"] == 74.7 and row["steps"] == 1_760
    assert set(row) == set(proj.PROJECTION_CSV_COLUMNS)


def test_projection_table_and_text():
    p = proj.project("h100", "resnet50", "bf16-mixed", "8 × NVIDIA H100", 256, 2560.0, SETTINGS)
    table = proj.projection_table([p])
    assert table.rows == (("h100", "2,560", "2,048", "524,288", "220", "100.0 ms", "28.6 ms", "78% : 22%",
                           "28.3 s", "0.38×"),)
    assert table.headers[-1] == "÷ Fujitsu's 74.7 s"
    [sentence] = proj.fujitsu_comparisons([p])
    assert "projected 28.3 s on 2,048 devices" in sentence and "faster than it" in sentence
    assumptions = " ".join(proj.projection_assumptions(SETTINGS))
    assert "No overlap of compute and communication" in assumptions and "1,281,167" in assumptions


def test_settings_from_the_config_section():
    assert proj.ProjectionSettings.from_dict({"projection_devices": 2048, "projection_epochs": 90, "link_gbps": 100,
                                              "link_latency_us": 5}) == SETTINGS
    with pytest.raises(ConfigError, match="report: missing key.*link_gbps"):
        proj.ProjectionSettings.from_dict({"projection_devices": 2048, "projection_epochs": 90,
                                           "link_latency_us": 5})
    with pytest.raises(ConfigError, match="out of range"):
        proj.ProjectionSettings.from_dict({"projection_devices": 0, "projection_epochs": 90, "link_gbps": 100,
                                           "link_latency_us": 5})
