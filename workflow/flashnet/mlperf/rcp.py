"""MLPerf's reference convergence points (RCPs) for ResNet-50, as MLCommons' own RCP checker holds a
run against them (``mlperf_logging.rcp_checker``, the ``mlperf-logging`` package; training 4.0.0's
``rcps_resnet.json``). Nothing here re-derives the checker: its record for a batch size (a row of its
pruned pass, the interpolation between the nearest rows, or the smallest row) and its test are used
as they are, so a new ruleset is a version bump of the package.

What the checker tests (``check_directory``, ``_eval_submission_record``): the olympic mean (one
lowest and one highest dropped) of a submission's epochs to converge — 5 runs for ResNet — must be
at least the record's ``RCP Mean / Max Speedup`` (its "Min Epochs": the smallest mean a one-sided
t-test at α = 0.05 cannot tell from the reference's); a batch size above every row has no RCP
("Missing RCP"), and one below every row passes against the smallest row only if it converges no
faster than that row allows (else "Missing RCP" too).

The epochs are ImageNet-1k epochs as the log's ``epoch_num`` counts them: the comparison means
something only for a run on ImageNet-1k.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from mlperf_logging.rcp_checker import rcp_checker

RULESET = "4.0.0"
RCP_SOURCE = f"mlcommons/logging, mlperf_logging/rcp_checker/training_{RULESET}/rcps_resnet.json"
RUNS_PER_SUBMISSION = rcp_checker.submission_runs["training"]["resnet"]  # 5


@functools.lru_cache(maxsize=1)
def checker() -> rcp_checker.RCP_Checker:
    return rcp_checker.RCP_Checker("training", RULESET, "resnet", verbose=False)


def _rcp_epochs() -> dict[int, tuple[float, ...]]:
    return {record["BS"]: tuple(record["Epochs to converge"]) for record in checker().rcp_data.values()}


# global batch size → "Epochs to converge" of the reference runs (the checker's table, sorted)
RCP_RESNET_EPOCHS = _rcp_epochs()


@dataclasses.dataclass(frozen=True)
class RcpMean:
    """The checker's record for one batch size: its mean epochs to converge and the least olympic
    mean of a submission's runs it accepts (None when there is no RCP), and how it was found."""

    batch_size: int
    mean: float | None
    min_epochs: float | None
    how: str  # "row 3,264", "interpolated between rows 13,056 and 32,768", ...
    record: dict | None = dataclasses.field(default=None, compare=False, repr=False)


def rcp_mean(batch_size: int) -> RcpMean:
    """The record the checker holds a submission at ``batch_size`` against (its default pruned pass)."""
    check, rcp_pass = checker(), "pruned_rcps"
    record = check._find_rcp(batch_size, rcp_pass)
    if record is not None:
        return RcpMean(batch_size, float(record["RCP Mean"]), float(record["Min Epochs"]), f"row {batch_size:,}",
                       record)
    low, high = check._find_top_min_rcp(batch_size, rcp_pass), check._find_bottom_max_rcp(batch_size, rcp_pass)
    if low is not None and high is not None:
        _, record = check._create_interp_rcp(batch_size, low, high)
        return RcpMean(batch_size, float(record["RCP Mean"]), float(record["Min Epochs"]),
                       f"interpolated between rows {low['BS']:,} and {high['BS']:,}", record)
    if high is not None:
        record = check._find_min_rcp(rcp_pass)
        return RcpMean(batch_size, float(record["RCP Mean"]), float(record["Min Epochs"]),
                       f"below the smallest row: row {record['BS']:,}", record)
    return RcpMean(batch_size, None, None, f"missing: above the largest row ({low['BS']:,})")


@dataclasses.dataclass(frozen=True)
class RcpVerdict:
    passed: bool | None  # None: fewer runs than a submission has, not judged
    message: str
    olympic_mean: float | None


def hold_runs(batch_size: int, epochs_to_converge: list[float]) -> RcpVerdict:
    """The checker's test of a submission's runs at ``batch_size`` (their epoch_num at run_stop
    success): passes when their olympic mean is at least the record's Min Epochs."""
    if len(epochs_to_converge) < RUNS_PER_SUBMISSION:
        return RcpVerdict(None, f"{len(epochs_to_converge)} run(s): a submission has {RUNS_PER_SUBMISSION}", None)
    rcp = rcp_mean(batch_size)
    ordered = sorted(epochs_to_converge)
    mean = float(np.mean(ordered[1:-1]))
    if rcp.record is None:
        return RcpVerdict(False, f"Missing RCP, please submit RCP with BS = {batch_size}", mean)
    passed, _ = checker()._eval_submission_record(rcp.record, list(epochs_to_converge), "")
    if rcp.how.startswith("below") and not passed:
        return RcpVerdict(False, f"Missing RCP, please submit RCP with BS = {batch_size}", mean)
    return RcpVerdict(bool(passed), f"{'passes' if passed else 'fails'} against {rcp.how} "
                                    f"(olympic mean {mean:.2f} vs the least accepted {rcp.min_epochs:.2f})", mean)
