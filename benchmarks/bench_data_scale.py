"""Data preparation at scale, side by side: RecBole's materialised training samples vs the lazy path.

    python benchmarks/gen_synthetic.py --interactions 1000000
    python benchmarks/bench_data_scale.py --dataset synth_1000000 [--data_path benchmarks/data/]
        [--modes recbole,lazy] [--trim auto[,true,false]] [--bucketing [--bucket-pool-batches 64]]
        [--model SASRec] [--max-len 50] [--hidden-size 64] [--batch-size 2048]
        [--epoch-batches K] [--threads 1] [--nproc 1 [--ddp-timeout 7200]] [--json results.json]
        [--variant 'NAME=model:TSSR;softmax:sampled' ...]   (named variants, models side by side)

Each variant runs in a fresh subprocess, so its peak RSS (``VmHWM``) is its own: ``recbole``
(RecBole's own ``create_dataset`` and ``data_preparation``: its Python CSV parser, splits and
augmentation loop), ``plugin`` (the plugin's loading and splits, RecBole's augmentation:
``sequence_samples: recbole``), ``lazy`` once per ``--trim`` value (``trim_batches``), and with
``--bucketing`` each lazy variant again with ``length_bucketing: True``. A variant reports the
seconds of ``create_dataset`` and of ``data_preparation``, its RSS after imports and its peak RSS
after preparation, and its number of training samples. With ``--epoch-batches K`` it then trains
K batches (forward, backward, Adam; loading included) and projects an epoch as the first batch
(which includes the epoch's shuffle/bucketing and warm-up) plus the mean of the others times
the remaining batches; it also reports the mean width of the batches' item list (trimming).

With ``--nproc N`` (N > 1) each variant's subprocess starts N DDP ranks on this node as the
plugin's runner does (``torch.multiprocessing`` spawn, a free port on localhost, ``MMConfig`` with
``world_size``/``nproc``/``offset``/``local_rank``: gloo on CPU, NCCL on GPUs), and every rank builds
its own config, dataset and data loaders (as each rank of a DDP run does). Each rank reports its
preparation seconds, RSS after imports, peak RSS and the training samples of its loader's share
(the ``DistributedSampler``'s ``num_samples``, or the rank's share of the length-bucketed batches);
the table gives the maximum over ranks of the times and of the peak RSS, and the sum of the ranks'
peak RSS (the memory the node needs, at most). ``--epoch-batches`` is not available with ``--nproc``.
A rank that fails fails its variant: the other ranks are stopped, and ranks still running after
``--ddp-timeout`` seconds are stopped too.

A variant that dies (MemoryError, killed by the kernel, ...) is reported as failed with its exit
code; the others still run. Prints a Markdown table with ``recbole / <variant>`` ratios.
"""

import argparse
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- child (one variant)
def _rss_mib(key):
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None


def _train_batches(config, train_data, k):
    """Time ``k`` training batches (loading included); returns the measurements."""
    import torch

    from recbole_mm.optim import build_optimizer
    from recbole_mm.registry import get_model

    device = config["device"]
    model = get_model(config["model"])(config, train_data._dataset).to(device)
    # the model's parameter groups, as the trainer builds them (sparse tables: SparseAdam, recbole_mm.optim)
    groups = model.optimizer_param_groups() if hasattr(model, "optimizer_param_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = build_optimizer(groups, "adam", config["learning_rate"], 0.0,
                                lambda g: torch.optim.Adam(g, lr=config["learning_rate"]))
    list_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
    model.train()
    seconds, widths = [], []
    batches = iter(train_data)
    for _ in range(k):
        t0 = time.perf_counter()
        try:
            inter = next(batches)
        except StopIteration:
            break
        inter = inter.to(device)
        loss = model.calculate_loss(inter)
        loss = sum(loss) if isinstance(loss, tuple) else loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        if list_field in inter:
            widths.append(int(inter[list_field].shape[1]))
    n_batches = len(train_data)
    # mean, not median: bucketed batches differ in width, and an epoch costs their sum
    rest = statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {
        "batch_seconds": seconds,
        "first_batch_s": seconds[0],
        "batch_s": rest,
        "epoch_measured": len(seconds) == n_batches,
        "epoch_projected_s": sum(seconds) if len(seconds) == n_batches else seconds[0] + rest * (n_batches - 1),
        "mean_batch_width": statistics.mean(widths) if widths else None,
        "peak_rss_mib": _rss_mib("VmHWM"),
    }


