"""flashnet's command line: one subcommand per pipeline step (each rule's shell line calls one)."""

from __future__ import annotations

import argparse
import json
import importlib
import sys
from pathlib import Path

from .config import ConfigError
from .data.sources import DataError

# Errors that are the user's input, not a bug: shown as one line, without a traceback.
USER_ERRORS = (ConfigError, DataError)


def _sample_data(args) -> None:
    from .data.sample import SampleSpec, write_sample_data

    spec = SampleSpec(args.classes, args.train_per_class, args.val_per_class, args.min_side, args.max_side,
                      args.quality, not args.no_odd_files, args.seed)
    counts = write_sample_data(args.out, spec, layouts=tuple(args.layout))
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out} ({', '.join(args.layout)})")


def _index(args) -> None:
    from .data import shards, sources

    index = sources.index_split(args.data_dir, args.split)
    shards.save_index(shards.shuffled(index, args.seed), args.data_dir, args.samples_per_shard, args.seed, args.out)
    print(f"{args.split}: {len(index)} files in the {index.layout} layout, {len(index.wnids)} classes → {args.out}")


def _write_shards(args) -> None:
    from .data import shards

    result = shards.write_part(args.index, args.part, args.parts, args.out, args.max_side, args.quality, args.check,
                               rewrite=args.rewrite)
    records = result["shards"]
    print(f"part {args.part}/{args.parts}: {len(records)} shards, {sum(r['samples'] for r in records)} samples, "
          f"{sum(len(r['converted']) for r in records)} converted, {sum(len(r['rejected']) for r in records)} rejected")


def _manifest(args) -> None:
    from .data.manifest import build_manifest

    manifest = build_manifest(args.index, args.parts, args.out, args.max_rejected)
    print(f"{manifest['split']}: {manifest['samples']} samples in {len(manifest['shards'])} shards verified; "
          f"{len(manifest['converted'])} converted, {len(manifest['rejected'])} rejected → {args.out}")


def _verify_shards(args) -> None:
    from .data.manifest import verify_manifest

    for path in args.manifest:
        manifest = verify_manifest(path, full=args.full)
        print(f"{path}: {manifest['samples']} samples in {len(manifest['shards'])} shards OK")


def _train(args) -> None:
    from .train import launch

    launch.train_from_cli(args)


def _evaluate(args) -> None:
    from . import evaluate

    evaluate.evaluate_from_cli(args)


def _recipe(args) -> None:
    from . import resolve

    resolve.recipe_from_cli(args)


def _status(args) -> None:
    from . import status

    status.status_from_cli(args)


def _report(args) -> None:
    from .report import build

    build.report_from_cli(args)


BENCHMARKS = {
    "shards": "flashnet.bench.shard_write",
    "loader": "flashnet.bench.loader",
    "lars": "flashnet.bench.lars_step",
    "epoch": "flashnet.bench.epoch",
    "allreduce": "flashnet.bench.allreduce_precision",
    "gpu": "flashnet.bench.gpu.cli",
}


def _bench(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.benchmark])
    return module.main(args.rest)


