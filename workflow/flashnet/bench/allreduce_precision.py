"""How exact is a gradient all-reduce at 2,048 ranks? A CPU simulation of the arithmetic, not the network.

    .venv/bin/python -m flashnet.bench.allreduce_precision [--ranks 2048] [--components 16384] [--out FILE]
    flashnet bench allreduce [same options]

DDP averages each gradient component over the ranks. Three ways of doing it are simulated, each
summing the ranks' values in ring order, one rank after the other, as NCCL's ring reduce-scatter
does for a chunk (the all-gather that follows only copies):

  bf16 ring          torch's ``bf16_compress_hook`` (what flashnet's training used before): the
                     bucket is cast to bf16 and divided by the world size in bf16, and NCCL adds in
                     fp32 registers but stores and forwards the running partial sum in bf16, so it is
                     rounded to 8 significant bits at each of the N − 1 hops.
  fp32 ring          DDP without a comm hook: the same ring in fp32 (the gradients' own dtype under
                     mixed precision), divided by the world size first as DDP's reducer does.
  bf16 wire, fp32 sum  bf16 on the wire with fp32 accumulation: each rank's value rounded to bf16
                     once (what it sends), the N values summed in fp32 by the chunk's owner, the sum
                     rounded to bf16 once for the all-gather. torch's ddp_comm_hooks (2.11–2.14) and
                     NCCL have no such reduce-scatter; an all-to-all hook would give it.

A component's per-rank gradients are ``mean + noise × normal`` (the same for every component of a
case), so the bias of the average over components is the bias of that component's mean. The exact
average is computed in float64. Reported per scheme and case: the relative bias of the mean and
the RMS error relative to the RMS of the exact average. docs/benchmarks/allreduce.md has the figures.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from flashnet.bench import write_report

# (name, mean, noise) of a component's per-rank gradient: one sign on every rank, a mean as large
# as the noise, and noise ten times the mean (the large-batch regime: the batch mean is small
# against a single rank's minibatch gradient).
CASES = (("one sign", 1e-3, 0.0), ("mean = noise", 1e-3, 1e-3), ("noise = 10 × mean", 1e-3, 1e-2))
SCHEMES = ("bf16 ring", "fp32 ring", "bf16 wire, fp32 sum")


def _round(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded (to nearest even) to ``dtype`` and held in float64 again."""
    return values.to(dtype).to(torch.float64)


def ring_mean(grads: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """The mean over ranks (rows) of a ring whose running partial sum is stored in ``wire`` after
    every hop; each rank's value is first cast to ``wire`` and divided by the world size there."""
    ranks = grads.shape[0]
    inputs = _round(_round(grads, wire) / ranks, wire)
    partial = inputs[0]
    for rank in range(1, ranks):
        # NCCL adds in fp32 (exact for two bf16 values within 2^16 of each other), stores in wire
        partial = _round(partial + inputs[rank], wire)
    return partial


def wire_then_fp32_sum_mean(grads: torch.Tensor, wire: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The mean over ranks with ``wire`` only on the wire: each value divided by the world size and
    rounded to ``wire`` once, the values summed in fp32, the result rounded to ``wire`` once."""
    ranks = grads.shape[0]
    inputs = _round(grads / ranks, wire)
    total = torch.zeros_like(inputs[0], dtype=torch.float32)
    for rank in range(ranks):
        total = total + inputs[rank].to(torch.float32)  # the owner's fp32 accumulator
    return _round(total.to(torch.float64), wire)


def reduce(scheme: str, grads: torch.Tensor) -> torch.Tensor:
    if scheme == "bf16 ring":
        return ring_mean(grads, torch.bfloat16)
    if scheme == "fp32 ring":
        return ring_mean(grads, torch.float32)
    if scheme == "bf16 wire, fp32 sum":
        return wire_then_fp32_sum_mean(grads)
    raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")


def errors(result: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Relative bias of the mean over components, and RMS error over RMS of the exact values."""
    return {
        "mean_bias": float(result.mean() / exact.mean() - 1),
        "relative_rms_error": float((result - exact).square().mean().sqrt() / exact.square().mean().sqrt()),
    }


def simulate(ranks: int = 2048, components: int = 16384, seed: int = 0) -> list[dict]:
    """Every scheme on every case of :data:`CASES`: rows of (case, scheme, mean_bias, relative_rms_error)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for case, mean, noise in CASES:
        grads = mean + noise * torch.randn(ranks, components, generator=generator, dtype=torch.float64)
        grads = _round(grads, torch.float32)  # the gradients each rank holds, fp32 under mixed precision
        exact = grads.mean(0)
        for scheme in SCHEMES:
            rows.append({"case": case, "mean": mean, "noise": noise, "scheme": scheme,
                         **errors(reduce(scheme, grads), exact)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench allreduce", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2048)
    parser.add_argument("--components", type=int, default=16384, help="gradient components per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def format_table(report: dict) -> str:
    lines = [f"{report['ranks']} ranks, {report['components']} components per case, torch {report['torch']}, "
             f"{report['date']}", "", f"{'case':<20} {'scheme':<22} {'mean bias':>10} {'rel. RMS error':>15}"]
    for row in report["results"]:
        lines.append(f"{row['case']:<20} {row['scheme']:<22} {row['mean_bias']:>+10.2%} "
                     f"{row['relative_rms_error']:>15.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"benchmark": "allreduce_precision", "ranks": args.ranks, "components": args.components,
              "seed": args.seed, "torch": torch.__version__, "machine": platform.machine(),
              "date": datetime.date.today().isoformat(),
              "results": simulate(args.ranks, args.components, args.seed)}
    print(format_table(report))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
