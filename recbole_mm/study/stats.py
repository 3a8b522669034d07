"""The statistics of a study's report: mean and std over seeds, paired t-tests, p-value adjustment
for multiple comparisons (:func:`holm`, :func:`benjamini_hochberg`, :class:`PFamily`), t confidence
intervals (:func:`ci_half_width`) and the comparisons of models per dataset."""

import contextlib
import math

from recbole_mm.study.collection import _smaller_is_better
from recbole_mm.study.spec import P_ADJUST_METHODS


def _mean_std(values):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _paired_test(a, b):
    """Paired t-test (scipy.stats.ttest_rel) of per-seed values; returns (p or None, n)."""
    n = len(a)
    if n < 2:
        return None, n
    from scipy import stats

    with contextlib.suppress(Exception):
        p = float(stats.ttest_rel(a, b).pvalue)
        if math.isnan(p):
            return None, n
        return p, n
    return None, n


# ---------------------------------------------------------------- multiple comparisons, intervals


def _tested(pvalues):
    """Indices of the tested p-values (neither None nor NaN), which make the family; a p-value
    outside [0, 1] is an error."""
    indices = []
    for i, p in enumerate(pvalues):
        if p is None or math.isnan(p):
            continue
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value {p!r} (position {i}) is not in [0, 1]")
        indices.append(i)
    return sorted(indices, key=lambda i: pvalues[i])  # stable: ties keep their order


