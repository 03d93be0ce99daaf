"""The all-reduce precision simulation: each scheme's arithmetic on values worked out by hand, and the
bias it exists to show, at 2,048 ranks (few components, to stay fast; docs/benchmarks/allreduce.md
has the full run)."""

from __future__ import annotations

import json

import pytest
import torch

from flashnet.bench import allreduce_precision as sim


def test_a_bf16_ring_loses_what_falls_to_half_a_unit_of_its_partial_sum():
    """1 + 2^-8 + 2^-8 in bf16 (8 significant bits, a unit of 2^-7 at 1): each 2^-8 is half a
    unit and rounds away (ties to even) at each hop, so the ring's sum stays 1; fp32 keeps both;
    bf16 on the wire with an fp32 sum keeps them too and rounds once, to 1 + 2^-7 exactly."""
    grads = torch.tensor([[3.0], [3 * 2**-8], [3 * 2**-8]], dtype=torch.float64)  # /3 ranks: 1, 2^-8, 2^-8
    assert sim.ring_mean(grads, torch.bfloat16).item() == 1.0
    assert sim.ring_mean(grads, torch.float32).item() == pytest.approx(1 + 2**-7, rel=1e-7)
    assert sim.wire_then_fp32_sum_mean(grads).item() == 1 + 2**-7


def test_bf16_ring_is_biased_at_scale_and_the_other_two_are_not(tmp_path):
    rows = {(r["case"], r["scheme"]): r for r in sim.simulate(ranks=2048, components=256)}
    assert rows["one sign", "bf16 ring"]["mean_bias"] < -0.2
    for case, _, _ in sim.CASES:
        assert abs(rows[case, "fp32 ring"]["mean_bias"]) < 1e-4
        assert abs(rows[case, "bf16 wire, fp32 sum"]["mean_bias"]) < 2**-8
        assert rows[case, "bf16 wire, fp32 sum"]["relative_rms_error"] < 1e-2
    out = tmp_path / "allreduce.json"
    assert sim.main(["--ranks", "16", "--components", "8", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["results"]) == len(sim.CASES) * len(sim.SCHEMES)