def _prepare(spec, label, **config_keys):
    """Threads, logging, config (``config_keys`` on top of the variant's), dataset and data loaders of
    one variant, timed; returns (config, train loader, measurements)."""
    import logging

    import torch

    sys.path.insert(0, ROOT)
    from recbole.utils import init_seed

    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation  # RecBole's, plus length bucketing
    from recbole_mm.quick_start import create_dataset

    torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.WARNING, format=f"  [{label}] %(levelname)s %(message)s")
    result = {"rss_after_imports_mib": _rss_mib("VmRSS")}

    config_dict = dict(spec["config"], **config_keys)
    if config_dict.pop("_native", False):  # RecBole's own loader, splits and augmentation loop, untouched
        from recbole.data import create_dataset
        from recbole.data import data_preparation
    config = MMConfig(model=spec["model"], dataset=spec["dataset"], config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    t1 = time.perf_counter()
    interactions = dataset.inter_num  # before data_preparation augments the dataset in place
    train_data, _, _ = data_preparation(config, dataset)
    t2 = time.perf_counter()
    train_set = train_data._dataset
    result.update(
        device=str(config["device"]),
        interactions=interactions,
        create_dataset_s=t1 - t0,
        data_preparation_s=t2 - t1,
        preparation_s=t2 - t0,
        peak_rss_prep_mib=_rss_mib("VmHWM"),
        data_rss_mib=_rss_mib("VmHWM") - result["rss_after_imports_mib"],
        train_samples=getattr(train_data, "sample_size", len(train_set)),
        lazy_sequences=bool(getattr(train_set, "lazy_sequences", False)),
        trimmed=bool(getattr(train_set, "trims_batches", False)),
    )
    return config, train_data, result


def run_variant(spec):
    """Build the config, the dataset and the data loaders of one variant; returns its results."""
    from recbole.utils import init_seed

    config, train_data, result = _prepare(spec, spec["name"])
    result["train_batches"] = len(train_data)
    if spec["epoch_batches"] > 0:
        init_seed(config["seed"], config["reproducibility"])
        result.update(_train_batches(config, train_data, spec["epoch_batches"]))
    return result


# ----------------------------------------------------------------------------- child (one variant, N DDP ranks)
def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _bucket_share(buckets):
    """Training samples one rank draws per epoch from a :class:`LengthBucketBatchSampler` (the batch
    sizes depend only on the counts, not on the draw)."""
    n, global_size = len(buckets.lengths), buckets.batch_size * buckets.world_size
    pool = max(1, buckets.pool_batches) * global_size
    total = 0
    for start in range(0, n, pool):
        full, rest = divmod(min(pool, n - start), global_size)
        total += full * len(range(buckets.rank, global_size, buckets.world_size))
        total += len(range(buckets.rank, rest, buckets.world_size))
    return total


def _rank_samples(train_data):
    """Training samples in this rank's share of the training loader, per epoch."""
    from torch.utils.data.distributed import DistributedSampler

    buckets = getattr(train_data, "_buckets", None)
    if buckets is not None:
        return _bucket_share(buckets)
    if isinstance(getattr(train_data, "sampler", None), DistributedSampler):
        return train_data.sampler.num_samples  # RecBole's loaders: padded to a multiple of the ranks
    return len(train_data) * train_data.step


def _run_rank(local_rank, spec, port):
    """One DDP rank of a variant: config (which joins the process group), dataset, data loaders."""
    import torch

    nproc = spec["nproc"]
    config, train_data, result = _prepare(spec, f"{spec['name']} rank {local_rank}", world_size=nproc,
                                          ip="localhost", port=port, nproc=nproc, offset=0, local_rank=local_rank)
    result.update(
        rank=torch.distributed.get_rank(),
        ddp_backend=config["ddp_backend"],
        rank_train_samples=_rank_samples(train_data),
        rank_train_batches=len(train_data),
    )
    return result


def _rank_main(local_rank, spec, port, out_dir):
    """``torch.multiprocessing`` target: runs one rank, writes ``rank<i>.json``; a failure is re-raised
    (after the file is written) so that the launcher stops the other ranks."""
    sys.argv = sys.argv[:1]
    result = {"local_rank": local_rank}
    try:
        result.update(status="ok", **_run_rank(local_rank, spec, port))
    except BaseException as exc:
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        finally:
            with open(os.path.join(out_dir, f"rank{local_rank}.json"), "w") as f:
                json.dump(result, f)


def _stop_processes(processes, grace_s=10):
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def _ddp_failure(failure, ranks):
    """One line: which rank failed first, and why (its own error where it wrote one)."""
    from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

    own = {r["local_rank"]: r["error"] for r in ranks if r["status"] != "ok" and "exitcode" not in r}
    if isinstance(failure, ProcessException):
        rank = failure.error_index
        if rank in own:
            why = own[rank]
        elif isinstance(failure, ProcessExitedException):
            why = str(failure) + (" (out of memory?)" if failure.signal_name == "SIGKILL" else "")
        else:  # ProcessRaisedException: the traceback's last line
            why = str(failure).strip().splitlines()[-1]
        return f"rank {rank}: {why}"
    if failure is not None:
        return failure  # the timeout
    rank, why = next(iter(own.items())) if own else next((r["local_rank"], r["error"]) for r in ranks
                                                         if r["status"] != "ok")
    return f"rank {rank}: {why}"


DDP_MAX_KEYS = ("create_dataset_s", "data_preparation_s", "preparation_s", "rss_after_imports_mib",
                "peak_rss_prep_mib", "data_rss_mib", "rank_train_samples", "rank_train_batches")


def run_ddp_variant(spec):
    """Start ``spec["nproc"]`` DDP ranks of one variant and join them (with a timeout); returns the
    ranks' results and their maxima/sums. Raises when a rank fails or the ranks time out."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    nproc, timeout = spec["nproc"], spec["ddp_timeout"]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_rank_main, args=(spec, _free_port(), out_dir), nprocs=nproc,
                                     join=False, start_method="spawn")
        failure = None
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    failure = f"TimeoutError: ranks still running after {timeout:g} s (--ddp-timeout); stopped"
                    break
        except ProcessException as exc:  # join has stopped the other ranks
            failure = exc
        finally:
            _stop_processes(context.processes)  # no-op unless timed out or interrupted
        ranks = []
        for i in range(nproc):
            path = os.path.join(out_dir, f"rank{i}.json")
            if os.path.exists(path):
                with open(path) as f:
                    ranks.append(json.load(f))
            else:
                code = context.processes[i].exitcode
                why = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 \
                    else f"exit code {code}"
                ranks.append({"local_rank": i, "status": "failed", "error": f"no result ({why})",
                              "exitcode": code})
    result = {"ranks": nproc, "rank_results": ranks}
    if failure is not None or any(r["status"] != "ok" for r in ranks):
        raise DDPVariantFailed(_ddp_failure(failure, ranks), result)
    first = ranks[0]
    result.update({key: first[key] for key in ("device", "ddp_backend", "interactions", "train_samples",
                                               "lazy_sequences", "trimmed")})
    result.update({key: max(r[key] for r in ranks) for key in DDP_MAX_KEYS})
    result["peak_rss_all_ranks_mib"] = sum(r["peak_rss_prep_mib"] for r in ranks)
    result["rank_train_samples_sum"] = sum(r["rank_train_samples"] for r in ranks)
    return result


class DDPVariantFailed(RuntimeError):
    """A rank of a DDP variant failed (or the ranks timed out); ``partial`` holds the ranks' results."""

    def __init__(self, message, partial):
        super().__init__(message)
        self.partial = partial


def child_main(spec_json, out_path):
    spec = json.loads(spec_json)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value pairs from the command line
    try:
        result = dict(status="ok", **(run_ddp_variant(spec) if spec.get("nproc", 1) > 1 else run_variant(spec)))
    except DDPVariantFailed as exc:  # the ranks printed their tracebacks
        result = dict(exc.partial, status="failed", error=str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which goes on
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    with open(out_path, "w") as f:
        json.dump(result, f)
    sys.exit(0 if result["status"] == "ok" else 1)


# ----------------------------------------------------------------------------- parent
def variants(args):
    """(name, extra config) for each variant asked for."""
    if args.variant:  # named lazy variants, each with its own keys (``model`` included)
        return [(name, dict({"sequence_samples": "lazy", "trim_batches": "auto"}, **extra))
                for name, extra in args.variant]
    out = []
    for mode in args.modes:
        if mode in ("recbole", "plugin"):  # RecBole's own pipeline | the plugin's loading + RecBole's augmentation
            out.append((mode, {"sequence_samples": "recbole", "_native": mode == "recbole"}))
            continue
        for trim, (key, value) in itertools.product(args.trim, args.vary or [(None, None)]):
            name = "lazy" if args.trim == ["auto"] else f"lazy trim={trim}"
            extra = {"sequence_samples": "lazy", "trim_batches": trim if trim == "auto" else trim == "true"}
            if key is not None:
                name += f" {key}={value}"
                extra[key] = value
            out.append((name, extra))
            if args.bucketing:
                out.append((name + " +bucketing", dict(extra, length_bucketing=True,
                                                        bucket_pool_batches=args.bucket_pool_batches)))
    return out


def run_child(name, extra, args):
    extra = dict(extra)
    model = extra.pop("model", args.model)
    config = {
        "data_path": args.data_path,
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "hidden_size": args.hidden_size,
        "train_batch_size": args.batch_size,
        "show_progress": False,
        "state": "WARNING",
        **args.set,
        **extra,
    }
    spec = {"name": name, "model": model, "dataset": args.dataset, "config": config,
            "threads": args.threads, "epoch_batches": args.epoch_batches}
    if args.nproc > 1:
        spec.update(nproc=args.nproc, ddp_timeout=args.ddp_timeout)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), out_path],
                              env=env)
        wall = time.perf_counter() - t0
        result = {}
        if os.path.exists(out_path):
            with open(out_path) as f:
                result = json.load(f)
    result.update(name=name, model=model, config=config, returncode=proc.returncode, wall_s=wall)
    if proc.returncode != 0:
        result["status"] = "failed"
        if "error" not in result:
            why = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 \
                else f"exit code {proc.returncode}"
            result["error"] = why + " (out of memory?)" if proc.returncode == -signal.SIGKILL else why
    return result


