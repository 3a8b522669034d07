"""Reading a study's cell records into rows (:func:`collect_cells`), one per cell, and the metric
names the tables use."""

import os
import statistics

from recbole_mm.records import dead_run
from recbole_mm.study.spec import _model_role, _read_json


METRIC_NAMES = {"hit": "HR", "ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "precision": "Precision",
                "map": "MAP", "auc": "AUC", "gauc": "GAUC", "logloss": "LogLoss"}


# ============================================================================ collecting results


def _metric_label(key):
    name, _, k = key.partition("@")
    label = METRIC_NAMES.get(name, name)
    return f"{label}@{k}" if k else label


def _smaller_is_better(key):
    from recbole.evaluator.register import smaller_metrics

    return key.split("@")[0] in smaller_metrics


def collect_cells(study, live_status=None):
    """One row per cell: identity, status, timings and every validation/test metric."""
    rows = []
    live_status = live_status or {}
    for cell in study.cells:
        d, m, s = cell[:3]
        level = cell[3] if len(cell) > 3 else None
        paths = study.cell_paths(*cell)
        rec = study.finished_record(*cell)
        state = _read_json(paths["cell"]) or {}
        attempts = state.get("attempts", []) if isinstance(state, dict) else []
        last = attempts[-1] if attempts else {}
        row = {"dataset": d, "model": m, "seed": s, **({} if level is None else {"sparsity": level}),
               "role": _model_role(m, study.proposed)}
        dead = dead_run(paths["record"]) if rec is None else None
        if rec is not None:
            row["status"] = "finished"
        elif cell in live_status:
            row["status"] = live_status[cell]
        elif last and "ended" not in last:
            row["status"] = "interrupted"
        elif last and not (dead is not None and last.get("status", "failed") == "failed"):
            row["status"] = last.get("status", "failed")  # the study's own account: interrupted, timeout, ...
        elif dead is not None:  # its process died without a record: SIGKILL, the OOM killer
            row["status"] = "killed"
        elif last:
            row["status"] = last.get("status", "failed")
        else:
            row["status"] = "pending"
        timings = (rec or {}).get("timings_s") or {}
        # the cell processes' wall time, summed over attempts: a cell interrupted and resumed from its
        # checkpoint cost all of them; the run's own total when the study was killed before noting it
        walls = [a["wall_s"] for a in attempts if isinstance(a, dict) and a.get("wall_s") is not None]
        if rec is not None and last.get("wall_s") is None and timings.get("total") is not None:
            walls.append(timings["total"])
        wall = sum(walls) if walls else None
        row["attempts"] = len(attempts)
        row["wall_time_s"] = round(wall, 3) if wall is not None else None
        row["run_time_s"] = round(timings["total"], 3) if "total" in timings else None
        row["train_time_s"] = round(timings["train"], 3) if "train" in timings else None
        history = (rec or {}).get("history") or {}
        config = (rec or {}).get("config") or {}
        row["epochs"] = len(history.get("train_loss") or []) if rec else None
        # median seconds of one training pass (no evaluation) over the run's epochs (records since 2026-12-04)
        epoch_s = [float(x) for x in history.get("train_epoch_s") or [] if x is not None]
        row["train_epoch_s"] = round(statistics.median(epoch_s), 3) if epoch_s else None
        row["max_epochs"] = config.get("epochs")
        # the cell process's peak resident memory (records since 2026-12-04's fourth session)
        row["peak_rss_mb"] = ((rec or {}).get("peak_memory") or {}).get("rss_mb")
        # a multi-stage run (the record's "stages", from its trainer's stage_summaries): its first
        # stage's name, label, epochs (None when the stage was reused, not trained) and test result
        row["stage"] = _first_stage(rec or {})
        row["device"] = (rec or {}).get("device")
        row["host"] = (rec or {}).get("host")
        row["torch"] = ((rec or {}).get("versions") or {}).get("torch")
        row["valid_metric"] = (rec or {}).get("valid_metric")
        row["best_valid_score"] = (rec or {}).get("best_valid_score")
        row["test"] = {k: float(v) for k, v in ((rec or {}).get("test_result") or {}).items()}
        row["valid"] = {k: float(v) for k, v in ((rec or {}).get("best_valid_result") or {}).items()}
        slices = (rec or {}).get("test_slices")
        # test metrics per slice (recbole_mm.slices); absent or {"skipped": why} when not sliced
        row["slices"] = {k: v for k, v in slices.items() if isinstance(v, dict) and "buckets" in v} \
            if isinstance(slices, dict) else None
        row["valid_curve"] = [float(v) for v in history.get("valid_score") or []]
        row["eval_step"] = config.get("eval_step") or 1
        if level is not None:  # how the level thinned the training data (the records' own settings)
            row["sparsity_mode"] = config.get("sparsity_mode")
            row["sparsity_seed"] = config.get("sparsity_seed")
        row["record"] = os.path.relpath(paths["record"], study.output_dir)
        row["log"] = os.path.relpath(paths["log"], study.output_dir)
        row["error"] = None
        if rec is None:
            failed = _read_json(paths["failed"])
            if isinstance(failed, dict) and failed.get("error") and row["status"] != "pending":
                row["error"] = failed["error"]
            if row["status"] == "killed":
                row["error"] = (f"the run (pid {dead.get('pid')}, started {dead.get('started_at')}) died without "
                                "a record: killed by SIGKILL or the OOM killer")
        rows.append(row)
    return rows


def _first_stage(rec):
    """The first of a record's ``stages`` (a multi-stage run's earlier stage, from its trainer's
    ``stage_summaries``) as ``{name, label, model, epochs, max_epochs, test, description}``, or None.
    Records written before ``stages`` existed (until 2026-12-04) kept SICSRec's step 1 in
    ``history.step1``: read from there."""
    stages = rec.get("stages")
    if isinstance(stages, list) and stages and isinstance(stages[0], dict):
        stage = dict(stages[0])
    else:
        history = rec.get("history") if isinstance(rec.get("history"), dict) else {}
        old = history.get("step1") if isinstance(history.get("step1"), dict) else None
        if old is None:
            return None
        config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        trained = old.get("history") if isinstance(old.get("history"), dict) else None
        stage = {"name": "step1", "label": "step-1 SASRec", "model": "SASRec",
                 "epochs": len(trained.get("train_loss") or []) if trained else None,
                 "max_epochs": (config.get("step1_config") or {}).get("epochs", config.get("epochs")),
                 "test_result": old.get("test_result")}
    test = stage.pop("test_result", None)
    stage["test"] = {k: float(v) for k, v in test.items()} if isinstance(test, dict) and test else None
    return stage