def _json_object(text: str) -> dict:
    """argparse type of the options that carry a config section as JSON (argparse names the option)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_progress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress-fd", type=int, default=None,
                   help="also write the short progress lines to this open file descriptor (the rule passes "
                        "Snakemake's stderr as 3, since its own output goes to the log)")
    p.add_argument("--log-file", type=Path, default=None, help="where this command's output goes, to name it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashnet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sample-data", help="write the generated ImageNet stand-in")
    p.add_argument("out", type=Path)
    p.add_argument("--layout", action="append", choices=["official", "extracted", "kaggle"],
                   help="layout(s) to write (default official; with several, each goes to OUT/<layout>)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--min-side", type=int, default=240)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--no-odd-files", action="store_true", help="leave out the CMYK/PNG/greyscale files")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_sample_data)

    p = commands.add_parser("index", help="index one split of ImageNet in any layout, in a seeded shuffle")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--split", required=True, choices=["train", "val"])
    p.add_argument("--samples-per-shard", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_index)

    p = commands.add_parser("write-shards", help="write one conversion job's range of shards")
    p.add_argument("index", type=Path)
    p.add_argument("--part", type=int, required=True)
    p.add_argument("--parts", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="the job's record (parts/<part>.json)")
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--check", choices=["decode", "header"], default="decode",
                   help="decode every image (default) or read headers and end markers only")
    p.add_argument("--rewrite", action="store_true",
                   help="write every shard of the part again, whatever its journal says (--forcerun write_shards)")
    p.set_defaults(func=_write_shards)

    p = commands.add_parser("manifest", help="verify all shards of a split and write its manifest")
    p.add_argument("index", type=Path)
    p.add_argument("--parts", type=Path, nargs="+", required=True)
    p.add_argument("--max-rejected", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_manifest)

    p = commands.add_parser("verify-shards", help="check shards against their manifest")
    p.add_argument("manifest", type=Path, nargs="+")
    p.add_argument("--full", action="store_true", help="also recompute every sha256")
    p.set_defaults(func=_verify_shards)

    p = commands.add_parser("train", help="train one run (through submitit) and wait for it")
    p.add_argument("--name", required=True, help="the run's name in the config")
    p.add_argument("--run", type=_json_object, required=True, help="the run's settings (JSON)")
    p.add_argument("--launcher", type=_json_object, required=True, help="launcher settings (JSON)")
    p.add_argument("--train-manifest", type=Path, required=True)
    p.add_argument("--val-manifest", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    add_progress_options(p)
    p.add_argument("--fresh", action="store_true",
                   help="train from scratch: move the run's resume checkpoints aside (--forcerun train)")
    p.add_argument("--mlperf", type=_json_object, default={}, help="the config's mlperf section (JSON)")
    p.set_defaults(func=_train)

    p = commands.add_parser("evaluate", help="evaluate a run's final checkpoint on the val shards")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--val-manifest", type=Path, required=True)
    p.add_argument("--launcher", type=_json_object, required=True)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    add_progress_options(p)
    p.set_defaults(func=_evaluate)

    p = commands.add_parser("recipe", help="show what a run or preset resolves to, before any GPU is spent")
    p.add_argument("name", help="a run of the configuration, or a preset of config/presets.yaml")
    p.add_argument("--configfile", type=Path, action="append",
                   help="merged over config/config.yaml, as with snakemake (repeatable)")
    p.add_argument("--manifest", type=Path, help="train manifest whose sample count replaces ImageNet's 1,281,167")
    p.add_argument("--mllog", action="store_true", help="print the MLPerf log's hyperparameter lines instead")
    p.set_defaults(func=_recipe)

    p = commands.add_parser("report", help="summary table, plots and HTML report over all runs")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (results/runs/<run>)")
    p.add_argument("--settings", type=_json_object, required=True, help="the config's report section (JSON)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--partial", action="store_true",
                   help="report the runs that finished and list the others with why (after a failed job)")
    p.add_argument("--logs-dir", type=Path, default=Path("results/logs"),
                   help="the workflow's log folder, named for a run that did not finish (default: results/logs)")
    p.set_defaults(func=_report)

    p = commands.add_parser("status", help="where every run of the configuration stands (reads only)")
    p.add_argument("--configfile", type=Path, action="append",
                   help="as given to snakemake: merged over config/config.yaml (repeatable)")
    p.add_argument("--replace-workflow-config", action="store_true",
                   help="as snakemake's: the --configfile files replace config/config.yaml")
    p.add_argument("--directory", "-d", type=Path, default=Path("."),
                   help="as snakemake's: the working folder (results_dir is relative to it; default: here)")
    p.set_defaults(func=_status)

    p = commands.add_parser("bench", help="benchmarks (each prints its own table; see docs/benchmarks)")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sample-data" and not args.layout:
        args.layout = ["official"]
    try:
        result = args.func(args)
    except USER_ERRORS as error:
        line = f"flashnet {args.command}: error: {error}"
        print(line, file=sys.stderr)
        tell_terminal(args, line)
        return 2
    except Exception as error:  # a bug, or a failure outside the user's input: the traceback goes to the log
        tell_terminal(args, f"flashnet {args.command}: {type(error).__name__}: {error}"
                            + (f" (traceback in {args.log_file})" if getattr(args, "log_file", None) else ""))
        raise
    return result or 0


def tell_terminal(args: argparse.Namespace, line: str) -> None:
    """Also write ``line`` to the progress descriptor where the command has one: a rule sends the
    command's stderr to its log, and its fd 3 to Snakemake's terminal, so an error raised before any
    job was submitted is seen there, not only in the log (with or without show-failed-logs)."""
    fd = getattr(args, "progress_fd", None)
    if fd is None:
        return
    from .watch import open_progress_fd

    stream = open_progress_fd(fd)
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()


if __name__ == "__main__":
    sys.exit(main())
