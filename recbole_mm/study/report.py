"""The study's report: Markdown tables (per dataset, stages, variants, slices, sparsity),
``cells.csv`` / ``cells.json``, ``tables/<dataset>.md`` and ``results.md`` (:func:`write_report`)."""

import contextlib
import datetime
import os
import platform
import socket

from recbole_mm.atomic import write_text_atomic
from recbole_mm.study.collection import _metric_label, collect_cells
from recbole_mm.study.plots import plot_metrics, plot_sparsity, plot_valid_curves
from recbole_mm.study.spec import _dict_changes, _model_role, _write_json, cell_text, level_name
from recbole_mm.study.stats import (CI_LEVEL, P_ADJUST_FULL_NAMES, PFamily, _adjust_all, _fmt_p, _in_family,
                                    _mean_std, _paired_metric, ci_half_width, dataset_summary, within_seed_noise)


def _cells_ran_on(rows):
    """One line naming where the finished cells ran (host, device, torch), from their records:
    the report may be rebuilt elsewhere (``--report-only``) than where the cells ran."""
    where = {}
    for r in rows:
        if r.get("status") == "finished":
            key = f"{r.get('host') or '?'} ({r.get('device') or '?'}, torch {r.get('torch') or '?'})"
            where[key] = where.get(key, 0) + 1
    if not where:
        return "- cells ran on: (no finished cell)"
    return "- cells ran on: " + "; ".join(f"{k}: {n} cell{'s' if n != 1 else ''}" for k, n in sorted(where.items()))


def _report_metrics(study, rows):
    if study.report:
        return list(study.report)
    seen = []
    for row in rows:
        for k in row["test"]:
            if k not in seen:
                seen.append(k)
    return seen


def _mean_header(label):
    return f"{label}: mean ± std (± {CI_LEVEL:.0%} CI)"


CI_SENTENCE = (f"In brackets: the half-width of the two-sided {CI_LEVEL:.0%} t confidence interval of the "
               f"mean over the seeds, t({(1 + CI_LEVEL) / 2:g}, n-1) · std / √n (n/a with one seed).")


def _fmt(v, digits=4):
    return "—" if v is None else f"{v:.{digits}f}"


def _range_text(values, unit=""):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def _epochs_part(cells, key, cap_key):
    text = _range_text([r.get(key) for r in cells])
    if text != "—" and all(r.get(key) is not None and r.get(key) == r.get(cap_key) for r in cells):
        text += " (cap)"
    return text


def _epochs_text(cells):
    """Epochs over a model's finished cells: "12 (cap)", "25-28", "12 (cap) + 9-12" (first stage + the run)."""
    if not cells:
        return "—"
    text = _epochs_part(cells, "epochs", "max_epochs")
    if any((r.get("stage") or {}).get("max_epochs") is not None for r in cells):
        stage = _epochs_part([r.get("stage") or {} for r in cells], "epochs", "max_epochs")
        text = f"{'reused' if stage == '—' else stage} + {text}"
    return text


def _wall_text(cells):
    return _range_text([None if r.get("wall_time_s") is None else round(r["wall_time_s"]) for r in cells], " s")


def _epoch_time_text(cells):
    """Seconds per training epoch (each cell's median over its epochs), shortest-longest over cells."""
    return _range_text([None if r.get("train_epoch_s") is None else round(r["train_epoch_s"], 1) for r in cells],
                       " s")


def _peak_text(cells):
    """The cells' peak resident memory (GiB), lowest-highest; — for records without it."""
    return _range_text([None if r.get("peak_rss_mb") is None else round(r["peak_rss_mb"] / 1024, 2)
                        for r in cells], " GiB")


def dataset_table(study, rows, dataset, metrics, family=None):
    """Markdown table (and comparison) for one dataset, and its summary. ``family``: the
    :class:`PFamily` of the report, whose adjusted p-values it shows (default: one of this table)."""
    return _in_family(study, family, lambda fam: _dataset_table(study, rows, dataset, metrics, fam))


