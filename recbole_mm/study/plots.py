"""The study's plots (matplotlib, imported when drawing): metrics per model, validation curves and
accuracy vs sparsity, written as PNG files under ``plots/``."""

from recbole_mm.atomic import write_text_atomic
from recbole_mm.study.collection import _metric_label


# ============================================================================ plots


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_text_atomic(path, buf.getvalue(), mode="wb")


def plot_metrics(study, summary, dataset, metrics, path):
    """Grouped bars: one group per metric, one bar per model, error bars = std over seeds."""
    pm = summary["per_model"]
    models = [m for m in study.models if pm[m]["n"] > 0]
    if not models or not metrics:
        return None
    fig = _figure(max(5.0, 1.2 * len(metrics) * max(1, len(models)) / 3 + 2), 3.8)
    ax = fig.add_subplot(111)
    width = 0.8 / len(models)
    colors = [f"C{i % 10}" for i in range(len(models))]
    for j, m in enumerate(models):
        means = [pm[m]["stats"][k][0] or 0.0 for k in metrics]
        stds = [pm[m]["stats"][k][1] or 0.0 for k in metrics]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=m, color=colors[j],
               hatch="//" if m in study.proposed else None, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([_metric_label(k) for k in metrics])
    ax.set_ylabel("test value (mean ± std over seeds)")
    ax.set_title(f"{study.name}: {dataset}")
    ax.legend(fontsize=8, ncol=min(4, len(models)), loc="upper left", bbox_to_anchor=(0, -0.12))
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_valid_curves(study, rows, dataset, path):
    """Validation score per epoch, one line per model (mean over seeds, band = min..max)."""
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(111)
    drawn, metric = 0, None
    for j, m in enumerate(study.models):
        curves = [(r["valid_curve"], r["eval_step"]) for r in rows
                  if r["dataset"] == dataset and r["model"] == m and r["status"] == "finished" and r["valid_curve"]]
        if not curves:
            continue
        metric = metric or next(r["valid_metric"] for r in rows if r["dataset"] == dataset and r["model"] == m
                                and r["valid_metric"])
        length = max(len(c) for c, _ in curves)
        step = curves[0][1] or 1
        xs, mean, lo, hi = [], [], [], []
        for i in range(length):
            vals = [c[i] for c, _ in curves if i < len(c)]
            xs.append((i + 1) * step)
            mean.append(sum(vals) / len(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        color = f"C{j % 10}"
        ax.plot(xs, mean, marker="o" if length < 30 else None, markersize=3, label=m, color=color,
                linestyle="--" if m in study.proposed else "-")
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
        drawn += 1
    if not drawn:
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric or 'score'}")
    ax.set_title(f"{study.name}: {dataset} (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_sparsity(study, curves, dataset, path):
    """Accuracy vs the fraction of the training data kept: one panel per metric (the valid metric's
    family), one line per model (mean over seeds, error bars = std), keep on a log axis."""
    keys = [k for k in curves if curves[k]]
    if not keys:
        return None
    levels = sorted(study.sparsity or [])
    fig = _figure(max(5.0, 4.2 * len(keys)), 3.8)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for j, m in enumerate(study.models):
            points = curves[key].get(m)
            if not points:
                continue
            xs, means, stds = zip(*points)
            ax.errorbar(xs, means, yerr=[s or 0.0 for s in stds], marker="o", markersize=4, capsize=3, label=m,
                        color=f"C{j % 10}", linestyle="--" if m in study.proposed else "-")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{k:g}" for k in levels])
        ax.set_xlabel("fraction of the training data kept")
        ax.set_ylabel(f"test {_metric_label(key)}")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle(f"{study.name}: {dataset}, accuracy vs training-data sparsity (mean ± std over seeds)")
    return _save_figure(fig, path)