def holm(pvalues):
    """Holm's (1979) step-down adjusted p-values, in the order given.

    Over the m tested values sorted ascending, p_(1) <= ... <= p_(m): adjusted
    p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), so the adjusted values are monotone in p and
    at most 1. Rejecting where the adjusted p <= alpha controls the family-wise error rate at
    alpha under any dependence between the tests. None and NaN entries (comparisons without a
    test) are returned as they are and do not count in m."""
    out = list(pvalues)
    order = _tested(pvalues)
    m, running = len(order), 0.0
    for j, i in enumerate(order):  # j = rank - 1
        running = max(running, min(1.0, (m - j) * pvalues[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues):
    """Benjamini-Hochberg (1995) step-up adjusted p-values, in the order given.

    Over the m tested values sorted ascending: adjusted p_(i) = min_{j >= i} min(1, m p_(j) / j).
    Rejecting where the adjusted p <= q controls the false discovery rate at q for independent
    or positively dependent tests. None and NaN entries as in :func:`holm`."""
    out = list(pvalues)
    order = _tested(pvalues)
    m, running = len(order), 1.0
    for j in range(m - 1, -1, -1):
        running = min(running, m * pvalues[order[j]] / (j + 1))
        out[order[j]] = running
    return out


P_ADJUST_FUNCTIONS = {"holm": holm, "bh": benjamini_hochberg}
P_ADJUST_FULL_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
CI_LEVEL = 0.95


def ci_half_width(std, n, level=CI_LEVEL):
    """Half-width of the two-sided ``level`` t confidence interval of a mean of ``n`` values whose
    sample std is ``std``: t_{(1 + level) / 2, n - 1} * std / sqrt(n); None when n < 2."""
    if std is None or n is None or n < 2:
        return None
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)


class PFamily:
    """The p-values of one report (or of one table) adjusted together for multiple comparisons.

    Tables are rendered twice: on the first pass (the family open) :meth:`adjust` records the raw
    p of each tested comparison under its key and returns None; :meth:`close` adjusts them all
    (``method``: holm, bh or none); on the second pass :meth:`adjust` returns the key's adjusted p
    (with ``none``, the raw p). Comparisons without a p-value (fewer than 2 pairs, identical runs)
    are not in the family."""

    def __init__(self, method="holm", scope="report"):
        self.method = method
        self.scope = scope  # "report" or "table": what the family is, said in the headers
        self.raw, self.adjusted = {}, None

    def adjust(self, key, p):
        if p is None or math.isnan(p):
            return None
        if self.adjusted is None:
            if key in self.raw:
                raise ValueError(f"comparison {key!r} is in the family twice")
            self.raw[key] = p
            return None
        return self.adjusted.get(key)

    def close(self):
        keys = list(self.raw)
        adjust = P_ADJUST_FUNCTIONS.get(self.method)
        values = [self.raw[k] for k in keys]
        self.adjusted = dict(zip(keys, adjust(values) if adjust else values))
        return self

    @property
    def size(self):
        return len(self.raw)

    @property
    def label(self):
        """The adjusted p's name in the tables (p_Holm, p_BH), None without correction."""
        return {"holm": "p_Holm", "bh": "p_BH"}.get(self.method)

    def header(self):
        """For a table header: which p-values the table shows and over which family."""
        if not self.label:
            return "p: not adjusted"
        return (f"{self.label}: {P_ADJUST_FULL_NAMES[self.method]}, {self.size} comparison"
                f"{'s' if self.size != 1 else ''} in the {self.scope}")

    def sentence(self, marks=False):
        """For a table's caption: what the adjusted p is (``marks``: and that the table's p < 0.05
        marks use it)."""
        if not self.label:
            return ("p-values are not adjusted for multiple comparisons (`p_adjust: none`)"
                    + ("; the p<0.05 marks use the raw p." if marks else "."))
        what = P_ADJUST_METHODS[self.method]
        family = ("every tested comparison of the report: each proposed model vs the best baseline, "
                  "the step-1 and the variant comparisons, over all datasets and metrics"
                  if self.scope == "report" else "the tested comparisons of this table")
        return (f"{self.label}: p adjusted ({what}) over a family of {self.size} p-value"
                f"{'s' if self.size != 1 else ''}, {family} (comparisons with p = n/a are not counted); "
                f"the raw p stands next to it" + (f", and the p<0.05 marks use {self.label}." if marks else "."))

    def significant(self, p, p_adj, alpha=0.05):
        value = p_adj if self.label else p
        return value is not None and value < alpha

    def test_text(self, p, p_adj, n):
        """"p=0.0312, p_Holm=0.0936, n=3" ("p=n/a, n=1" without a test)."""
        adjusted = f", {self.label}={_fmt_p(p_adj)}" if self.label and p is not None else ""
        return f"p={_fmt_p(p)}{adjusted}, n={n}"


def _in_family(study, family, render):
    """``render(family)`` with the report's family; called for one table alone (``family`` None),
    a family of that table: a first pass collects its p-values, the second shows them adjusted."""
    if family is None:
        family = PFamily(getattr(study, "p_adjust", "holm"), scope="table")
        render(family)
        family.close()
    return render(family)


def dataset_summary(study, rows, dataset, metrics):
    """Per model: n, mean/std per metric; per proposed model: improvement and test vs the best baseline."""
    per_model = {}
    for m in study.models:
        cells = [r for r in rows if r["dataset"] == dataset and r["model"] == m and r["status"] == "finished"]
        values = {k: {r["seed"]: r["test"][k] for r in cells if k in r["test"]} for k in metrics}
        per_model[m] = {"n": len(cells), "values": values,
                        "stats": {k: _mean_std(list(v.values())) for k, v in values.items()}}
    best, best_baseline, comparisons = {}, {}, {}
    for k in metrics:
        smaller = _smaller_is_better(k)
        pick = min if smaller else max
        means = {m: per_model[m]["stats"][k][0] for m in study.models if per_model[m]["stats"][k][0] is not None}
        best[k] = pick(means.values()) if means else None
        base = {m: v for m, v in means.items() if m not in study.proposed}
        best_baseline[k] = pick(base, key=base.get) if base else None
        for m in study.proposed:
            b = best_baseline[k]
            if m not in means or b is None:
                comparisons[m, k] = None
                continue
            mine, theirs = means[m], means[b]
            rel = None if theirs == 0 else (mine - theirs) / abs(theirs) * (-1 if smaller else 1) * 100
            seeds = sorted(set(per_model[m]["values"][k]) & set(per_model[b]["values"][k]))
            p, n = _paired_test([per_model[m]["values"][k][s] for s in seeds],
                                [per_model[b]["values"][k][s] for s in seeds])
            better = mine < theirs if smaller else mine > theirs
            comparisons[m, k] = {"baseline": b, "relative_pct": rel, "p": p, "n": n, "better": better}
    return {"per_model": per_model, "best": best, "best_baseline": best_baseline, "comparisons": comparisons}


def _fmt_p(p):
    if p is None:
        return "n/a"
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def _paired_metric(a_by_seed, b_by_seed, k):
    """``a`` against ``b`` on metric ``k``, paired by seed over the seeds both have: each one's
    (mean, std), n, ``identical`` (every pair equal: the same runs, no test to do) and, when there
    is a difference to test, the relative difference of the means (%, positive: ``a`` is better)
    and the paired t-test's p."""
    seeds = [s for s in sorted(set(a_by_seed) & set(b_by_seed)) if k in a_by_seed[s] and k in b_by_seed[s]]
    a, b = [a_by_seed[s][k] for s in seeds], [b_by_seed[s][k] for s in seeds]
    out = {"a": _mean_std(a), "b": _mean_std(b), "n": len(a), "identical": a == b, "relative_pct": None, "p": None}
    (ma, _), (mb, _) = out["a"], out["b"]
    if ma is not None and mb and a != b:
        out["relative_pct"] = (-1 if _smaller_is_better(k) else 1) * (ma - mb) / abs(mb) * 100
        out["p"] = _paired_test(a, b)[0]
    return out


def _adjust_all(comparisons, metrics, family, key):
    """Each comparison's adjusted p (``c["p_adj"]``) from ``family``, keyed by ``key`` + (metric,)."""
    for c, k in zip(comparisons, metrics):
        c["p_adj"] = family.adjust(key + (k,), c["p"])


def within_seed_noise(c):
    """Whether a paired comparison (:func:`_paired_metric`, ``a`` a variant, ``b`` its base model) is
    within seed noise: p >= 0.05 (the adjusted p, ``c["p_adj"]``, when there is one) and the
    difference of the means at most one std of ``b``; None when it cannot be told (fewer than 2 pairs)."""
    if c["n"] and c["identical"]:
        return True
    if c["n"] < 2 or c["p"] is None:
        return None
    p = c["p_adj"] if c.get("p_adj") is not None else c["p"]
    return p >= 0.05 and abs(c["a"][0] - c["b"][0]) <= c["b"][1]
