"""Progress for long loops: a live bar on a terminal, plain periodic lines in a job's log.

A carriage-return progress bar turns a SLURM log into one unreadable line, so off a terminal the
same loop prints ``desc: 120/512 shard (23%) 4.1 shard/s, ETA 1 min 36 s`` every ``every_s`` seconds.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def format_duration(seconds: float | None) -> str:
    """A duration as people read it, the one form every line, table and report uses: ``"10.96 s"``,
    ``"74.7 s"``, ``"3 min 44 s"``, ``"1 h 05 min"``; ``"?"`` where it is not known (None, inf).

    Under two minutes: seconds with up to two decimals (published records are quoted that way);
    under an hour: whole minutes and seconds; beyond: hours and minutes (``"1 h"`` when exact).
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    if seconds < 120:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + " s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h" if minutes == 0 else f"{hours} h {minutes:02d} min"


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", every_s: float = 30.0,
             stream=None) -> Iterator[T]:
    stream = stream or sys.stderr
    if stream.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream)
        return
    start = last = time.monotonic()
    done = 0
    print(f"{desc}: 0/{total} {unit}", file=stream, flush=True)
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            percent = 100 * done / total if total else 100
            print(f"{desc}: {done}/{total} {unit} ({percent:.0f}%) {rate:.1f} {unit}/s, ETA {format_duration(eta)}",
                  file=stream, flush=True)
