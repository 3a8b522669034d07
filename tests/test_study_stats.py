"""Statistics of study reports: multiple-comparison corrections (Holm, Benjamini-Hochberg) checked
against published and hand-computed examples, confidence intervals of means, and a report built
from fake records (no training) showing both."""

import json
import math
import os

import pytest

from recbole_mm import study as st
from recbole_mm.study import StudyError, benjamini_hochberg, ci_half_width, holm, validate_study

from test_study import VARIANT_STUDY, env, write  # noqa: F401 - env is a fixture

# Benjamini & Hochberg (1995), J. R. Statist. Soc. B 57(1), section 4: 15 p-values of a trial
BH_1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459,
           0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.0000]


# ----------------------------------------------------------------------------- Benjamini-Hochberg


def test_bh_on_the_published_example_rejects_exactly_the_four_smallest():
    adjusted = benjamini_hochberg(BH_1995)
    # the paper: at q = 0.05 the largest i with p_(i) <= i q / 15 is i = 4 (0.0095 <= 4 * 0.05 / 15 = 0.0133;
    # 0.0201 > 5 * 0.05 / 15 = 0.0167, and no larger i qualifies): the 4 smallest are rejected
    assert [a <= 0.05 for a in adjusted] == [True] * 4 + [False] * 11
    # by hand, min over j >= i of 15 p_(j) / j:
    #   i=1: 15 * 0.0001 / 1 = 0.0015     i=2: 15 * 0.0004 / 2 = 0.003      i=3: 15 * 0.0019 / 3 = 0.0095
    #   i=4: 15 * 0.0095 / 4 = 0.035625   i=5: 15 * 0.0201 / 5 = 0.0603
    #   i=6: 15 * 0.0278 / 6 = 0.0695, but i=7 gives 15 * 0.0298 / 7 = 0.063857 (smaller): 0.063857
    #   i=8: 15 * 0.0344 / 8 = 0.0645    i=9: 15 * 0.0459 / 9 = 0.0765   i=10: 15 * 0.3240 / 10 = 0.486
    #   i=11: 15 * 0.4262 / 11 = 0.581182  i=12: 15 * 0.5719 / 12 = 0.714875  i=13: 15 * 0.6528 / 13 = 0.753231
    #   i=14: 15 * 0.7590 / 14 = 0.813214  i=15: 1.0
    expected = [0.0015, 0.003, 0.0095, 0.035625, 0.0603, 0.063857, 0.063857, 0.0645, 0.0765,
                0.486, 0.581182, 0.714875, 0.753231, 0.813214, 1.0]
    assert adjusted == pytest.approx(expected, abs=1e-6)


def test_bh_keeps_the_input_order_caps_at_one_and_is_monotone():
    # shuffled: the same adjusted value follows each p
    order = [7, 0, 14, 3, 9, 1, 12, 5, 2, 11, 4, 13, 6, 10, 8]
    shuffled = [BH_1995[i] for i in order]
    assert benjamini_hochberg(shuffled) == pytest.approx([benjamini_hochberg(BH_1995)[i] for i in order])
    # m = 2: [0.6, 0.9] -> i=2: 0.9, i=1: min(2 * 0.6 / 1 = 1.2, 0.9) = 0.9
    assert benjamini_hochberg([0.9, 0.6]) == pytest.approx([0.9, 0.9])
    adjusted = benjamini_hochberg(BH_1995)
    assert all(a <= b for a, b in zip(adjusted, adjusted[1:])) and max(adjusted) <= 1.0
    assert all(a >= p for a, p in zip(adjusted, BH_1995))


# ----------------------------------------------------------------------------- Holm


def test_holm_by_hand():
    # p = [0.01, 0.04, 0.03, 0.005], m = 4; sorted p_(i) * (m - i + 1):
    #   0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04
    # cumulative max: 0.02, 0.03, 0.06, 0.06; back in the input's order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1: [0.6, 0.7] -> 0.6 * 2 = 1.2 -> 1, then max(1, 0.7 * 1) = 1
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    # ties: [0.02, 0.02, 0.5] -> 0.02 * 3 = 0.06, max(0.06, 0.02 * 2) = 0.06, max(0.06, 0.5) = 0.5
    assert holm([0.02, 0.5, 0.02]) == pytest.approx([0.06, 0.5, 0.06])
    assert holm([0.3]) == [0.3] and holm([]) == [] and benjamini_hochberg([]) == []


