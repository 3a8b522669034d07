"""Hyper-parameter search: ``python run_recbole_mm.py tune --model=TSSR --params_file=...``.

RecBole's ``recbole.trainer.hyper_tuning.HyperTuning`` (hyperopt; install the extra
``pip install "recbole_mm[tune]"``) drives :func:`recbole_mm.quick_start.objective_function`,
which returns the **validation** score of each trial's best epoch. Trials are ranked by that
score only; test metrics are reported next to them and never used for selection.

Outputs (``--output_file``, default ``hyper/<model>-<dataset>-<time>.md``):

* ``<stem>.md``: the ranked table of trials (Markdown);
* ``<stem>.csv``: the same with every validation and test metric;
* ``<stem>.best.yaml``: the best configuration (searched parameters plus the fixed
  ``--key=value`` settings of the search), a file ``--config_files`` accepts.
* ``<stem>-trials/trial-<n>.json``: each trial's run record (config, per-epoch history, metrics).

Params files follow RecBole (``name choice [..]``, ``uniform lo,hi``, ``quniform lo,hi,q``,
``loguniform lo,hi`` with natural-log bounds); the plugin ships ``properties/hyper/TSSR.hyper``
and ``properties/hyper/SICSRec.hyper``, used when ``--params_file`` is omitted.
"""

import argparse
import csv
import datetime
import math
import os
import sys
import time

import numpy as np

SEARCH_ALGOS = ("exhaustive", "random", "bayes")


def build_parser():
    p = argparse.ArgumentParser(
        prog="run_recbole_mm.py tune",
        description="Hyper-parameter search over RecBole's HyperTuning, selecting on the validation score "
                    "only. Any other --key=value is a fixed setting of every trial.",
        allow_abbrev=False,
    )
    p.add_argument("--model", "-m", default="TSSR", help="model name (default: TSSR)")
    p.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    p.add_argument("--config_files", default=None, help="space-separated YAML files fixed for every trial")
    p.add_argument("--params_file", default=None,
                   help="search space (RecBole format); default: properties/hyper/<model>.hyper")
    p.add_argument("--algo", choices=SEARCH_ALGOS, default="exhaustive",
                   help="exhaustive (every combination of choice parameters), random or bayes (TPE)")
    p.add_argument("--max_evals", type=int, default=None,
                   help="trials for random/bayes (default 100, RecBole's); caps an exhaustive search")
    p.add_argument("--early_stop", type=int, default=10,
                   help="stop after this many trials without improvement (RecBole's default 10)")
    p.add_argument("--output_file", default=None,
                   help="ranked table (.md); .csv and .best.yaml are written next to it "
                        "(default: hyper/<model>-<dataset>-<time>.md)")
    p.add_argument("--display_file", default=None, help="optional plotly HTML of the search (needs plotly)")
    p.add_argument("--search_seed", type=int, default=2020, help="seed of the search algorithm")
    p.add_argument("--saved", action="store_true",
                   help="keep a best checkpoint per trial (in a temporary folder); default: no checkpoints")
    return p


