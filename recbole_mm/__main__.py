"""Command line: ``python run_recbole_mm.py --model=TSSR --dataset=ml-100k [--key=value ...]``.

RecBole's ``run_recbole.py`` conventions: ``--model``, ``--dataset``, ``--config_files``
(space separated), and any other ``--key=value`` becomes a config override (read by
RecBole's ``Config`` from the command line, so it beats every YAML file).
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="run_recbole_mm.py",
        usage="%(prog)s [--model=M] [--dataset=D] [--key=value ...]\n"
              "       %(prog)s --study FILE.yaml [study options] [--key=value ...]\n"
              "       %(prog)s tune --model=M [--params_file=FILE] [--key=value ...]\n"
              "       %(prog)s inspect --dataset=D [--data_path=DIR] [--write-config]",
        description="Train and test a recbole_mm or RecBole model (default: TSSR on ml-100k).",
        epilog="config overrides:\n"
               "  Any other --key=value is a config override (e.g. --epochs=5 --learning_rate=0.001); it\n"
               "  beats every YAML file. --debug shows a failure's full traceback; --fresh ignores this\n"
               "  run's last checkpoint.\n\n"
               "hyper-parameter search (its own options: run_recbole_mm.py tune --help; docs/DISTRIBUTED.md):\n"
               "  run_recbole_mm.py tune --model=TSSR --params_file=properties/hyper/TSSR.hyper\n\n"
               "your own data (checks RecBole atomic files, writes a starter dataset YAML; inspect --help):\n"
               "  run_recbole_mm.py inspect --dataset=mine --write-config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--model", "-m", default="TSSR", help="model name (default: TSSR)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files")
    parser.add_argument("--list-models", action="store_true", help="list available models and exit")
    # distributed training, RecBole's run_recbole.py options (docs/DISTRIBUTED.md)
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node (default 1)")
    parser.add_argument("--world_size", type=int, default=-1, help="processes over all nodes (default: nproc)")
    parser.add_argument("--ip", default="localhost", help="address of the node with global rank 0")
    parser.add_argument("--port", default="5678", help="free TCP port on that node")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this node's first process")
    parser.add_argument("--resume", nargs="?", const="true", default=None, choices=("auto", "true", "false"),
                        help="--resume: continue this run from its last checkpoint (it must exist); "
                             "--resume=auto (the default): when it exists; --resume=false: start afresh")
    parser.add_argument("--fresh", action="store_true",
                        help="start afresh even if this run has a last checkpoint (same as --resume=false)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1); by default "
                             "one line says what is wrong and names the run's .failed.json")
    from recbole_mm.study import add_study_options

    study = parser.add_argument_group("study (with --study FILE)", "see docs/STUDIES.md")
    study.add_argument("--study", default=None, metavar="FILE",
                       help="run a YAML study (datasets x models x seeds) instead of one model")
    add_study_options(study)  # recbole_mm.study's own definitions: the two lists cannot drift apart
    parser.study_flags = {o for a in study._group_actions if a.dest != "study" for o in a.option_strings}
    return parser


def study_only_flags(argv, parser=None):
    """The study options (``--dry-run``, ``--jobs``, ...) in ``argv``: an error without ``--study``."""
    flags = (parser or build_parser()).study_flags
    return [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in flags]


DEBUG_ENV = "RECBOLE_MM_DEBUG"


def debug_enabled(argv=()):
    import os

    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report_error(exc, argv=()):
    """One line (two with the record's path) for an error a run stopped on; the traceback only with
    --debug. Returns the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        message = str(exc) or "interrupted (Ctrl-C)"
        print(f"interrupted: {message}", file=sys.stderr)
        code = getattr(exc, "exit_code", 130)  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM
    else:
        text = str(exc).strip() or type(exc).__name__
        known = {"ConfigError", "DataFileError", "DuplicateInteractionsError", "UnknownModelError",
                 "FileNotFoundError", "ValueError", "KeyError", "NotADirectoryError", "PermissionError"}
        prefix = "" if type(exc).__name__ in known else f"{type(exc).__name__}: "
        if isinstance(exc, KeyError) and text.startswith(("'", '"')):
            text = text.strip("'\"")
        print(f"error: {prefix}{text}", file=sys.stderr)
        code = 1
    record = getattr(exc, "recbole_mm_record", None)
    if record:
        print(f"record: {record} (the traceback is in it; --debug prints it here)", file=sys.stderr)
    elif not isinstance(exc, KeyboardInterrupt):
        print(f"(--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
    return code


# launcher options: given to quick_start.run, never to the Config as overrides
LAUNCHER_KEYS = ("--nproc", "--world_size", "--ip", "--port", "--group_offset")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "tune":
        from recbole_mm.tune import main as tune_main

        return tune_main(argv[1:])
    if argv and argv[0] == "inspect":  # own data: check the atomic files, write a starter dataset YAML
        from recbole_mm.inspect_data import main as inspect_main

        return inspect_main(argv[1:])
    parser = build_parser()
    args, _unknown = parser.parse_known_args(argv)
    if args.study:
        from recbole_mm.study import main as study_main

        return study_main(argv)
    stray = study_only_flags(argv, parser)
    if stray:
        print(f"error: {', '.join(stray)}: study option(s), used with --study FILE (see --help)", file=sys.stderr)
        return 2

    import recbole_mm  # noqa: F401 - applies the compatibility layer
    from recbole_mm.registry import UnknownModelError, available_models, get_model

    if args.list_models:
        plugin, seq = available_models()
        print("recbole_mm models: " + ", ".join(plugin))
        print("RecBole sequential models: " + ", ".join(seq))
        return 0
    try:
        get_model(args.model)
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from recbole_mm.quick_start import run

    if args.fresh:
        if args.resume not in (None, "false"):
            print("error: --fresh and --resume contradict each other; give one", file=sys.stderr)
            return 2
        args.resume = "false"
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    # RecBole's Config reads --key=value overrides from sys.argv itself and refuses a key given
    # twice; here the last value wins, as in most command lines.
    overrides = {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[0] not in LAUNCHER_KEYS:
            overrides[arg.split("=", 1)[0]] = arg
    config_dict = {"resume": args.resume} if args.resume is not None else None
    saved_argv = sys.argv
    sys.argv = [sys.argv[0]] + list(overrides.values())
    try:
        result = run(
            model=args.model, dataset=args.dataset, config_file_list=config_file_list,
            config_dict=config_dict, nproc=args.nproc, world_size=args.world_size, ip=args.ip,
            port=args.port, group_offset=args.group_offset,
        )
    except BaseException as exc:  # noqa: BLE001 - one clear line; the traceback with --debug
        if debug_enabled(argv) or isinstance(exc, SystemExit):
            raise
        return report_error(exc, argv)
    finally:
        sys.argv = saved_argv
    if result is None:  # a node whose processes returned nothing (its first process failed)
        print("error: no result came back from the training processes", file=sys.stderr)
        return 1

    def fmt(metrics):
        return "  ".join(f"{k}: {float(v):.4f}" for k, v in metrics.items())

    print(f"best valid: {fmt(result['best_valid_result'])}")
    print(f"test result: {fmt(result['test_result'])}")
    if result.get("record_path"):
        print(f"record: {result['record_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