def test_holm_on_the_published_example_rejects_three():
    # 0.0001 * 15 = 0.0015, 0.0004 * 14 = 0.0056, 0.0019 * 13 = 0.0247 <= 0.05, 0.0095 * 12 = 0.114 > 0.05:
    # Holm (like Hochberg's procedure in the paper) rejects 3 where BH rejects 4
    adjusted = holm(BH_1995)
    assert adjusted[:4] == pytest.approx([0.0015, 0.0056, 0.0247, 0.114])
    assert sum(a <= 0.05 for a in adjusted) == 3
    assert all(a <= b for a, b in zip(adjusted, adjusted[1:])) and adjusted[-6:] == [1.0] * 6


def test_untested_entries_pass_through_and_do_not_count():
    nan = float("nan")
    # the family is the 3 tested values: as if None and NaN were not there
    out = holm([0.01, None, 0.04, nan, 0.03])
    assert out[1] is None and math.isnan(out[3])
    assert [out[0], out[2], out[4]] == pytest.approx(holm([0.01, 0.04, 0.03]))  # [0.03, 0.06, 0.06]
    assert [out[0], out[2], out[4]] == pytest.approx([0.03, 0.06, 0.06])
    out = benjamini_hochberg([None, 0.01, nan, 0.04])
    # m = 2: 0.04 * 2 / 2 = 0.04, 0.01 * 2 / 1 = 0.02
    assert out[0] is None and math.isnan(out[2]) and out[1::2] == pytest.approx([0.02, 0.04])
    assert holm([None, nan])[0] is None
    with pytest.raises(ValueError, match="not in"):
        holm([0.5, 1.5])


def test_against_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    import random

    rng = random.Random(0)
    cases = [BH_1995, [0.01, 0.04, 0.03, 0.005], [0.02, 0.5, 0.02]]
    cases += [[rng.random() ** 3 for _ in range(rng.randint(1, 30))] for _ in range(50)]
    for ps in cases:
        assert holm(ps) == pytest.approx(list(multitest.multipletests(ps, method="holm")[1]), abs=1e-12)
        assert benjamini_hochberg(ps) == pytest.approx(list(multitest.multipletests(ps, method="fdr_bh")[1]),
                                                       abs=1e-12)


# ----------------------------------------------------------------------------- confidence intervals


def test_ci_half_width_by_hand():
    # t quantiles from a printed t table: t(0.975, 2) = 4.303, t(0.975, 1) = 12.706
    assert ci_half_width(0.01, 3) == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-4)  # 0.02484
    assert ci_half_width(0.5, 2) == pytest.approx(12.706 * 0.5 / math.sqrt(2), rel=1e-4)
    assert ci_half_width(None, 1) is None and ci_half_width(0.0, 1) is None
    assert st._fmt_mean_std(0.31, 0.01, 3) == "0.3100 ± 0.0100 (± 0.0248)"
    assert st._fmt_mean_std(0.3, None, 1) == "0.3000 (n/a)"
    assert st._fmt_mean_std(None, None, 0) == "—"


# ----------------------------------------------------------------------------- a report


# 3 seeds; GRU4Rec is proposed, SASRec and SASRec+bucketing are baselines (the best on both metrics:
# SASRec+bucketing). Per seed: (hit@10, ndcg@10)
VALUES = {"SASRec": [(0.30, 0.20), (0.32, 0.21), (0.31, 0.22)],
          "SASRec+bucketing": [(0.31, 0.25), (0.34, 0.27), (0.30, 0.26)],
          "GRU4Rec": [(0.30, 0.27), (0.32, 0.30), (0.27, 0.30)]}
# Paired t-tests with 3 pairs (2 degrees of freedom): two-sided p = 1 - |t| / sqrt(t^2 + 2).
P = {
    # GRU4Rec vs SASRec+bucketing, hit@10: differences -0.01, -0.02, -0.03, t = -2 sqrt(3)
    ("GRU4Rec", "hit@10"): 1 - math.sqrt(12 / 14),  # 0.074180
    # ndcg@10: differences 0.02, 0.03, 0.04, t = 3 sqrt(3)
    ("GRU4Rec", "ndcg@10"): 1 - math.sqrt(27 / 29),  # 0.035098
    # SASRec+bucketing vs SASRec, hit@10: differences 0.01, 0.02, -0.01, t = 2 / sqrt(7)
    ("SASRec+bucketing", "hit@10"): 1 - math.sqrt(2) / 3,  # 0.528595
    # ndcg@10: differences 0.05, 0.06, 0.04, t = 5 sqrt(3)
    ("SASRec+bucketing", "ndcg@10"): 1 - math.sqrt(75 / 77),  # 0.013072
}
# Holm over the report's family of these 4: sorted 0.013072 * 4 = 0.052288, 0.035098 * 3 = 0.105294,
# 0.074180 * 2 = 0.148360, 0.528595 * 1 = 0.528595 (already increasing: the cumulative max changes nothing)
HOLM = {("SASRec+bucketing", "ndcg@10"): 0.052288, ("GRU4Rec", "ndcg@10"): 0.105294,
        ("GRU4Rec", "hit@10"): 0.148360, ("SASRec+bucketing", "hit@10"): 0.528595}
