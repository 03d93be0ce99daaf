"""``python -m flashnet.bench.gpu``: the same as ``flashnet bench gpu``."""

from flashnet.bench.gpu.cli import main

raise SystemExit(main())