ROWS = [  # (key, label, format)
    ("create_dataset_s", "create_dataset (s)", "{:.2f}"),
    ("data_preparation_s", "data_preparation (s)", "{:.2f}"),
    ("preparation_s", "preparation total (s)", "{:.2f}"),
    ("rss_after_imports_mib", "RSS after imports (MiB)", "{:.0f}"),
    ("peak_rss_prep_mib", "peak RSS after preparation (MiB)", "{:.0f}"),
    ("data_rss_mib", "peak RSS of the data: peak - after imports (MiB)", "{:.0f}"),
    ("train_samples", "training samples", "{:,}"),
    ("train_batches", "batches per epoch", "{:,}"),
    ("first_batch_s", "first batch incl. epoch setup (s)", "{:.3f}"),
    ("batch_s", "s/batch (mean of the others)", "{:.3f}"),
    ("epoch_projected_s", "epoch (s): measured when --epoch-batches covers it, else projected", "{:.1f}"),
    ("mean_batch_width", "mean item list width", "{:.1f}"),
    ("peak_rss_mib", "peak RSS after training batches (MiB)", "{:.0f}"),
]

DDP_ROWS = [  # --nproc > 1: maxima over the ranks, and the node's sum of peaks
    ("ranks", "ranks", "{}"),
    ("create_dataset_s", "create_dataset, max over ranks (s)", "{:.2f}"),
    ("data_preparation_s", "data_preparation, max over ranks (s)", "{:.2f}"),
    ("preparation_s", "preparation total, max over ranks (s)", "{:.2f}"),
    ("rss_after_imports_mib", "RSS after imports per rank, max (MiB)", "{:.0f}"),
    ("peak_rss_prep_mib", "peak RSS per rank, max (MiB)", "{:.0f}"),
    ("peak_rss_all_ranks_mib", "peak RSS, all ranks (MiB)", "{:.0f}"),
    ("data_rss_mib", "peak RSS of the data per rank, max: peak - after imports (MiB)", "{:.0f}"),
    ("train_samples", "training samples (whole training set)", "{:,}"),
    ("rank_train_samples", "training samples per rank, max", "{:,}"),
    ("rank_train_samples_sum", "training samples, sum over ranks (incl. DistributedSampler padding)", "{:,}"),
    ("rank_train_batches", "batches per epoch per rank, max", "{:,}"),
]
NO_RATIO = {"ranks"}


