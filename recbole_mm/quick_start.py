"""Run a model end to end: ``run`` (one or many processes), ``run_recbole_mm`` and ``objective_function``.

Mirrors RecBole's ``recbole.quick_start`` (``run``, ``run_recbole``, ``run_recboles``) without
importing that module (it imports ray at import time, which breaks on numpy 2 /
setuptools >= 81) and without ``get_flops`` (it deep-copies the model). Every run writes a
JSON record next to its log; under DDP only global rank 0 writes logs, records and
checkpoints (see ``docs/DISTRIBUTED.md``).
"""

import contextlib
import datetime
import functools
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from logging import getLogger

import torch
from recbole.data import create_dataset as recbole_create_dataset
from recbole.utils import init_logger, init_seed, set_color

from recbole_mm.atomic import write_json_atomic
from recbole_mm.config import MMConfig
from recbole_mm.data.lazy import data_preparation
from recbole_mm.registry import get_dataset_class, get_model, get_spec, get_trainer, publishers_for
from recbole_mm.trainer import forget_last_checkpoints, format_metrics, remove_last_checkpoints
from recbole_mm.utils import jsonable  # noqa: F401  (also this module's public name, as before)


def _reset_root_logger():
    # RecBole's init_logger uses logging.basicConfig, which is a no-op once the root logger has
    # handlers: a second run in the same process would keep logging into the first run's file.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


def _log_file():
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return os.path.abspath(handler.baseFilename)
    return None


def create_dataset(config):
    """The model's own dataset class (e.g. multimodal), else RecBole's choice, with the plugin's
    interaction checks (duplicates: :mod:`recbole_mm.data.checks`)."""
    from recbole_mm.data.checks import recbole_dataset_class, with_interaction_checks

    dataset_class = get_dataset_class(config)
    if config["dataset_save_path"]:
        if dataset_class is None:  # a dataset RecBole saved earlier: its own loader
            return recbole_create_dataset(config)
        getLogger().warning(f"dataset_save_path is ignored for {config['model']}: its dataset "
                            f"({dataset_class.__name__}) is built from the atomic files")
    dataset_class = dataset_class or recbole_dataset_class(config)
    dataset = with_interaction_checks(dataset_class)(config)
    if config["save_dataset"]:
        dataset.save()
    return dataset


