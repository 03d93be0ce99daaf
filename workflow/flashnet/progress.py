"""Progress for long loops: a live bar on a terminal, plain periodic lines in a job's log.

A carriage-return progress bar turns a SLURM log into one unreadable line, so off a terminal the
same loop prints ``desc: 120/512 shard (23%) 4.1 shard/s, ETA 1m36s`` every ``every_s`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


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