# BH: 0.013072 * 4 / 1 = 0.052288, 0.035098 * 4 / 2 = 0.070196, 0.074180 * 4 / 3 = 0.098907, 0.528595
BH = {("SASRec+bucketing", "ndcg@10"): 0.052288, ("GRU4Rec", "ndcg@10"): 0.070196,
      ("GRU4Rec", "hit@10"): 0.098907, ("SASRec+bucketing", "hit@10"): 0.528595}


def _fake_study(env, extra=""):
    text = VARIANT_STUDY.replace("seeds: [1, 2]", "seeds: [1, 2, 3]") + "report: [hit@10, ndcg@10]\n" + extra
    study = validate_study(write(env / "v.yaml", text))
    for model, per_seed in VALUES.items():
        for seed, (hit, ndcg) in enumerate(per_seed, 1):
            paths = study.cell_paths("tiny", model, seed)
            os.makedirs(os.path.dirname(paths["record"]), exist_ok=True)
            with open(paths["record"], "w") as f:
                json.dump({"status": "finished", "dataset": "tiny", "model": study.model_of(model), "seed": seed,
                           "test_result": {"hit@10": hit, "ndcg@10": ndcg}, "best_valid_result": {"hit@10": hit},
                           "timings_s": {"total": 60.0}}, f)
    return study


def _table_lines(text):
    return {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}


def test_a_report_adjusts_every_p_value_of_the_report_together(env):
    study = _fake_study(env)
    assert study.p_adjust == "holm"  # the default
    paths = st.write_report(study)
    assert paths["p_adjust"] == {"method": "holm", "family_size": 4}
    results = open(paths["results_md"]).read()
    table = open(paths["tables"]["tiny"]).read()
    assert table.strip() in results
    # the raw p (checked against the hand formulas) is kept, the adjusted one is next to it
    summary = paths["summaries"]["tiny"]
    for k in ("hit@10", "ndcg@10"):
        c = summary["comparisons"]["GRU4Rec", k]
        assert c["baseline"] == "SASRec+bucketing"
        assert c["p"] == pytest.approx(P["GRU4Rec", k], rel=1e-6)
        assert c["p_adj"] == pytest.approx(HOLM["GRU4Rec", k], rel=1e-4)
    # the header names the correction and the family (the dataset table's 2 and the variants section's 2)
    assert "| Model (p_Holm: Holm, 4 comparisons in the report) | HR@10 | NDCG@10 |" in table
    lines = _table_lines(table)
    assert lines["| GRU4Rec"] == ("| GRU4Rec | -6.3% vs SASRec+bucketing (p=0.0742, p_Holm=0.148, n=3) "
                                  "| +11.5% vs SASRec+bucketing (p=0.0351, p_Holm=0.105, n=3) |")
    assert lines["| SASRec+bucketing vs SASRec"] == ("| SASRec+bucketing vs SASRec | | +2.2% (p=0.529, p_Holm=0.529, "
                                                     "n=3) | +23.8% (p=0.0131, p_Holm=0.0523, n=3) | | |")
    assert "| Model (p_Holm: Holm, 4 comparisons in the report) | n | HR@10: mean ± std (± 95% CI) |" in table
    # raw p = 0.035 < 0.05, but not after Holm: no mark
    assert "- GRU4Rec: beats the best baseline on NDCG@10; does **not** beat it on HR@10." in table
    assert "p_Holm: p adjusted (Holm's step-down method, family-wise error rate) over a family of 4 p-values" in table
    assert "(`p_adjust: holm`)" in results and "over the 4 tested comparisons of this report" in results
    # the CI half-width of a tiny case by hand: SASRec hit@10 = 0.30, 0.32, 0.31: std 0.01,
    # t(0.975, 2) = 4.3027 (t table), 4.3027 * 0.01 / sqrt(3) = 0.02484
    assert "| Model | Role | n | HR@10: mean ± std (± 95% CI) | NDCG@10: mean ± std (± 95% CI) |" in table
    assert "| SASRec | baseline | 3 | 0.3100 ± 0.0100 (± 0.0248) | 0.2100 ± 0.0100 (± 0.0248) | " in table
    assert "half-width of the two-sided 95% t confidence interval" in table