def peak_memory():
    """This process's peak resident memory (MiB, Linux / macOS) and, on CUDA, the peak allocated by
    torch (MiB): a cell of a study is one process, so these are the cell's peaks."""
    out = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_mb"] = round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)
    except (ImportError, OSError):
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def library_versions():
    # package metadata, not imports: importing transformers just for its version costs seconds
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("recbole", "torch", "numpy", "pandas", "transformers", "recbole_mm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=None)
def git_commit():
    """The plugin's git commit (``-dirty`` with uncommitted changes), read once per process: a run
    first asks at its start, so its record names the code it imported, not a later checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def build_record(config, result, timings, trainer=None, log_file=None, status="finished", error=None):
    record = {
        "status": status,
        "resumed_from": getattr(trainer, "resumed_from", None),
        "distributed": None if config["single_spec"] else {
            "world_size": config["world_size"],
            "backend": config["ddp_backend"],
            "replica_digests": result.get("replica_digests"),
        },
        "model": config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "valid_metric": config["valid_metric"],
        "best_valid_score": result.get("best_valid_score"),
        "best_valid_result": result.get("best_valid_result"),
        "test_result": result.get("test_result"),
        "test_slices": result.get("test_slices"),  # test metrics per bucket (recbole_mm.slices)
        "timings_s": timings,
        "peak_memory": peak_memory(),
        "history": getattr(trainer, "history", None),
        "checkpoint": getattr(trainer, "saved_model_file", None) if result.get("saved") else None,
        "test_checkpoint": getattr(trainer, "loaded_checkpoint", None),
        "log_file": log_file,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "device": str(config["device"]),
        "command": sys.argv,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {k: config.final_config_dict[k] for k in sorted(config.final_config_dict)},
        "dataset_config_file": getattr(config, "dataset_config_file", None),  # the dataset YAML read
    }
    if result.get("cpu_threads"):
        record["cpu_threads"] = result["cpu_threads"]  # [threads, why]: results may differ with the count
    if result.get("data_checks"):
        record["data_checks"] = result["data_checks"]  # duplicates found (and dropped) at load
    if result.get("sparsity"):
        record["sparsity"] = jsonable(result["sparsity"])  # what sparsity_keep < 1 kept of the training split
    if result.get("cold_items"):
        record["cold_items"] = jsonable(result["cold_items"])  # the items held out of training (recbole_mm.data.cold)
    if result.get("test_item_sets"):
        record["test_item_sets"] = jsonable(result["test_item_sets"])  # test metrics of warm- / cold-target users
    if result.get("stages"):
        record["stages"] = jsonable(result["stages"])  # a multi-stage run's earlier stages (trainer.stage_summaries)
    if result.get("published"):
        record["published"] = result["published"]  # model -> what this run published for it (share_dir)
    if error is not None:
        record["error"] = error
    return jsonable(record)


def _test_slices(trainer, config, dataset, valid_data, test_data, logger):
    """``test_slices`` of the record (:mod:`recbole_mm.slices`) from the test evaluation just run. A
    failure here is logged and recorded, never allowed to lose the finished run."""
    from recbole_mm.slices import compute_test_slices

    rows = trainer.last_eval_topk() if hasattr(trainer, "last_eval_topk") else None
    try:
        slices = compute_test_slices(rows, config, dataset, valid_data, test_data)
    except Exception as exc:  # noqa: BLE001 - the metrics are computed; the slices are extra
        logger.warning(f"test slices not computed: {type(exc).__name__}: {exc}")
        return {"skipped": f"error: {type(exc).__name__}: {exc}"}
    if "skipped" in slices:
        logger.info(set_color("test slices", "blue") + f": skipped ({slices['skipped']})")
    return slices


def test_item_sets(config, slices):
    """``test_item_sets`` of the record: for each set of ``eval_item_sets`` but ``all`` (warm, cold),
    the ``item_set`` slice's bucket (``n`` and the test metrics of the users whose target is in that
    set, ranked over all items); None without such sets or without cold items."""
    from recbole_mm.data.cold import eval_item_sets

    sets = [s for s in eval_item_sets(config) if s != "all"]
    family = (slices or {}).get("item_set") if isinstance(slices, dict) else None
    if not sets or not family:
        return None
    return {s: family["buckets"].get(s, {"n": 0}) for s in sets}


def global_rank(config):
    """``local_rank + offset`` (RecBole's rank convention); 0 in a single-process run."""
    if config["single_spec"]:
        return 0
    return int(config["local_rank"] or 0) + int(config["offset"] or 0)


def _prepare_dirs(config):
    # RecBole's ensure_dir is exists-then-makedirs: two ranks creating the same folder race
    # (FileExistsError, verified). Creating them first with exist_ok=True removes the race.
    for path in (config["checkpoint_dir"] or "saved", os.path.join("log", str(config["model"])), "log_tensorboard"):
        os.makedirs(path, exist_ok=True)


def _init_rank_logger(config):
    """RecBole's file + console logger on global rank 0; console errors only elsewhere."""
    _reset_root_logger()
    if global_rank(config) == 0:
        init_logger(config)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rank {global_rank(config)}] %(levelname)s  %(message)s"))
        logging.basicConfig(level=logging.ERROR, handlers=[handler])


def record_path_for(config, log_file):
    if config["record_path"]:
        return config["record_path"]
    if log_file:
        return os.path.splitext(log_file)[0] + ".json"
    return None


_WRITING_RECORD = [False]  # set while a stopping run writes its record (a second signal waits for it)


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler) or SIGHUP reached a run: it stops like Ctrl-C.
    ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message, signum=signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


