"""Running a study's cells, each as its own subprocess (``python -m recbole_mm.study --run-cell
<cell.json>``): the study and cell locks, SIGTERM handling, the child environment, parallel cells
(``--jobs``), the cell process's body (:func:`_cell_worker`) and :func:`run_study`, which runs the
cells and writes the report."""

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from recbole_mm.study.collection import collect_cells
from recbole_mm.study.report import write_report
from recbole_mm.study.spec import (StudyError, _check_finished_specs, _read_json, _repo_root, _write_json, cell_text,
                                   changed_since_study_start, complete_record, validate_study)

try:  # POSIX only: cell and study locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CELL_LOCK_WAIT_S = 60
EXIT_BUSY = 75
EXIT_DEFAULTS_CHANGED = 76  # a cell refused to start: its defaults or config files changed since the study started
# a cell process ended by SIGINT or SIGTERM (Popen's negative codes, or a shell's 128 + n) was interrupted,
# not failed: it reruns on the next start, and no further cell starts after it
INTERRUPTED_CODES = {-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}


# ============================================================================ running cells


@contextlib.contextmanager
def _study_lock(output_dir):
    os.makedirs(output_dir, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = os.path.join(output_dir, ".study.lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StudyError(f"{output_dir}: another process is running this study (lock {path})") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _prepare_datasets(study, log):
    from recbole_mm.data import convert

    for dataset, source in study.to_build.items():
        out_dir = os.path.dirname(study.data_dirs[dataset])
        log(f"preparing dataset {dataset} from {source['type']} source into {out_dir}")
        if source["type"] == "ninerec":
            convert.convert_ninerec(source["path"], out_dir, name=dataset,
                                    benchmark=source.get("benchmark", True),
                                    max_history=source.get("max_history", 50))
        elif source["type"] == "movielens":
            convert.convert_movielens(source["path"], out_dir, dataset)
        else:
            convert.convert_amazon(source["reviews"], source["meta"], out_dir, dataset,
                                   kcore=source.get("kcore", 5), image_dir=source.get("image_dir"))
        if not os.path.isfile(os.path.join(study.data_dirs[dataset], f"{dataset}.inter")):
            raise StudyError(f"dataset {dataset}: the {source['type']} conversion wrote no {dataset}.inter "
                             f"into {study.data_dirs[dataset]}")


def _cell_threads(jobs):
    """CPU threads per cell when ``jobs`` cells share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(jobs)))


def _child_env(study=None):
    env = dict(os.environ)
    jobs = getattr(study, "jobs", 1) if study is not None else 1
    if jobs > 1 and not env.get("OMP_NUM_THREADS"):
        # parallel cells share the cores: a fixed share each (a cell's cpu_threads: auto would see the
        # others start at the same instant and take every core)
        env["OMP_NUM_THREADS"] = str(_cell_threads(jobs))
    root = _repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["RECBOLE_MM_STUDY_PARENT"] = str(os.getpid())
    return env


def _stop(proc, grace_s=10):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _spec_text(spec):
    return cell_text(spec["dataset"], spec["name"], spec["seed"], spec.get("sparsity"))


def _run_cell(study, spec, log, stop=None):
    """Run one cell in a fresh subprocess; returns its status. ``stop`` (a threading.Event)
    set by another thread stops the subprocess (parallel studies interrupted)."""
    os.makedirs(os.path.dirname(spec["record"]), exist_ok=True)
    os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
    if os.path.exists(spec["record"]):
        # an incomplete record is never overwritten in place: it is kept aside
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.replace(spec["record"], spec["record"] + f".incomplete-{stamp}")
    old = _read_json(spec["cell"]) or {}
    attempts = old.get("attempts", []) if isinstance(old, dict) else []
    started = datetime.datetime.now().isoformat(timespec="seconds")
    attempt = {"started": started, "host": socket.gethostname()}
    state = dict(spec, attempts=attempts + [attempt])
    _write_json(spec["cell"], state)
    status, t0, stopped = "failed", time.perf_counter(), False
    with open(spec["log"], "a", encoding="utf-8") as logf:
        logf.write(f"\n===== {_spec_text(spec)}: attempt at {started}\n")
        logf.flush()
        env = _child_env(study)
        proc = subprocess.Popen(
            [sys.executable, "-m", "recbole_mm.study", "--run-cell", spec["cell"]],
            cwd=study.output_dir, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        try:
            if stop is None:
                proc.wait(timeout=study.cell_timeout_s)
            else:
                deadline = None if study.cell_timeout_s is None else time.monotonic() + study.cell_timeout_s
                while proc.poll() is None:
                    if stop.is_set():
                        _stop(proc)
                        stopped = True
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(proc.args, study.cell_timeout_s)
                    stop.wait(0.5)
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = "timeout"
        except BaseException:
            _stop(proc)
            raise
    wall = time.perf_counter() - t0
    if status != "timeout":
        if complete_record(spec["record"], spec["dataset"], spec["model"], spec["seed"], spec.get("sparsity")) \
                is not None:
            status = "finished"
        elif proc.returncode == EXIT_BUSY:
            status = "busy"
        elif proc.returncode == EXIT_DEFAULTS_CHANGED:
            status = "config changed"
        elif proc.returncode in INTERRUPTED_CODES or stopped:  # a cell the study stopped itself: interrupted
            status = "interrupted"  # stopped by a signal (the study's stop, or one sent to the process group)
    attempt.update(ended=datetime.datetime.now().isoformat(timespec="seconds"), wall_s=round(wall, 3),
                   returncode=proc.returncode, status=status)
    _write_json(spec["cell"], state)
    if status != "finished":
        log(f"cell {_spec_text(spec)}: {status} "
            f"(exit code {proc.returncode}); log: {spec['log']}")
    return status


class StudyTerminated(KeyboardInterrupt):
    """SIGTERM reached the study (``timeout``, a batch scheduler, ``kill``)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the study like Ctrl-C: running cells are stopped (their records stay
    incomplete and rerun next time), finished ones are kept and the report is still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StudyTerminated("study stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_cells_parallel(study, todo, jobs, live, bar, log):
    """Run ``todo`` with at most ``jobs`` cell subprocesses at once (threads only wait on them).

    Ctrl-C (or any error) stops the running cells; their records stay incomplete and are rerun
    on the next start, finished ones are kept.
    """
    import concurrent.futures as cf

    stop = threading.Event()

    def one(cell):
        if stop.is_set():
            return cell, "not started"
        status = _run_cell(study, study.cell_spec(*cell), log, stop=stop)
        if status == "interrupted":
            # SIGTERM/SIGINT reached the cell (e.g. sent to the whole process group): the study is being
            # stopped, and the signal may reach this process only after this thread would start the next cell
            stop.set()
        return cell, status

    pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="study-cell")
    try:
        futures = [pool.submit(one, cell) for cell in todo]
        for future in cf.as_completed(futures):
            cell, status = future.result()
            if status != "not started":
                live[cell] = status
                bar.set_postfix_str(f"done {cell_text(*cell)}: {status}")
                bar.update(1)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _set_parent_death_signal():
    """Linux: this process gets SIGTERM when the study process dies (no orphaned cells)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _cell_worker(cell_file):
    """Body of one cell's subprocess: lock the cell, run it, keep or drop its checkpoint."""
    spec = _read_json(cell_file)
    if not isinstance(spec, dict):
        print(f"recbole_mm.study: cannot read cell file {cell_file}", file=sys.stderr)
        return 2
    parent = os.environ.get("RECBOLE_MM_STUDY_PARENT")
    _set_parent_death_signal()
    if parent and os.getppid() != int(parent):
        print("recbole_mm.study: the study process is gone; not running the cell", file=sys.stderr)
        return 1
    lock = None
    if fcntl is not None:
        lock = open(spec["lock"], "a+")
        deadline = time.monotonic() + CELL_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"recbole_mm.study: cell is locked by another process ({spec['lock']})", file=sys.stderr)
                    return EXIT_BUSY
                time.sleep(0.5)
    try:
        if complete_record(spec["record"], spec["dataset"], spec["model"], spec["seed"], spec.get("sparsity")) \
                is not None:
            print("recbole_mm.study: cell already finished; nothing to do")
            return 0
        sys.argv = [sys.argv[0]]  # RecBole's Config reads --key=value from the command line
        import recbole_mm  # noqa: F401 - compatibility layer first
        from recbole_mm.quick_start import run_recbole_mm

        changes = changed_since_study_start(spec)
        if changes:
            error = ("the cell's configuration changed since the study started, so it would not match the "
                     "cells that already ran: " + "; ".join(changes) + ". A study never mixes configurations: "
                     "restore the files, or stop the study and start it again (it then names the finished "
                     "cells that used the old configuration)")
            print(f"recbole_mm.study: {error}", file=sys.stderr)
            _write_json(spec["failed"], {"status": "failed", "model": spec["model"], "dataset": spec["dataset"],
                                        "seed": spec["seed"], **({"sparsity": spec["sparsity"]} if "sparsity" in spec
                                                                 else {}), "error": error})
            return EXIT_DEFAULTS_CHANGED

        print(f"cell: {_spec_text(spec)}", flush=True)
        try:
            config_dict = dict(spec["config_dict"])
            if spec.get("share_dir"):  # a location (LOCATION_KEYS), not part of the cell's configuration
                config_dict["share_dir"] = spec["share_dir"]
            result = run_recbole_mm(model=spec["model"], dataset=spec["dataset"],
                                    config_file_list=spec["config_files"] or None,
                                    config_dict=config_dict, saved=True)
        except KeyboardInterrupt as exc:  # SIGTERM/SIGHUP/Ctrl-C: the run wrote its interrupted record
            print(f"recbole_mm.study: cell interrupted ({exc or 'Ctrl-C'})", file=sys.stderr)
            return getattr(exc, "exit_code", 128 + signal.SIGINT)
        rec = _read_json(result.get("record_path") or spec["record"]) or {}
        if not spec.get("keep_checkpoints", True) and rec.get("checkpoint"):
            with contextlib.suppress(OSError):
                os.remove(rec["checkpoint"])
        print(f"test result: {json.dumps({k: float(v) for k, v in result['test_result'].items()})}")
        return 0
    finally:
        if lock is not None:
            lock.close()


# ============================================================================ entry points


def run_study(path_or_dict, output_dir=None, overrides=None, max_cells=None, progress=True,
              dry_run=False, report_only=False, log=None, jobs=1):
    """Run (or resume) a study; returns a dict with the cells, counts and output paths.

    Args:
        path_or_dict: a study YAML file or the same content as a dict.
        output_dir: the study folder (default: the YAML's ``output_dir`` or ``studies/<name>``).
        overrides: config keys for every cell, beating the YAML (``--key=value`` on the CLI).
        max_cells: run at most this many unfinished cells, then write the report and return.
        progress: show a tqdm bar over cells.
        dry_run: validate and list the cells; run nothing, write nothing.
        report_only: run nothing; rebuild tables, CSV/JSON and plots from the records.
        jobs: cells run at the same time (each its own subprocess; e.g. several cells sharing one
            GPU). Cells start in study order; a feature shared by cells of one dataset is built
            once (the others wait for it).

    Raises:
        StudyError: invalid study (the message names the YAML line), or a finished cell
            whose configuration changed; raised before any cell runs.
    """
    log = log or (lambda msg: print(f"[study] {msg}", file=sys.stderr, flush=True))
    study = validate_study(path_or_dict, output_dir, overrides)
    for warning in study.errors.warnings:
        log(f"warning: {warning}")
    finished = [c for c in study.cells if study.finished_record(*c) is not None]
    if dry_run:
        return {"study": study, "output_dir": study.output_dir, "cells": study.cells,
                "finished": len(finished), "to_build": dict(study.to_build)}
    with _study_lock(study.output_dir), _sigterm_as_interrupt():
        live = {}
        if not report_only:
            _check_finished_specs(study)
            _prepare_datasets(study, log)
            todo = [c for c in study.cells if c not in set(finished)]
            if max_cells is not None:
                todo = todo[: max(0, int(max_cells))]
            log(f"{study.name}: {len(study.cells)} cells, {len(finished)} finished, running {len(todo)}; "
                f"folder {study.output_dir}")
            study.jobs = jobs
            if jobs > 1 and not os.environ.get("OMP_NUM_THREADS"):
                log(f"{jobs} cells at a time: each gets {_cell_threads(jobs)} CPU thread(s) (OMP_NUM_THREADS "
                    "overrides)")
            from tqdm import tqdm

            bar = tqdm(total=len(study.cells), initial=len(finished), desc=study.name, unit="cell",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            try:
                if jobs <= 1:
                    for cell in todo:
                        bar.set_postfix_str(cell_text(*cell))
                        live[cell] = _run_cell(study, study.cell_spec(*cell), log)
                        bar.update(1)
                        if live[cell] == "interrupted":
                            log("a cell was stopped by a signal: not starting the next ones (run again to resume)")
                            break
                else:
                    _run_cells_parallel(study, todo, jobs, live, bar, log)
            finally:
                bar.close()
                paths = write_report(study, collect_cells(study, live))
        else:
            paths = write_report(study, collect_cells(study))
    rows = _read_json(paths["cells_json"])["cells"]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"study": study, "output_dir": study.output_dir, "cells": rows, "counts": counts,
            "complete": counts.get("finished", 0) == len(rows), **paths}