def test_bh_and_none(env):
    study = _fake_study(env, "p_adjust: bh\n")
    paths = st.write_report(study)
    table = open(paths["tables"]["tiny"]).read()
    lines = _table_lines(table)
    assert "| Model (p_BH: Benjamini-Hochberg, 4 comparisons in the report) | HR@10 | NDCG@10 |" in table
    assert lines["| GRU4Rec"] == ("| GRU4Rec | -6.3% vs SASRec+bucketing (p=0.0742, p_BH=0.0989, n=3) "
                                  "| +11.5% vs SASRec+bucketing (p=0.0351, p_BH=0.0702, n=3) |")
    assert "(p=0.0131, p_BH=0.0523, n=3)" in lines["| SASRec+bucketing vs SASRec"]
    assert paths["summaries"]["tiny"]["comparisons"]["GRU4Rec", "hit@10"]["p_adj"] == \
        pytest.approx(BH["GRU4Rec", "hit@10"], rel=1e-4)

    study = _fake_study(env, "p_adjust: none\n")
    table = open(st.write_report(study)["tables"]["tiny"]).read()
    lines = _table_lines(table)
    assert "| Model (p: not adjusted) | HR@10 | NDCG@10 |" in table and "p_Holm" not in table
    assert lines["| GRU4Rec"] == ("| GRU4Rec | -6.3% vs SASRec+bucketing (p=0.0742, n=3) "
                                  "| +11.5% vs SASRec+bucketing (p=0.0351, n=3) |")
    # unadjusted, the raw p < 0.05 is marked
    assert "- GRU4Rec: beats the best baseline on NDCG@10 (p<0.05); does **not** beat it on HR@10." in table


def test_a_wrong_p_adjust_names_its_line(env):
    text = VARIANT_STUDY + "p_adjust: holmes\n"
    line = text.splitlines().index("p_adjust: holmes") + 1
    with pytest.raises(StudyError, match=rf"v.yaml:{line}: p_adjust: must be one of holm, bh, none .*got "
                                         r"'holmes' \(did you mean holm\?\)"):
        validate_study(write(env / "v.yaml", text))
    with pytest.raises(StudyError, match=r"p_adjust: must be one of holm, bh, none .*got 0.05"):
        validate_study(write(env / "v.yaml", VARIANT_STUDY + "p_adjust: 0.05\n"))
    assert validate_study(write(env / "v.yaml", VARIANT_STUDY + "p_adjust: BH\n")).p_adjust == "bh"


def test_seconds_per_training_epoch_in_the_variants_and_cells_tables(env):
    """The median training pass of each cell (history.train_epoch_s) next to the wall time."""
    study = _fake_study(env)
    epochs = {"SASRec": [10.0, 12.0, 11.0], "SASRec+bucketing": [5.0, 7.0, 6.0]}
    for model, seconds in epochs.items():
        for seed in (1, 2, 3):
            path = study.cell_paths("tiny", model, seed)["record"]
            with open(path) as f:
                rec = json.load(f)
            rec["history"] = {"train_loss": [1.0] * 3, "train_epoch_s": [s + seed for s in seconds]}
            with open(path, "w") as f:
                json.dump(rec, f)
    paths = st.write_report(study)
    table = open(paths["tables"]["tiny"]).read()
    lines = _table_lines(table)
    # medians: SASRec 12, 13, 14 s over seeds 1-3; SASRec+bucketing 7, 8, 9 s; wall time 60 s each
    assert lines["| SASRec"].endswith("| 12.0-14.0 s | 60 s |")
    assert lines["| SASRec+bucketing"].endswith("| 7.0-9.0 s | 60 s |")
    results = open(paths["results_md"]).read()
    assert "| Train (s) | s / epoch | Wall time (s) |" in results
    assert "| tiny | SASRec | 2 | finished | — | 3 | — | — | 13.0 | 60.0 |" in results