@contextlib.contextmanager
def _signals_as_interrupt():
    """SIGTERM and SIGHUP raise :class:`RunInterrupted` in the main thread while a run is in progress,
    so that the run writes an ``interrupted`` record (SIGKILL cannot be caught: see ``records``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received = []

    def handler(signum, frame):
        if _WRITING_RECORD[0]:
            return  # the run is writing its record (after Ctrl-C, a failure or a first signal): let it finish
        if received:
            # the first one was swallowed (raised inside a __del__ or a callback): die at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name}", signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _writable_or_error(path, what, fix):
    """Raise a ConfigError unless ``path`` (or its nearest existing parent) can be written."""
    from recbole_mm.validate import ConfigError

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} to {os.path.abspath(path)} ({probe} is not writable). {fix}")


def preflight(config, saved=True):
    """Everything that can be checked before data loading: the dataset's atomic files (header
    types, id columns, encodings, float values, ...) and the folders the run writes to."""
    from recbole_mm.data.preflight import check_atomic_files

    check_atomic_files(config)
    if global_rank(config) != 0:
        return
    _writable_or_error("log", "RecBole's log", "Run from a writable working directory.")
    _writable_or_error("log_tensorboard", "RecBole's tensorboard log", "Run from a writable working directory.")
    if saved:
        _writable_or_error(config["checkpoint_dir"] or "saved", "checkpoints",
                           "Set checkpoint_dir to a writable folder (--checkpoint_dir=...).")
    if config["record_path"]:
        _writable_or_error(os.path.dirname(os.path.abspath(config["record_path"])), "the run record",
                           "Set record_path to a writable location.")


def announce_resume(config, logger, saved=True):
    """A rerun of the same command continues the earlier run: say so first, and how to start afresh."""
    from recbole_mm.trainer import last_checkpoint_path, resume_mode

    if not saved or config["save_last_checkpoint"] is False or resume_mode(config) == "false":
        return None
    path = last_checkpoint_path(config)
    if not os.path.isfile(path):
        return None
    when = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds")
    logger.warning(set_color("RESUMING", "red") + f": this exact run was interrupted earlier; training continues "
                   f"from its last checkpoint {path} (written {when}). To start afresh instead: --fresh "
                   "(or --resume=false).")
    return path


def _busy_cpus(samples=5, interval_s=0.04):
    """Other runnable processes right now: the median over a few samples of the kernel's count of
    runnable tasks (``/proc/loadavg``, 4th field) less this process; the 1-minute load average
    where that file is absent (it lags: a job that just ended still counts)."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if i + 1 < samples:
            time.sleep(interval_s)
    counts.sort()
    return float(max(0, counts[len(counts) // 2]))


def choose_cpu_threads(config):
    """Set torch's CPU thread count for a run on the CPU; returns ``(threads, why)`` or None on a GPU.

    ``cpu_threads: auto`` (default) keeps an ``OMP_NUM_THREADS`` the user set; otherwise it takes
    the cores this process may use, shared among the node's DDP processes, less the cores other
    work keeps busy now (runnable processes), at least 1: on a 2-core machine with one other
    busy process that is 1 thread, which ran 2.3x faster per batch than torch's default of 2.
    An integer forces that many threads.
    """
    if getattr(config["device"], "type", "cpu") != "cpu":
        return None
    setting = config["cpu_threads"]
    if setting not in (None, "auto"):
        n, why = int(setting), "cpu_threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        procs = 1 if config["single_spec"] else int(config["nproc"] or 1)
        busy = _busy_cpus()
        free = cores - int(round(busy))
        n = max(1, min(cores // max(procs, 1), free // max(procs, 1)))
        why = f"auto: {cores} cores, {busy:g} busy with other work" + (f", {procs} processes" if procs > 1 else "")
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads(), why


def _write_stop_record(exc, config, result, timings, trainer, log_file, record_file, dataset_obj, t_start,
                       saved, logger):
    """``<record>.interrupted.json`` (Ctrl-C, SIGTERM, SIGHUP) or ``<record>.failed.json``, with the last
    finished epoch and the traceback; removes the running marker. Global rank 0 only."""
    if not record_file or global_rank(config) != 0:
        return
    from recbole_mm import records

    timings["total"] = time.perf_counter() - t_start
    interrupted = isinstance(exc, KeyboardInterrupt)
    result["data_checks"] = getattr(dataset_obj, "interaction_checks", None)
    status = "interrupted" if interrupted else "failed"
    path = records.sibling(record_file, status)
    rec = build_record(config, result, timings, trainer, log_file, status=status,
                       error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    rec["last_finished_epoch"] = _last_finished_epoch(trainer)
    rec["traceback"] = traceback.format_exc()
    if interrupted and saved and config["save_last_checkpoint"] is not False:
        rec["resume"] = "rerun the same command: it continues from the last checkpoint (resume: auto)"
    try:
        write_json_atomic(path, rec)
        exc.recbole_mm_record = path  # the CLI names it in its one-line error
    except OSError as write_error:
        logger.error(f"could not write the {status} record {path}: {write_error}")
    records.remove_running(record_file)


def _last_finished_epoch(trainer):
    history = getattr(trainer, "history", None) or {}
    losses = history.get("train_loss") or []
    return len(losses) - 1 if losses else None


def run_recbole_mm(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    queue=None,
):
    """Train, validate and test one model; returns RecBole's ``run_recbole`` result dict.

    Keys: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``, plus ``record_path`` (the JSON record) and ``timings_s``.

    Before any data is loaded the config is validated (``MMConfig``) and the data files and
    output folders are checked (:func:`preflight`). A ``<record>.running.json`` marker exists
    while the run is in progress; the run ends with ``<record>.json`` (finished),
    ``<record>.failed.json`` or ``<record>.interrupted.json`` (Ctrl-C, SIGTERM, SIGHUP, with the
    last finished epoch). A failed run never touches an earlier run's files.
    """
    t_start = time.perf_counter()
    git_commit()  # the code this process runs (the record is written at the end)
    config = MMConfig(
        model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict
    )
    preflight(config, saved)
    threads = choose_cpu_threads(config)
    init_seed(config["seed"], config["reproducibility"])
    forget_last_checkpoints()
    _prepare_dirs(config)
    _init_rank_logger(config)
    logger = getLogger()
    log_file = _log_file()
    resuming = announce_resume(config, logger, saved) if global_rank(config) == 0 else None
    if threads is not None:
        logger.info(set_color("CPU threads", "blue") + f": {threads[0]} ({threads[1]}; set cpu_threads or "
                    "OMP_NUM_THREADS to change)")
    logger.info(sys.argv)
    logger.info(config)
    timings = {}
    trainer = None
    dataset_obj = None
    result = {"saved": saved, "cpu_threads": list(threads) if threads else None}
    record_file = record_path_for(config, log_file) if config["record_runs"] is not False else None
    with _signals_as_interrupt():  # SIGTERM/SIGHUP -> RunInterrupted, until the record is written
        try:
            if record_file and global_rank(config) == 0:
                from recbole_mm import records

                records.collect_dead_runs(os.path.dirname(os.path.abspath(record_file)), logger)
                records.write_running(record_file, model=config["model"], dataset=config["dataset"],
                                      seed=config["seed"], log_file=log_file, command=sys.argv,
                                      resuming_from=resuming)
            t0 = time.perf_counter()
            dataset_obj = create_dataset(config)
            logger.info(dataset_obj)
            train_data, valid_data, test_data = data_preparation(config, dataset_obj)
            timings["data"] = time.perf_counter() - t0

            init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
            t0 = time.perf_counter()
            model_obj = get_model(config["model"])(config, train_data._dataset).to(config["device"])
            logger.info(model_obj)
            timings["model_init"] = time.perf_counter() - t0

            trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model_obj)
            trainer.keep_finished_last_checkpoint = True  # removed below, once the test is done
            t0 = time.perf_counter()
            best_valid_score, best_valid_result = trainer.fit(
                train_data, valid_data, saved=saved, show_progress=config["show_progress"]
            )
            timings["train"] = time.perf_counter() - t0
            if _last_finished_epoch(trainer) is None and not getattr(trainer, "resumed_from", None) \
                    and getattr(trainer, "history", None) is not None:
                raise RuntimeError(f"no training epoch ran (epochs={config['epochs']}); nothing to test")
            if not config["single_spec"] and config["ddp_check_replicas"] is not False:
                digests = trainer.replica_digests()
                result["replica_digests"] = digests
                if len(set(digests)) != 1:
                    logger.error(f"DDP replicas differ after training: {digests}")
            t0 = time.perf_counter()
            test_result = trainer.evaluate(
                test_data, load_best_model=saved, show_progress=config["show_progress"]
            )
            timings["test"] = time.perf_counter() - t0
            if global_rank(config) == 0:  # before any other evaluation replaces the trainer's rows
                result["test_slices"] = _test_slices(trainer, config, dataset_obj, valid_data, test_data, logger)
            # the model protocol's hooks (registry.ModelSpec, trainer.SafeLoadingMixin): a multi-stage
            # trainer's earlier models on the same test split, and its stages for the record
            if hasattr(trainer, "extra_test_results"):
                result["extra_test_results"] = trainer.extra_test_results(
                    test_data, show_progress=config["show_progress"])
                result["stages"] = trainer.stage_summaries()
            if saved and global_rank(config) == 0 and config["share_dir"]:
                # a run other models can reuse (a SASRec run: SICSRec's step 1), published into share_dir
                published = {name: fn(config, trainer, train_data, valid_data, best_valid_score, best_valid_result)
                             for name, fn in publishers_for(get_spec(config["model"]).name)}
                result["published"] = {k: v for k, v in published.items() if v}
            timings["total"] = time.perf_counter() - t_start
            if hasattr(trainer, "remove_last_checkpoint"):
                trainer.remove_last_checkpoint()  # the run is complete: nothing left to resume
            remove_last_checkpoints()  # nested trainers' too (e.g. SICSRec's step 1)

            places = config["metric_decimal_place"] or 4
            logger.info(set_color("best valid ", "yellow") + f": {format_metrics(best_valid_result, places)}")
            logger.info(set_color("test result", "yellow") + f": {format_metrics(test_result, places)}")
            result.update(
                best_valid_score=best_valid_score,
                valid_score_bigger=config["valid_metric_bigger"],
                best_valid_result=best_valid_result,
                test_result=test_result,
            )
            result["data_checks"] = getattr(dataset_obj, "interaction_checks", None)
            result["sparsity"] = getattr(dataset_obj, "sparsity_stats", None)
            result["cold_items"] = getattr(dataset_obj, "cold_stats", None)
            result["test_item_sets"] = test_item_sets(config, result.get("test_slices"))
        except BaseException as exc:
            _WRITING_RECORD[0] = True
            try:
                _write_stop_record(exc, config, result, timings, trainer, log_file, record_file, dataset_obj,
                                   t_start, saved, logger)
            except Exception as record_error:  # noqa: BLE001 - the run's own error is the one to report
                logger.error(f"could not write the run's stop record: {type(record_error).__name__}: {record_error}")
            finally:
                if record_file and global_rank(config) == 0:
                    from recbole_mm import records

                    records.remove_running(record_file)
                _WRITING_RECORD[0] = False
            raise
    if record_file and global_rank(config) == 0:
        from recbole_mm import records

        write_json_atomic(record_file, build_record(config, result, timings, trainer, log_file))
        records.remove_running(record_file)
        logger.info(set_color("run record", "blue") + f": {record_file}")
    result.pop("saved", None)
    result.pop("cpu_threads", None)
    result["record_path"] = record_file if global_rank(config) == 0 else None
    result["timings_s"] = timings
    result["model"] = config["model"]
    _close_tensorboard(trainer)
    if not config["single_spec"]:
        torch.distributed.destroy_process_group()
        if config["local_rank"] == 0 and queue is not None:
            queue.put(result)  # each node's first process reports to its launcher (RecBole)
    return result


def _close_tensorboard(trainer):
    """Flush and close the trainer's tensorboard writer (RecBole never closes it, so the events of
    the last up to 120 s were only written if the writer happened to be collected before exit)."""
    writer = getattr(trainer, "tensorboard", None)
    if writer is not None and hasattr(writer, "close"):
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - a log writer must not fail a finished run
            getLogger().warning(f"could not close the tensorboard writer: {type(exc).__name__}: {exc}")


def _spawn_worker(local_rank, model, dataset, config_file_list, kwargs):
    """``mp.spawn`` target (RecBole's ``run_recboles``): one DDP process.

    After a finished run the process ends with ``os._exit(0)`` once its logs are flushed, without
    interpreter finalization: gloo's worker threads release their last collective's tensors
    asynchronously, and one doing so while the interpreter finalizes needs the GIL and aborts the
    process (``terminate called without an active exception``, SIGABRT; seen in about 1 run in 10
    on 2 loaded cores, core dump: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` ->
    ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``; pytorch/pytorch PR 179291). Everything
    the run keeps is already written: records and checkpoints atomically, its result on the queue;
    logs are flushed, tensorboard writers closed and a wandb run finished first. A failing run raises
    as before (torch.multiprocessing reports its traceback)."""
    kwargs = dict(kwargs)
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=local_rank)
    run_recbole_mm(model, dataset, config_file_list, **kwargs)
    _exit_without_finalization()


def _exit_without_finalization(code=0):
    import gc

    tensorboard = sys.modules.get("torch.utils.tensorboard")  # imported only if a writer was made
    if tensorboard is not None:
        for obj in gc.get_objects():  # nested trainers' writers (e.g. SICSRec's step 1)
            if isinstance(obj, tensorboard.SummaryWriter):
                with contextlib.suppress(Exception):
                    obj.close()
    wandb = sys.modules.get("wandb")  # RecBole's WandbLogger never finishes its run; atexit would have
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.finish()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
):
    """RecBole's ``recbole.quick_start.run``: one process, or ``nproc`` DDP processes on this node.

    Single process when ``nproc == 1`` and ``world_size <= 0``. Otherwise ``nproc`` processes
    are spawned; ``world_size`` is the number of processes over all nodes (default ``nproc``),
    ``group_offset`` the global rank of this node's first process, ``ip:port`` the address of
    the node holding global rank 0. NCCL on GPUs, gloo on CPU (``ddp_backend`` overrides).
    Returns the result dict of this node's first process.
    """
    nproc = int(nproc)
    world_size = int(world_size)
    if nproc == 1 and world_size <= 0:
        return run_recbole_mm(model=model, dataset=dataset, config_file_list=config_file_list,
                              config_dict=config_dict, saved=saved)
    if world_size == -1:
        world_size = nproc
    if nproc < 1 or world_size < nproc or not 0 <= int(group_offset) <= world_size - nproc:
        raise ValueError(f"need 1 <= nproc <= world_size and 0 <= group_offset <= world_size - nproc; got "
                         f"nproc={nproc}, world_size={world_size}, group_offset={group_offset}")
    import torch.multiprocessing as mp

    config_dict = dict(config_dict or {})
    config_dict.update(world_size=world_size, ip=str(ip), port=int(port), nproc=nproc, offset=int(group_offset))
    for path in ("log", "log_tensorboard", config_dict.get("checkpoint_dir") or "saved"):
        os.makedirs(path, exist_ok=True)
    queue = mp.get_context("spawn").SimpleQueue()
    kwargs = {"config_dict": config_dict, "saved": saved, "queue": queue}
    mp.spawn(_spawn_worker, args=(model, dataset, config_file_list, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def objective_function(config_dict=None, config_file_list=None, saved=False):
    """RecBole ``HyperTuning`` objective: selects on the validation score only.

    Returns ``model``, ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``
    and ``test_result`` (reported, never used for selection). With ``saved=True`` the
    checkpoint goes to a temporary directory unless ``checkpoint_dir`` is given.
    """
    config_dict = dict(config_dict or {})
    tmpdir = None
    if saved and "checkpoint_dir" not in config_dict:
        tmpdir = tempfile.TemporaryDirectory(prefix="recbole_mm_tune_")
        config_dict["checkpoint_dir"] = tmpdir.name
    try:
        result = run_recbole_mm(
            config_file_list=config_file_list, config_dict=config_dict, saved=saved
        )
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    return {
        "model": result["model"],
        "best_valid_score": result["best_valid_score"],
        "valid_score_bigger": result["valid_score_bigger"],
        "best_valid_result": result["best_valid_result"],
        "test_result": result["test_result"],
    }