def _dataset_table(study, rows, dataset, metrics, family):
    summary = dataset_summary(study, rows, dataset, metrics)
    pm = summary["per_model"]
    labels = [_metric_label(k) for k in metrics]
    n_max = max((pm[m]["n"] for m in study.models), default=0)
    lines = [f"## {dataset}", ""]
    lines.append(f"Test metrics, mean ± std over seeds ({', '.join(map(str, study.seeds))}); n = finished seeds. "
                 f"{CI_SENTENCE} **Bold**: best mean per metric. "
                 f"Baselines: {', '.join(m for m in study.models if m not in study.proposed) or 'none'}; "
                 f"proposed: {', '.join(study.proposed) or 'none'}.")
    lines.append("")
    lines.append("| Model | Role | n | " + " | ".join(map(_mean_header, labels))
                 + " | epochs | s / training epoch | peak memory | wall time / cell |")
    lines.append("|---|---|---|" + "---|" * len(labels) + "---|---|---|---|")
    for m in study.models:
        finished = [r for r in rows if r["dataset"] == dataset and r["model"] == m and r["status"] == "finished"]
        cells = []
        for k in metrics:
            mean, std = pm[m]["stats"][k]
            if mean is None:
                cells.append("—")
                continue
            text = _fmt_mean_std(mean, std, len(pm[m]["values"][k]))
            if summary["best"][k] is not None and mean == summary["best"][k]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {m} | {_model_role(m, study.proposed)} | {pm[m]['n']} | " + " | ".join(cells)
                     + f" | {_epochs_text(finished)} | {_epoch_time_text(finished)} | {_peak_text(finished)} "
                     f"| {_wall_text(finished)} |")
    lines.append("")
    lines.append("epochs: training epochs run, the range over seeds; (cap) when every seed ran to its `epochs` "
                 "limit instead of stopping early; multi-stage runs (e.g. SICSRec) show their first stage + the run. "
                 "s / training epoch: each cell's median training pass (no evaluation), shortest-longest over "
                 "seeds. peak memory: the cell process's peak resident memory (— in records written before it "
                 "was recorded). wall time: the "
                 "cell's processes (summed over its attempts when it was interrupted and resumed), shortest-longest "
                 "over seeds; cells that ran at the same time shared the machine.")
    lines.append("")
    if study.proposed:
        lines.append("Relative improvement of each proposed model over the best baseline per metric (difference "
                     "of the means / baseline mean), and a two-sided paired t-test over the seeds both finished "
                     "(scipy.stats.ttest_rel; n = pairs; fewer than 2 seeds: n/a). " + family.sentence(marks=True))
        lines.append("")
        lines.append(f"| Model ({family.header()}) | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        verdicts = []
        for m in study.proposed:
            cells, wins, losses = [], [], []
            for k, label in zip(metrics, labels):
                c = summary["comparisons"].get((m, k))
                if c is None:
                    cells.append("—")
                    continue
                rel = "n/a" if c["relative_pct"] is None else f"{c['relative_pct']:+.1f}%"
                c["p_adj"] = family.adjust(("vs best baseline", dataset, m, c["baseline"], k), c["p"])
                cells.append(f"{rel} vs {c['baseline']} ({family.test_text(c['p'], c['p_adj'], c['n'])})")
                marked = c["better"] and family.significant(c["p"], c["p_adj"])
                (wins if c["better"] else losses).append(
                    label + (f" ({family.label or 'p'}<0.05)" if marked else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
            if wins or losses:
                text = f"- {m}: "
                text += f"beats the best baseline on {', '.join(wins)}" if wins else "beats the best baseline on no metric"
                if losses:
                    text += f"; does **not** beat it on {', '.join(losses)}"
                verdicts.append(text + ".")
        lines.append("")
        lines.extend(verdicts)
        if verdicts:
            lines.append("")
    if n_max == 0:
        lines.append("_No finished cells yet._")
        lines.append("")
    return "\n".join(lines), summary


SLICE_TITLES = {"target_popularity": "Target popularity (training interactions of the target item)",
                "history_length": "History length (the user's interactions before the test target)",
                "modality": "Target modality (content the target item has)",
                "item_set": "Target item set (cold_items: warm = trained on, cold = held out of training)"}


def _slice_metrics(cells, metrics):
    """The report's metrics at the valid metric's cut-off (``ndcg@10`` -> HR@10, NDCG@10, ...) that the
    records slice; all sliced report metrics when the valid metric has no cut-off."""
    sliced = set()
    for r in cells:
        for family in r["slices"].values():
            for bucket in family["buckets"].values():
                sliced.update(k for k in bucket if k != "n")
    valid = next((str(r["valid_metric"]).lower() for r in cells if r.get("valid_metric")), "")
    k = valid.partition("@")[2]
    chosen = [m for m in metrics if m in sliced and (not k or m.partition("@")[2] == k)]
    return chosen or [m for m in metrics if m in sliced]


def slices_table(study, rows, dataset, metrics):
    """The "Slices" section of one dataset (markdown; "" when no finished record has slices): per
    slice family, per model and bucket, the mean over finished seeds of the valid metric's family
    (e.g. HR@10 / NDCG@10), and the test users per bucket."""
    cells = [r for r in rows if r["dataset"] == dataset and r["status"] == "finished" and r.get("slices")]
    keys = _slice_metrics(cells, metrics) if cells else []
    if not keys:
        return ""
    lines = [f"### {dataset}: slices", "",
             f"Test metrics per slice of the test users: {' / '.join(_metric_label(k) for k in keys)}, mean over "
             "the finished seeds; `users`: test users in the bucket (a range when the runs differ). Buckets "
             "no run has users in are left out; a model without item features has no modality slice. "
             "Definitions and bucket edges: `test_slices` of each run record (`recbole_mm.slices`).", ""]
    for family in ("target_popularity", "history_length", "modality", "item_set"):
        have = [r for r in cells if family in r["slices"]]
        if not have:
            continue
        labels = []
        for r in have:
            labels += [b for b, v in r["slices"][family]["buckets"].items() if v.get("n") and b not in labels]
        if not labels:
            continue
        lines += [f"**{SLICE_TITLES.get(family, family)}**", ""]
        lines.append("| Model | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        users = [_range_text([(r["slices"][family]["buckets"].get(b) or {}).get("n") for r in have]) for b in labels]
        lines.append("| users | " + " | ".join(users) + " |")
        for m in study.models:
            mine = [r for r in have if r["model"] == m]
            if not mine:
                continue
            texts = []
            for b in labels:
                means = []
                for k in keys:
                    values = [r["slices"][family]["buckets"].get(b, {}).get(k) for r in mine]
                    values = [float(v) for v in values if v is not None]
                    means.append(_fmt(sum(values) / len(values)) if values else "—")
                texts.append(" / ".join(means))
            lines.append(f"| {m} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


def _valid_family(cells, metrics):
    """The report's metrics at the valid metric's cut-off (``ndcg@10`` -> hit@10, ndcg@10, ...); the
    valid metric alone when it has no cut-off; every metric when neither is among them."""
    valid = next((str(r["valid_metric"]).lower() for r in cells if r.get("valid_metric")), "")
    k = valid.partition("@")[2]
    chosen = [m for m in metrics if m.partition("@")[2] == k] if k else [m for m in metrics if m == valid]
    return chosen or list(metrics)


def sparsity_table(study, rows, dataset, metrics):
    """The "accuracy vs sparsity" section of one dataset (the study's ``sparsity:`` axis): per metric
    of the valid metric's family, a table of models x levels with the mean ± std of the test metric
    over the finished seeds and the change of the mean from the model's at the largest level.
    Returns ``(markdown, curves)``, ``curves[metric][model]``: ``[(level, mean, std), ...]`` (for
    :func:`plot_sparsity`)."""
    levels = sorted(study.sparsity or [], reverse=True)
    finished = [r for r in rows
                if r["dataset"] == dataset and r["status"] == "finished" and r.get("sparsity") is not None]
    keys = _valid_family(finished, metrics)
    modes = sorted({str(r.get("sparsity_mode") or "prefix") for r in finished})
    seeds = sorted({"the run's seed" if r.get("sparsity_seed") is None else str(r["sparsity_seed"]) for r in finished})
    lines = [f"## {dataset}: accuracy vs training-data sparsity", "",
             f"Test {' / '.join(_metric_label(k) for k in keys)} (the valid metric's family) per level of the "
             "study's `sparsity:` axis, the fraction of the training data kept (`sparsity_keep`"
             + (f"; mode {', '.join(modes)}, draws seeded by {', '.join(seeds)}" if finished else "")
             + "; `recbole_mm.data.sparsity`, docs/STUDIES.md). Only the training split is thinned: validation and "
             "test samples, targets and histories are the same at every level. Mean ± std over the finished "
             f"seeds; in brackets the change of the mean from the model's own at keep {levels[0]:g}"
             + f"; [n=…] where not all {len(study.seeds)} seeds finished.",
             ""]
    curves = {k: {} for k in keys}
    if not finished:
        return "\n".join(lines + ["_No finished cells yet._", ""]), curves
    for key in keys:
        lines += [f"**{_metric_label(key)}**", "",
                  "| Model | " + " | ".join(f"keep {k:g}" for k in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for m in study.models:
            stats = {}
            for k in levels:
                values = [r["test"][key] for r in finished
                          if r["model"] == m and r["sparsity"] == k and key in r["test"]]
                if values:
                    stats[k] = (*_mean_std(values), len(values))
            if not stats:
                continue
            reference = stats.get(levels[0], (None,))[0]
            texts = []
            for k in levels:
                if k not in stats:
                    texts.append("—")
                    continue
                mean, std, n = stats[k]
                text = _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")
                if k != levels[0] and reference:
                    text += f" ({(mean - reference) / abs(reference) * 100:+.1f}%)"
                if n < len(study.seeds):
                    text += f" [n={n}]"
                texts.append(text)
            lines.append(f"| {m} | " + " | ".join(texts) + " |")
            curves[key][m] = [(k, stats[k][0], stats[k][1]) for k in sorted(stats)]
        lines.append("")
    return "\n".join(lines), curves


def machine_info():
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    with contextlib.suppress(Exception):
        import recbole

        info["recbole"] = recbole.__version__
    return info


# ============================================================================ report


_CSV_FIXED = ["dataset", "model", "seed", "role", "status", "wall_time_s", "attempts", "run_time_s", "train_time_s",
              "train_epoch_s", "epochs",
              "max_epochs", "device", "host", "torch", "valid_metric", "best_valid_score"]


def _csv_text(rows):
    import csv
    import io

    fixed = list(_CSV_FIXED)
    if any("sparsity" in r for r in rows):  # the study's sparsity axis: the level after the seed
        fixed.insert(fixed.index("seed") + 1, "sparsity")

    # multi-stage runs: <stage>_epochs after max_epochs, <stage>_test_<metric> after the valid columns
    stages = []
    for r in rows:
        name = (r.get("stage") or {}).get("name")
        if name and name not in stages:
            stages.append(name)
    fixed[fixed.index("max_epochs") + 1:fixed.index("max_epochs") + 1] = [f"{n}_epochs" for n in stages]
    test_keys, valid_keys, stage_keys = [], [], []
    for r in rows:
        test_keys += [k for k in r["test"] if k not in test_keys]
        valid_keys += [k for k in r["valid"] if k not in valid_keys]
        stage_keys += [k for k in (r.get("stage") or {}).get("test") or {} if k not in stage_keys]
    header = (fixed + [f"test_{k}" for k in test_keys] + [f"valid_{k}" for k in valid_keys]
              + [f"{n}_test_{k}" for n in stages for k in stage_keys] + ["record", "log", "error"])

    def stage_value(r, name, key):
        stage = r.get("stage") or {}
        if stage.get("name") != name:
            return ""
        value = stage.get("epochs") if key is None else (stage.get("test") or {}).get(key)
        return "" if value is None else value

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([stage_value(r, c[:-len("_epochs")], None) if c.endswith("_epochs") and c[:-len("_epochs")] in stages
                         else (r.get(c) if r.get(c) is not None else "") for c in fixed]
                        + [r["test"].get(k, "") for k in test_keys] + [r["valid"].get(k, "") for k in valid_keys]
                        + [stage_value(r, n, k) for n in stages for k in stage_keys]
                        + [r["record"], r["log"], r["error"] or ""])
    return buf.getvalue()


def _fmt_mean_std(mean, std, n=None):
    """"0.3100 ± 0.0100"; with ``n`` (the number of values), the CI half-width in brackets:
    "0.3100 ± 0.0100 (± 0.0248)", "0.3000 (n/a)" for one value."""
    if mean is None:
        return "—"
    text = _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")
    if n is not None:
        half = ci_half_width(std, n)
        text += " (n/a)" if half is None else f" (± {_fmt(half)})"
    return text


def _comparison_text(c, family=None):
    """A :func:`_paired_metric` result in words: "+4.6% (p=0.0312, n=3)", with a ``family``
    (:class:`PFamily`) and ``c["p_adj"]``: "+4.6% (p=0.0312, p_Holm=0.0936, n=3)"."""
    if c["a"][0] is None or not c["b"][0]:
        return "—"
    if c["identical"]:  # the same runs (e.g. a SASRec cell and SICSRec's step 1 of that seed)
        return f"identical on every seed (n={c['n']})"
    test = (family.test_text(c["p"], c.get("p_adj"), c["n"]) if family is not None
            else f"p={_fmt_p(c['p'])}, n={c['n']}")
    return f"{c['relative_pct']:+.1f}% ({test})"


def _paired_rows(a_by_seed, b_by_seed, metrics, family, key):
    """Seeds both have; ``a``'s and ``b``'s mean ± std (and CI) per metric over those pairs; and
    ``a`` against ``b`` paired by seed, its p adjusted in ``family`` under ``key`` + (metric,)
    ("identical on every seed" when every pair is equal)."""
    comparisons = [_paired_metric(a_by_seed, b_by_seed, k) for k in metrics]
    _adjust_all(comparisons, metrics, family, key)
    return (sorted(set(a_by_seed) & set(b_by_seed)), [_fmt_mean_std(*c["a"], c["n"]) for c in comparisons],
            [_fmt_mean_std(*c["b"], c["n"]) for c in comparisons],
            [_comparison_text(c, family) for c in comparisons])


def stage_table(study, rows, dataset, metrics, family=None):
    """Markdown: each model whose records carry an earlier stage's test result (e.g. SICSRec's step-1
    SASRec) against that stage, paired per seed (the same run's own earlier model); '' when no row has
    one. The other models of the study are compared with the same stage model of the same seed (same
    config, split and evaluator), so a study gets that baseline without a cell of its own. ``family``:
    as in :func:`dataset_table`."""
    return _in_family(study, family, lambda fam: _stage_table(study, rows, dataset, metrics, fam))


def _stage_table(study, rows, dataset, metrics, family):
    lines = []
    finished = [r for r in rows if r["dataset"] == dataset and r["status"] == "finished"]

    def staged(r):
        return (r.get("stage") or {}).get("test")

    with_stage = [m for m in study.models if any(r["model"] == m and staged(r) for r in finished)]
    for m in with_stage:
        cells = [r for r in finished if r["model"] == m and staged(r)]
        stage = cells[0]["stage"]
        label, short = stage.get("label") or stage.get("name"), stage.get("name")
        description = stage.get("description") or (
            f"Each run's {label}, tested by the same evaluator on the same split: a paired baseline per seed.")
        lines += ([] if not lines else [""]) + [
            f"### {dataset}: {m} vs its own {label}", "",
            f"{description} Mean ± std over seeds; relative difference of the means and a two-sided paired "
            f"t-test over the seeds. Other models are paired with the {label} of the same seed. {CI_SENTENCE} "
            f"{family.sentence()}", "",
            f"| Model ({family.header()}) | n | " + " | ".join(_mean_header(_metric_label(k)) for k in metrics) + " |",
            "|---|---|" + "---|" * len(metrics)]
        base_by_seed = {r["seed"]: staged(r) for r in cells}
        ours_by_seed = {r["seed"]: r["test"] for r in cells}
        what = f"vs {short}"
        seeds, ours, base, comp = _paired_rows(ours_by_seed, base_by_seed, metrics, family,
                                               (what, dataset, m, f"{m} {short}"))
        lines.append(f"| {m} {label} | {len(cells)} | " + " | ".join(base) + " |")
        lines.append(f"| {m} | {len(seeds)} | " + " | ".join(ours) + " |")
        lines.append(f"| {m} vs {label} | | " + " | ".join(comp) + " |")
        for other in study.models:
            if other in with_stage:
                continue
            by_seed = {r["seed"]: r["test"] for r in finished if r["model"] == other}
            seeds, theirs, _, comp = _paired_rows(by_seed, base_by_seed, metrics, family,
                                                  (what, dataset, other, f"{m} {short}"))
            if not seeds:
                continue
            lines.append(f"| {other} | {len(seeds)} | " + " | ".join(theirs) + " |")
            lines.append(f"| {other} vs {m} {label} (same seed) | | " + " | ".join(comp) + " |")
    return "\n".join(lines + [""]) if lines else ""


def variants_table(study, rows, dataset, metrics, family=None):
    """Markdown: each variant whose model is also in the study against that model, paired per
    seed, with the wall time per cell of both and whether the variant is within seed noise of
    it; '' when there is no such variant. ``family``: as in :func:`dataset_table`."""
    return _in_family(study, family, lambda fam: _variants_table(study, rows, dataset, metrics, fam))


def _variants_table(study, rows, dataset, metrics, family):
    pairs = [(v, study.model_of(v)) for v in study.variants if study.model_of(v) in study.models]
    if not pairs:
        return ""
    finished = [r for r in rows if r["dataset"] == dataset and r["status"] == "finished"]
    labels = [_metric_label(k) for k in metrics]
    differences = {v: ", ".join(f"{k}: {new}" for k, _, new in
                                _dict_changes(study.cell_overrides(dataset, m), study.cell_overrides(dataset, v)))
                   for v, m in pairs}
    lines = [f"### {dataset}: variants vs their base model", "",
             "; ".join(f"{v}: {m} with `{differences[v] or 'the same config'}`" for v, m in pairs)
             + ". Test metrics, mean ± std over the seeds both finished (n); relative difference of the means "
             "(positive: the variant is better) and a two-sided paired t-test over those seeds "
             f"(scipy.stats.ttest_rel); seconds per training epoch (each cell's median over its epochs, training "
             f"pass only) and wall time of the cells, shortest-longest. {CI_SENTENCE} "
             + family.sentence(), "",
             f"| Model ({family.header()}) | n | " + " | ".join(map(_mean_header, labels))
             + " | s / training epoch | wall time / cell |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    verdicts = []
    for variant, base in pairs:
        ours, theirs = ({r["seed"]: r for r in finished if r["model"] == m} for m in (variant, base))
        seeds = sorted(set(ours) & set(theirs))
        comparisons = [_paired_metric({s: r["test"] for s, r in ours.items()},
                                      {s: r["test"] for s, r in theirs.items()}, k) for k in metrics]
        _adjust_all(comparisons, metrics, family, ("variant vs base", dataset, variant, base))
        lines += [f"| {base} | {len(seeds)} | " + " | ".join(_fmt_mean_std(*c["b"], c["n"]) for c in comparisons)
                  + f" | {_epoch_time_text([theirs[s] for s in seeds])} | {_wall_text([theirs[s] for s in seeds])} |",
                  f"| {variant} | {len(seeds)} | " + " | ".join(_fmt_mean_std(*c["a"], c["n"]) for c in comparisons)
                  + f" | {_epoch_time_text([ours[s] for s in seeds])} | {_wall_text([ours[s] for s in seeds])} |",
                  f"| {variant} vs {base} | | " + " | ".join(_comparison_text(c, family) for c in comparisons)
                  + " | | |"]
        noise = {label: within_seed_noise(c) for c, label in zip(comparisons, labels)}
        inside = [label for label, v in noise.items() if v]
        outside = [label for label, v in noise.items() if v is False]
        if not inside and not outside:
            verdicts.append(f"- {variant}: fewer than 2 seeds finished by both it and {base}: no verdict.")
        elif not outside:
            verdicts.append(f"- {variant}: within seed noise of {base} on every metric.")
        else:
            verdicts.append(f"- {variant}: **not** within seed noise of {base} on {', '.join(outside)}"
                            + (f"; within it on {', '.join(inside)}." if inside else "."))
    adjusted = f", using the adjusted {family.label}" if family.label else ""
    lines += ["", f"Within seed noise: the paired t-test finds no difference (p ≥ 0.05{adjusted}) and the difference "
              "of the means is at most one standard deviation of the base model over these seeds.", ""] + verdicts
    return "\n".join(lines + [""])


def write_report(study, rows=None):
    """Write cells.csv/json, tables/<dataset>.md, results.md and plots/; returns their paths."""
    rows = rows if rows is not None else collect_cells(study)
    out = study.output_dir
    metrics = _report_metrics(study, rows)
    paths = {"cells_csv": os.path.join(out, "cells.csv"), "cells_json": os.path.join(out, "cells.json"),
             "results_md": os.path.join(out, "results.md"), "tables": {}, "plots": []}
    write_text_atomic(paths["cells_csv"], _csv_text(rows))
    _write_json(paths["cells_json"], {"study": study.name, "source": study.source, "cells": rows})

    def tables(d, d_rows, family):
        text, summary = dataset_table(study, d_rows, d, metrics, family)
        for extra in (stage_table(study, d_rows, d, metrics, family),
                      variants_table(study, d_rows, d, metrics, family), slices_table(study, d_rows, d, metrics)):
            if extra:
                text += "\n" + extra
        return text, summary

    levels = getattr(study, "sparsity", None)

    def parts(d):
        """``(label, file stem, rows)`` of each part of dataset ``d``'s report: the dataset, or (sparsity
        axis) one part per level, labelled "<dataset>, keep <level>", whose rows carry that label."""
        if levels is None:
            return [(d, d, rows)]
        return [(f"{d}, keep {k:g}", f"{d}_{level_name(k)}",
                 [dict(r, dataset=f"{d}, keep {k:g}") for r in rows if r["dataset"] == d and r.get("sparsity") == k])
                for k in sorted(levels, reverse=True)]

    def links(plots):
        return "\n" + " ".join(f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in plots) + "\n"

    # every p-value of the report is one family: a first pass collects them, the second shows them adjusted
    family = PFamily(getattr(study, "p_adjust", "holm"), scope="report")
    for d in study.datasets:
        for label, _, d_rows in parts(d):
            tables(label, d_rows, family)
    family.close()
    paths["p_adjust"] = {"method": family.method, "family_size": family.size}
    sections, summaries = [], {}
    for d in study.datasets:
        file_parts, md_parts = [], []
        if levels is not None:
            text, curves = sparsity_table(study, rows, d, metrics)
            file_parts.append(text)
            plot = None
            with contextlib.suppress(ImportError):
                plot = plot_sparsity(study, curves, d, os.path.join(out, "plots", f"{d}_sparsity.png"))
            if plot:
                paths["plots"].append(plot)
                text += links([plot])
            md_parts.append(text)
        for label, stem, d_rows in parts(d):
            text, summary = tables(label, d_rows, family)
            summaries[label] = summary
            file_parts.append(text)
            plots = []
            with contextlib.suppress(ImportError):
                p1 = plot_metrics(study, summary, label, metrics, os.path.join(out, "plots", f"{stem}_metrics.png"))
                p2 = plot_valid_curves(study, d_rows, label, os.path.join(out, "plots", f"{stem}_valid.png"))
                plots = [p for p in (p1, p2) if p]
            paths["plots"] += plots
            if plots:
                text += links(plots)
            md_parts.append(text)
        table_path = os.path.join(out, "tables", f"{d}.md")
        write_text_atomic(table_path, "\n".join(file_parts) + "\n")
        paths["tables"][d] = table_path
        sections.append("\n".join(md_parts))

    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    info = machine_info()
    md = [f"# Study `{study.name}`", ""]
    if study.description:
        md += [str(study.description).strip(), ""]
    md += [f"- study file: `{study.source}`",
           f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}",
           f"- cells: {len(rows)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})",
           f"- datasets: {', '.join(study.datasets)}; models: {', '.join(study.models)}; "
           f"seeds: {', '.join(map(str, study.seeds))}"
           + ("" if levels is None else f"; sparsity levels (fraction of the training data kept): "
                                        f"{', '.join(f'{k:g}' for k in levels)}"),
           _cells_ran_on(rows),
           f"- statistics: means ± std with the {CI_LEVEL:.0%} t confidence interval's half-width over the seeds; "
           "two-sided paired t-tests over seeds, "
           + (f"p-values adjusted by {P_ADJUST_FULL_NAMES[family.method]} ({family.label}) over the "
              f"{family.size} tested comparisons of this report, raw p next to them"
              if family.label else "p-values not adjusted for multiple comparisons")
           + f" (`p_adjust: {family.method}`)",
           f"- report written on machine: {info.get('host')}; {info.get('cpu')} ({info.get('cpu_count')} logical CPUs"
           + (f", {info['memory_gb']} GiB RAM" if info.get("memory_gb") else "") + f"); GPU: {info.get('gpu') or 'none'}; "
           f"{info.get('platform')}; Python {info.get('python')}, torch {info.get('torch')}, "
           f"RecBole {info.get('recbole')}", ""]
    md += sections
    md += ["## Wall time per cell", "",
           "Wall time: the cell's process from start to end (imports, data, training, test), summed over "
           "its attempts when it was interrupted and resumed; train: `timings_s.train` of the run record "
           "(the last attempt); s / epoch: the median training pass over its epochs (evaluation not "
           "included; records written since 2026-12-04).", "",
           "| Dataset | Model | Seed | " + ("" if levels is None else "Keep | ")
           + "Status | Device | Epochs | Attempts | Train (s) | s / epoch | Wall time (s) |",
           "|---|---|---|" + ("" if levels is None else "---|") + "---|---|---|---|---|---|---|"]
    total = 0.0
    for r in rows:
        if r["wall_time_s"] is not None:
            total += r["wall_time_s"]
        keep = "" if levels is None else f"{r['sparsity']:g} | "
        md.append(f"| {r['dataset']} | {r['model']} | {r['seed']} | {keep}{r['status']} | {r['device'] or '—'} | "
                  f"{_epochs_text([r])} | {r.get('attempts') or '—'} | "
                  f"{_fmt(r['train_time_s'], 1)} | {_fmt(r.get('train_epoch_s'), 1)} | "
                  f"{_fmt(r['wall_time_s'], 1)} |")
    md += ["", f"Total wall time of the finished cells: {total:.1f} s ({total / 3600:.2f} h).", ""]
    failed = [r for r in rows if r["error"]]
    if failed:
        md += ["## Failed cells", ""] + [f"- {cell_text(r['dataset'], r['model'], r['seed'], r.get('sparsity'))}: "
                                         f"{r['error']} "
                                         f"(log: `{r['log']}`)" for r in failed] + [""]
    write_text_atomic(paths["results_md"], "\n".join(md))
    paths["summaries"] = summaries
    return paths
