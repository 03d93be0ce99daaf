"""MLPerf's reference convergence points (RCPs) for ResNet-50, and the mean epochs to converge a run
is held against, worked out as MLCommons' RCP checker does.

Source: mlcommons/logging, ``mlperf_logging/rcp_checker/training_4.0.0/rcps_resnet.json`` (the
"Epochs to converge" of each reference row) and ``mlperf_logging/rcp_checker/rcp_checker.py`` (how
they are used):

- a row's mean is "olympic": sorted, one lowest and one highest dropped, the rest averaged;
- the rows are pruned: every row below the batch size of the fastest-converging row goes, then, left
  to right, a row converging more slowly than the interpolation of its neighbours goes (and the row
  that moves into its place is checked next);
- a batch size with a pruned row uses it; one between rows interpolates linearly between the nearest
  lower and higher rows; one below every row is compared with the smallest; one above every row has
  no RCP ("Missing RCP").

The epochs are ImageNet-1k epochs (samples seen / 1,281,167): the comparison means something only
for a run on ImageNet-1k.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RCP_SOURCE = "mlcommons/logging, mlperf_logging/rcp_checker/training_4.0.0/rcps_resnet.json"

# global batch size → "Epochs to converge" of the reference runs
RCP_RESNET_EPOCHS = {
    1632: (34, 34, 34, 35, 35, 37, 35, 35, 33, 35, 35, 37, 37, 35, 35, 34, 35),
    3264: (36, 35, 34, 34, 36, 35, 35, 35, 35, 37, 35, 35, 35, 36, 35),
    4096: (39, 42, 40, 41, 39, 40, 41, 39, 40, 39),
    8192: (42, 44, 43, 41, 41, 41, 42, 42, 43, 41),
    13056: (46, 46, 44, 46, 45, 46, 45, 45, 45, 46),
    32768: (56, 56, 55, 56, 56, 56, 56, 56, 57, 56),
    49152: (68, 68, 68, 68, 69, 68, 68, 67, 69, 67),
    58880: (80, 81, 80, 78, 80, 80, 81, 79, 80, 80),
    65536: (83, 85, 84, 86, 85, 85, 83, 84, 85, 85),
    67840: (86, 87, 86, 87, 86, 85, 86, 86, 86, 85, 86, 86, 86, 86, 86, 85, 86, 86, 87, 85, 85, 86, 85, 87, 86, 85,
            85, 86),
}


@dataclasses.dataclass(frozen=True)
class RcpMean:
    """The mean epochs to converge for one batch size (None when there is no RCP) and how it was found."""

    batch_size: int
    mean: float | None
    how: str  # "row 3,264", "interpolated between rows 13,056 and 32,768", ...


def olympic_mean(epochs: tuple[float, ...] | list[float]) -> float:
    """Mean without the lowest and the highest value."""
    ordered = sorted(epochs)
    return float(np.mean(ordered[1:-1]))


def _interpolate(batch_size: int, low: tuple[int, float], high: tuple[int, float]) -> float:
    return float(np.interp(batch_size, [low[0], high[0]], [low[1], high[1]]))


def pruned_rows(table: dict[int, tuple[float, ...]] = RCP_RESNET_EPOCHS) -> list[tuple[int, float]]:
    """(batch size, olympic mean) of the rows the checker keeps, by batch size."""
    rows = sorted((batch, olympic_mean(epochs)) for batch, epochs in table.items())
    fastest = min(rows, key=lambda row: row[1])
    rows = [row for row in rows if row[0] >= fastest[0]]
    i = 1
    while i < len(rows) - 1:
        if rows[i][1] > _interpolate(rows[i][0], rows[i - 1], rows[i + 1]):
            del rows[i]  # the next row moves to index i and is checked against its new neighbours
        else:
            i += 1
    return rows


def rcp_mean(batch_size: int, table: dict[int, tuple[float, ...]] = RCP_RESNET_EPOCHS) -> RcpMean:
    """The RCP mean epochs to converge that a run at ``batch_size`` is held against."""
    rows = pruned_rows(table)
    for batch, mean in rows:
        if batch == batch_size:
            return RcpMean(batch_size, mean, f"row {batch:,}")
    lower = [row for row in rows if row[0] < batch_size]
    higher = [row for row in rows if row[0] > batch_size]
    if lower and higher:
        low, high = lower[-1], higher[0]
        return RcpMean(batch_size, _interpolate(batch_size, low, high),
                       f"interpolated between rows {low[0]:,} and {high[0]:,}")
    if higher:
        smallest = higher[0]
        return RcpMean(batch_size, smallest[1], f"below the smallest row: row {smallest[0]:,}")
    return RcpMean(batch_size, None, f"missing: above the largest row ({rows[-1][0]:,})")
