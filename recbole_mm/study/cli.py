"""The study's command line: ``python run_recbole_mm.py --study <file.yaml>`` and ``python -m
recbole_mm.study`` (:func:`main`), whose options the main command's ``--help`` shows
(:func:`add_study_options`)."""

import argparse
import signal
import sys

from recbole_mm.study.execution import StudyTerminated, _cell_worker, run_study
from recbole_mm.study.spec import StudyError, _parse_value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="run_recbole_mm.py --study",
        description="Run a YAML study (datasets x models x seeds); any --key=value overrides every cell's config.",
        allow_abbrev=False,
    )
    parser.add_argument("--study", required=False, help="study YAML, e.g. properties/study/quickstart.yaml")
    add_study_options(parser)
    parser.add_argument("--run-cell", dest="run_cell", default=None, help=argparse.SUPPRESS)
    return parser


def add_study_options(parser):
    """The study options (all but ``--study``) on ``parser`` or an argument group; the main
    command's ``--help`` shows them from here, so the two lists cannot drift apart."""
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, metavar="DIR",
                        help="study folder (default: the YAML's output_dir, else studies/<name>)")
    parser.add_argument("--max-cells", "--max_cells", dest="max_cells", type=int, default=None, metavar="N",
                        help="run at most N unfinished cells, then stop (run again to continue)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="validate and list the cells; run nothing")
    parser.add_argument("--report-only", "--report_only", dest="report_only", action="store_true",
                        help="rebuild tables, CSV/JSON and plots from the finished records")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="cells run at the same time, each in its own process (default 1); "
                             "without OMP_NUM_THREADS each cell gets cores // jobs CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = build_parser().parse_known_args(argv)
    if args.run_cell:
        return _cell_worker(args.run_cell)
    if not args.study:
        print("error: --study <file.yaml> is required", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    overrides, bad = {}, []
    for arg in unknown:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = _parse_value(value)
        else:
            bad.append(arg)
    if bad:
        print(f"error: unrecognized arguments: {' '.join(bad)} (config overrides are --key=value)", file=sys.stderr)
        return 2
    import recbole_mm  # noqa: F401 - compatibility layer

    try:
        result = run_study(args.study, output_dir=args.output_dir, overrides=overrides,
                           max_cells=args.max_cells, progress=args.progress, dry_run=args.dry_run,
                           report_only=args.report_only, jobs=args.jobs)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyTerminated:
        print("study stopped by SIGTERM: finished cells are kept and the report is written; run the same "
              "command again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    if args.dry_run:
        study = result["study"]
        levels = f" x {len(study.sparsity)} sparsity levels" if study.sparsity is not None else ""
        print(f"study {study.name}: valid; {len(study.cells)} cells ({len(study.datasets)} datasets x "
              f"{len(study.models)} models x {len(study.seeds)} seeds{levels}), {result['finished']} finished; "
              f"folder {study.output_dir}")
        for d, src in result["to_build"].items():
            print(f"  dataset {d} will be built from its {src['type']} source")
        return 0
    counts = result["counts"]
    print(f"study {result['study'].name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"results: {result['results_md']}")
    if counts.get("failed") or counts.get("timeout") or counts.get("config changed"):
        return 1
    return 0
