"""One part of the shards written by another revision's write_part, for ``flashnet bench shards
--also REV``.

Run by bench/revision.py with that revision's package on PYTHONPATH, one process per part. Setup
(argv[1], JSON): ``index``, ``part``, ``parts``, ``journal``, ``quality``. It imports, answers
``{"ready": true}``, waits for one request line (the start: every part's process is released at
once, imports untimed), writes its part and answers ``{"seconds": its own time, "samples": n}``.
"""

import json
import sys
import time
from pathlib import Path

from flashnet.data import shards  # the revision's: PYTHONPATH points at its export


def main() -> None:
    setup = json.loads(sys.argv[1])
    answers, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the answers

    def answer(record: dict) -> None:
        answers.write(json.dumps(record) + "\n")
        answers.flush()

    answer({"ready": True})
    sys.stdin.readline()
    start = time.perf_counter()
    try:
        result = shards.write_part(Path(setup["index"]), setup["part"], setup["parts"], Path(setup["journal"]), None,
                                   setup["quality"])
    except Exception as error:  # noqa: BLE001 - the benchmark reports it
        answer({"error": f"{type(error).__name__}: {error}"})
        return
    answer({"seconds": time.perf_counter() - start, "samples": sum(record["samples"] for record in result["shards"])})


if __name__ == "__main__":
    main()