def markdown(results, args, command):
    ok = {r["name"]: r for r in results if r["status"] == "ok"}
    base_name = results[0]["name"]  # ratios against the first variant (recbole, unless --modes says otherwise)
    base = ok.get(base_name)
    ratio_names = [r["name"] for r in results[1:]] if base else []
    first = next(iter(ok.values()), {})
    interactions = f"{first['interactions']:,}" if "interactions" in first else "?"
    lines = [
        f"`{command}`",
        "",
        (f"{', '.join(dict.fromkeys(r.get('model', args.model) for r in results))}" if args.variant
         else args.model) + f" on {args.dataset} ({interactions} interactions), "
        f"MAX_ITEM_LIST_LENGTH {args.max_len}, hidden {args.hidden_size}, batch {args.batch_size}, "
        + (f"{args.nproc} DDP ranks ({first.get('ddp_backend', '?')}), " if args.nproc > 1 else "")
        + f"{args.threads} thread(s){' per rank' if args.nproc > 1 else ''}, device {first.get('device', '?')}, "
        f"{os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}",
        "",
        "| | " + " | ".join(r["name"] for r in results)
        + "".join(f" | {base_name} / {n}" for n in ratio_names) + " |",
        "|---" * (1 + len(results) + len(ratio_names)) + "|",
        "| status | " + " | ".join("ok" if r["status"] == "ok" else f"failed: {r['error']} (rc {r['returncode']})"
                                  for r in results) + " |" * (len(ratio_names) + 1),
        "| trimmed batches | " + " | ".join(str(r.get("trimmed", "")) for r in results)
        + " |" * (len(ratio_names) + 1),
    ]
    for key, label, fmt in (DDP_ROWS if args.nproc > 1 else ROWS):
        if not any(r.get(key) is not None for r in results):
            continue
        cells = [fmt.format(r[key]) if r.get(key) is not None else "—" for r in results]
        for name in ratio_names:
            if key in NO_RATIO:
                cells.append("")
                continue
            other = ok.get(name, {}).get(key)
            cells.append(f"{base[key] / other:.2f}" if base.get(key) is not None and other else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--data_path", default=os.path.join(ROOT, "benchmarks", "data", ""),
                   help="default: benchmarks/data/ (where gen_synthetic.py writes)")
    p.add_argument("--model", default="SASRec")
    p.add_argument("--modes", default="recbole,lazy",
                   help="comma list of recbole (RecBole's own create_dataset + data_preparation), plugin (the "
                        "plugin's loading and splits + RecBole's augmentation loop), lazy")
    p.add_argument("--trim", default="auto", help="trim_batches of the lazy variants: comma list of auto, true, false")
    p.add_argument("--bucketing", action="store_true", help="also run each lazy variant with length_bucketing")
    p.add_argument("--bucket-pool-batches", type=int, default=64)
    p.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2048, help="train_batch_size")
    p.add_argument("--epoch-batches", type=int, default=0, help="training batches to time (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads and OMP_NUM_THREADS of each variant")
    p.add_argument("--nproc", type=int, default=1,
                   help="DDP ranks per variant (> 1: each variant's subprocess spawns that many ranks on this node)")
    p.add_argument("--ddp-timeout", type=float, default=7200,
                   help="with --nproc > 1: seconds before a variant's ranks still running are stopped (failed)")
    p.add_argument("--vary", metavar="KEY=V1,V2",
                   help="one lazy variant per value of a config key (YAML values, ~ = None), e.g. ce_memory_mb=~,1024")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config for every variant (YAML value), repeatable, e.g. --set train_windows=last")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE;KEY:VALUE",
                   help="a named lazy variant with its own settings, e.g. 'TSSR sampled=model:TSSR;softmax:sampled' "
                        "(repeatable; replaces --modes/--trim/--vary; ratios against the first)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.nproc > 1 and args.epoch_batches:
        p.error("--epoch-batches is not available with --nproc > 1: the DDP variants measure data preparation only "
                "(time training batches in a single-process run)")
    if args.ddp_timeout <= 0:
        p.error("--ddp-timeout must be positive")
    import yaml

    def key_values(text, opt):
        if "=" not in text:
            p.error(f"{opt} takes KEY=VALUE")
        key, values = text.split("=", 1)
        return key, [yaml.safe_load(v) for v in values.split(",")]

    if args.vary:
        key, values = key_values(args.vary, "--vary")
        args.vary = [(key, v) for v in values]
    args.set = dict((k, v[0]) for k, v in (key_values(t, "--set") for t in args.set))
    named = []
    for text in args.variant:
        name, _, settings = text.partition("=")
        if not name or not settings:
            p.error("--variant takes NAME=KEY:VALUE;KEY:VALUE")
        extra = {}
        for item in settings.split(";"):
            key, sep, value = item.partition(":")
            if not sep:
                p.error(f"--variant {name}: {item!r} is not KEY:VALUE")
            extra[key.strip()] = yaml.safe_load(value)
        named.append((name, extra))
    args.variant = named
    args.modes = args.modes.split(",")
    args.trim = args.trim.split(",")
    for value, allowed, opt in ((args.modes, ("recbole", "plugin", "lazy"), "--modes"),
                                (args.trim, ("auto", "true", "false"), "--trim")):
        if not value or set(value) - set(allowed):
            p.error(f"{opt} takes a comma list of {', '.join(allowed)}")

    command = "python " + shlex.join(sys.argv)
    results = []
    for name, extra in variants(args):
        print(f"{name} ...", file=sys.stderr, flush=True)
        result = run_child(name, extra, args)
        print(f"{name}: {result['status']} in {result['wall_s']:.1f} s"
              + (f" ({result['error']})" if result["status"] != "ok" else ""), file=sys.stderr, flush=True)
        results.append(result)
    print(markdown(results, args, command))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