def default_params_file(model):
    from recbole_mm.config import properties_dir

    path = os.path.join(properties_dir(), "hyper", f"{model}.hyper")
    return path if os.path.isfile(path) else None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def parse_overrides(argv):
    """``--key=value`` arguments (last one wins), converted to values as RecBole's command line does."""
    from recbole.config import Config

    own = {a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    own |= {"--m", "--d"}
    raw = {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            if f"--{key}" not in own:
                raw[key] = value
    return Config._convert_config_dict(None, raw)


class Objective:
    """``objective_function`` with the search's model, dataset and fixed settings; a
    trial's parameters beat the fixed settings. Trial ``n`` writes its run record to
    ``<record_dir>/trial-<n>.json`` (module-level class: picklable)."""

    def __init__(self, model, dataset, fixed, saved=False, objective=None, record_dir=None):
        self.model = model
        self.dataset = dataset
        self.fixed = dict(fixed)
        self.saved = saved
        self.objective = objective
        self.record_dir = record_dir
        self.calls = 0

    def __call__(self, params, config_file_list=None):
        from recbole_mm.quick_start import objective_function

        self.calls += 1
        config_dict = dict(self.fixed)
        config_dict.update(params)
        config_dict["model"] = self.model
        config_dict["dataset"] = self.dataset
        record = None
        if self.record_dir is not None:
            record = os.path.abspath(os.path.join(self.record_dir, f"trial-{self.calls:03d}.json"))
            config_dict["record_path"] = record
        fn = self.objective or objective_function
        result = dict(fn(config_dict, config_file_list, saved=self.saved))
        if record is not None and os.path.isfile(record):
            result["record_path"] = record
        return result


def _hyper_tuning_class():
    from recbole.trainer.hyper_tuning import HyperTuning

    class MMHyperTuning(HyperTuning):
        """RecBole's ``HyperTuning`` that keeps every trial (failed ones too), treats a best
        score of 0.0 as a score (RecBole's ``if not self.best_score`` does not), and seeds
        the search."""

        def __init__(self, *args, search_seed=2020, **kwargs):
            super().__init__(*args, **kwargs)
            self.search_seed = search_seed
            self.trials_log = []

        def trial(self, params):
            import hyperopt

            params = {k: _plain(v) for k, v in params.items()}
            params_str = self.params2str(params)
            number = len(self.trials_log) + 1
            print(f"trial {number}: {params}", flush=True)
            t0 = time.perf_counter()
            try:
                result = self.objective_function(dict(params), self.fixed_config_file_list)
            except Exception as exc:  # noqa: BLE001 - one bad combination must not end the search
                self.trials_log.append({"trial": number, "params": params, "status": "failed",
                                        "error": f"{type(exc).__name__}: {exc}",
                                        "seconds": time.perf_counter() - t0})
                print(f"trial {number} failed: {type(exc).__name__}: {exc}", flush=True)
                return {"status": hyperopt.STATUS_FAIL, "loss": float("inf")}
            seconds = time.perf_counter() - t0
            self.params_list.append(params_str)
            self.params2result[params_str] = result
            self.model = result["model"]
            score = float(result["best_valid_score"])
            bigger = bool(result["valid_score_bigger"])
            self.score_list.append(score)
            self.trials_log.append({"trial": number, "params": params, "status": "ok", "score": score,
                                    "bigger": bigger, "valid": dict(result.get("best_valid_result") or {}),
                                    "test": dict(result.get("test_result") or {}), "seconds": seconds,
                                    "record_path": result.get("record_path")})
            better = self.best_score is None or (score > self.best_score if bigger else score < self.best_score)
            if better and not math.isnan(score):
                self.best_score = score
                self.best_params = params
                self.best_test_result = result.get("test_result")
                self._print_result(result)
            return {"loss": -score if bigger else score, "status": hyperopt.STATUS_OK}

        def run(self):
            from hyperopt import fmin

            fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals,
                 early_stop_fn=self.early_stop_fn, rstate=np.random.RandomState(self.search_seed),
                 show_progressbar=False)
            if self.display_file is not None:
                self.plot_hyper()

    return MMHyperTuning


def ranked_trials(trials_log):
    """Successful trials by validation score (best first, ties by trial number), then failed ones."""
    ok = [t for t in trials_log if t["status"] == "ok" and not math.isnan(t["score"])]
    bad = [t for t in trials_log if t not in ok]
    ok.sort(key=lambda t: (-t["score"] if t["bigger"] else t["score"], t["trial"]))
    return ok + bad


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_outputs(stem, trials_log, *, model, dataset, valid_metric, fixed, config_files, command):
    """Write ``<stem>.md``, ``<stem>.csv`` and (when a trial succeeded) ``<stem>.best.yaml``."""
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    ranked = ranked_trials(trials_log)
    names = []
    for t in trials_log:
        for k in t["params"]:
            if k not in names:
                names.append(k)
    valid_keys, test_keys = [], []
    for t in ranked:
        for k in t.get("valid", {}):
            if k not in valid_keys:
                valid_keys.append(k)
        for k in t.get("test", {}):
            if k not in test_keys:
                test_keys.append(k)
    vm = valid_metric.lower()

    rows = []
    for rank, t in enumerate(ranked, start=1):
        ok = t["status"] == "ok"
        row = {"rank": rank if ok else "", "trial": t["trial"], "status": t["status"]}
        row.update({k: _plain(t["params"].get(k, "")) for k in names})
        row[f"valid_score({valid_metric})"] = t.get("score", "")
        row.update({f"valid_{k}": t["valid"].get(k, "") for k in valid_keys} if ok else {f"valid_{k}": "" for k in valid_keys})
        row.update({f"test_{k}": t["test"].get(k, "") for k in test_keys} if ok else {f"test_{k}": "" for k in test_keys})
        row["seconds"] = round(t["seconds"], 2)
        row["record"] = t.get("record_path") or ""
        row["error"] = t.get("error", "")
        rows.append(row)

    with open(stem + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (v if not isinstance(v, (list, dict)) else repr(v)) for k, v in row.items()})

    test_col = f"test_{vm}" if vm in test_keys else None
    lines = [
        f"# Hyper-parameter search: {model} on {dataset}",
        "",
        f"Command: `{command}`",
        "",
        f"Trials are ranked by the **validation** {valid_metric} of each trial's best epoch "
        "(the selection score). Test metrics are reported only; they were never used to select.",
        "",
        "| rank | trial | " + " | ".join(names) + f" | valid {valid_metric} | "
        + (f"test {valid_metric} | " if test_col else "") + "seconds | status |",
        "|" + "---|" * (len(names) + 5 + (1 if test_col else 0)),
    ]
    for row in rows:
        cells = [str(row["rank"]), str(row["trial"])] + [_fmt(row[k]) for k in names]
        cells.append(_fmt(row[f"valid_score({valid_metric})"]))
        if test_col:
            cells.append(_fmt(row[test_col]))
        cells += [f"{row['seconds']:.1f}", row["status"] if row["status"] == "ok" else f"failed: {row['error']}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    best = ranked[0] if ranked and ranked[0]["status"] == "ok" else None
    best_yaml = stem + ".best.yaml"
    if best is not None:
        lines += ["", f"Best configuration (trial {best['trial']}): `{best_yaml}`"]
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    if best is None:
        return None
    config = {k: _plain(v) for k, v in fixed.items() if k not in ("model", "dataset")}
    config.update({k: _plain(v) for k, v in best["params"].items()})
    files = " ".join(list(config_files or []) + [best_yaml])
    header = [
        f"# Best configuration of a hyper-parameter search ({command})",
        f"# trial {best['trial']} of {len(trials_log)}, selected on validation {valid_metric} = {best['score']:.6g}",
        "# (test metrics were not used for selection). Reproduce with:",
        f"#   python run_recbole_mm.py --model={model} --dataset={dataset} --config_files=\"{files}\"",
    ]
    with open(best_yaml, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n")
        yaml.safe_dump(config, f, sort_keys=False, default_flow_style=False)
    return best_yaml


def tune(model, dataset, params_file=None, algo="exhaustive", max_evals=None, early_stop=10,
         config_file_list=None, fixed=None, output_file=None, display_file=None, search_seed=2020,
         saved=False, objective=None, command=None):
    """Run a search; returns ``{"best_params", "best_score", "trials", "output", "best_yaml"}``."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")  # hyperopt 0.2.5's import
    try:
        import hyperopt  # noqa: F401
    except ImportError as exc:
        raise ImportError("hyper-parameter search needs hyperopt: pip install \"recbole_mm[tune]\" "
                          "(hyperopt==0.2.5, setuptools<81)") from exc
    import recbole_mm  # noqa: F401 - compat layer
    from recbole_mm.config import MMConfig
    from recbole_mm.registry import get_model

    get_model(model)
    params_file = params_file or default_params_file(model)
    if params_file is None:
        raise ValueError(f"no --params_file given and no properties/hyper/{model}.hyper ships with recbole_mm")
    fixed = dict(fixed or {})
    if algo not in SEARCH_ALGOS:
        raise ValueError(f"algo must be one of {SEARCH_ALGOS}, got {algo!r}")
    if output_file is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output_file = os.path.join("hyper", f"{model}-{dataset}-{stamp}.md")
    stem = os.path.splitext(output_file)[0]
    HyperTuning = _hyper_tuning_class()
    searcher = HyperTuning(
        Objective(model, dataset, fixed, saved=saved, objective=objective, record_dir=stem + "-trials"),
        params_file=params_file, fixed_config_file_list=config_file_list, display_file=display_file,
        algo=algo, max_evals=max_evals if max_evals is not None else 100, early_stop=early_stop,
        search_seed=search_seed,
    )
    if algo == "exhaustive" and max_evals is not None:
        searcher.max_evals = min(int(searcher.max_evals), int(max_evals))
    overlap = sorted(set(fixed) & set(searcher.space))
    if overlap:
        print(f"note: {overlap} are both fixed and searched; the searched values are used", file=sys.stderr)
    # the valid metric of these runs, for the table's headings
    saved_argv = sys.argv
    sys.argv = saved_argv[:1]
    try:
        probe = MMConfig(model=model, dataset=dataset, config_file_list=config_file_list,
                         config_dict=dict(fixed)) if objective is None else None
    finally:
        sys.argv = saved_argv
    valid_metric = probe["valid_metric"] if probe is not None else fixed.get("valid_metric", "valid score")
    from recbole_mm.validate import check_keys, known_keys

    check_keys(searcher.space, known_keys(probe), f"{params_file} (searched parameter)")  # the runs' validator
    command = command or f"tune --model={model} --dataset={dataset} --params_file={params_file} --algo={algo}"
    # RecBole's Config reads --key=value from sys.argv, which would beat every trial's
    # parameters: trials see a clean command line (the fixed settings come as config_dict).
    sys.argv = saved_argv[:1]
    try:
        searcher.run()
    except Exception as exc:  # hyperopt raises when every trial failed
        if not any(t["status"] == "ok" for t in searcher.trials_log):
            print(f"every trial failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        else:
            raise
    finally:
        sys.argv = saved_argv
        best_yaml = write_outputs(stem, searcher.trials_log, model=model, dataset=dataset,
                                  valid_metric=valid_metric, fixed=fixed, config_files=config_file_list,
                                  command=command)
    ranked = ranked_trials(searcher.trials_log)
    best = ranked[0] if ranked and ranked[0]["status"] == "ok" else None
    return {
        "best_params": best["params"] if best else None,
        "best_score": best["score"] if best else None,
        "trials": searcher.trials_log,
        "output": stem + ".md",
        "csv": stem + ".csv",
        "best_yaml": best_yaml,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _unknown = build_parser().parse_known_args(argv)
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    fixed = parse_overrides(argv)
    from recbole_mm.registry import UnknownModelError

    command = "python run_recbole_mm.py tune " + " ".join(argv)
    try:
        out = tune(args.model, args.dataset, params_file=args.params_file, algo=args.algo,
                   max_evals=args.max_evals, early_stop=args.early_stop, config_file_list=config_files,
                   fixed=fixed, output_file=args.output_file, display_file=args.display_file,
                   search_seed=args.search_seed, saved=args.saved, command=command)
    except (UnknownModelError, ImportError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ranked trials: {out['output']} (and {out['csv']})")
    if out["best_yaml"] is None:
        print("error: no trial succeeded", file=sys.stderr)
        return 1
    print(f"best (validation score {out['best_score']:.4f}): {out['best_params']}")
    print(f"best config: {out['best_yaml']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
