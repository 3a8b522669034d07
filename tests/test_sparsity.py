"""Training-data sparsity (recbole_mm.data.sparsity) and the study's sparsity axis.

Only the training split is thinned, deterministically from a seed; validation and test samples
(targets and histories) are the same at every level; ``sparsity_keep: 1.0`` is today's data."""

import json
import os

import numpy as np
import pytest
import torch

from recbole_mm import study as st
from recbole_mm.config import MMConfig
from recbole_mm.data.dataset import MultiModalSequentialDataset
from recbole_mm.data.lazy import SEQ_END_FIELD, data_preparation
from recbole_mm.data.sparsity import kept_interactions, thin_samples, user_draws
from recbole_mm.quick_start import create_dataset

from conftest import FAST, write_tiny_dataset

FIELDS = ("user_id", "item_id", "timestamp", "item_length", "item_id_list", "timestamp_list")


@pytest.fixture
def data(workdir):
    write_tiny_dataset(workdir / "data", n_users=40, n_items=30, min_len=3, max_len=30)
    return str(workdir / "data")


def _splits(data_path, model="SASRec", dataset_class=None, **extra):
    config = MMConfig(model=model, dataset="tiny", config_dict=dict(FAST, data_path=data_path, **extra))
    dataset = dataset_class(config) if dataset_class else create_dataset(config)
    return dataset, data_preparation(config, dataset)


def _rows(loader):
    """Every sample of ``loader``'s dataset with full-width histories, as numpy arrays."""
    ds = loader._dataset
    inter = ds.inter_feat[torch.arange(len(ds.inter_feat))]
    rows = ds.histories(inter, width=ds.max_item_list_len) if ds.lazy_sequences else inter
    return {f: rows[f].numpy() for f in FIELDS + ((SEQ_END_FIELD,) if SEQ_END_FIELD in rows else ())}


def _equal(a, b, fields=FIELDS):
    return all(np.array_equal(a[f], b[f]) for f in fields)


def _by_user(rows):
    """user -> that user's training samples as (seq_end or row, length, history, target), in time order."""
    key = rows.get(SEQ_END_FIELD, np.arange(len(rows["user_id"])))
    out = {}
    for i in np.lexsort((key, rows["user_id"])):
        out.setdefault(int(rows["user_id"][i]), []).append(
            (int(key[i]), int(rows["item_length"][i]), rows["item_id_list"][i].tolist(), int(rows["item_id"][i])))
    return out


# ----------------------------------------------------------------------------- the rule, by hand


def test_thin_samples_by_hand():
    # user 7: 5 samples (6 training interactions), user 3: 2 samples (3), rows interleaved
    uids = np.array([7, 3, 7, 7, 3, 7, 7])
    order = np.array([10, 20, 11, 12, 21, 13, 14])  # the flat index of each target
    lengths = np.array([1, 1, 2, 3, 2, 4, 5])
    draws = np.zeros(8)
    draws[3] = 0.9
    # keep 0.5: user 7 keeps floor(3 + 0) = 3 interactions (its last 2 samples), user 3
    # floor(1.5 + 0.9) = 2 (its last sample); histories start at the first kept interaction
    rows, new = thin_samples(uids, order, lengths, 0.5, "prefix", draws)
    assert rows.tolist() == [4, 5, 6] and new.tolist() == [1, 1, 2]
    # at least the last sample, at most everything
    rows, new = thin_samples(uids, order, lengths, 0.01, "prefix", draws)
    assert rows.tolist() == [4, 6] and new.tolist() == [1, 1]
    rows, new = thin_samples(uids, order, lengths, 1.0, "prefix", draws)
    assert rows.tolist() == list(range(7)) and new.tolist() == lengths.tolist()
    # users: round(0.5 * 2) = 1 user, the one with the smallest draw (7), with all its samples
    rows, new = thin_samples(uids, order, lengths, 0.5, "users", draws)
    assert rows.tolist() == [0, 2, 3, 5, 6] and new.tolist() == [1, 2, 3, 4, 5]


def test_kept_interactions_round_without_bias_and_nest():
    users = np.arange(5000)
    m = np.random.default_rng(1).integers(2, 40, size=5000)
    draws = user_draws(5000, seed=3)
    for keep in (0.9, 0.5, 0.25):
        k = kept_interactions(users, m, keep, "prefix", draws)
        lo = np.maximum(np.floor(keep * m), 2)
        assert np.all((k >= np.minimum(lo, m)) & (k <= np.maximum(np.ceil(keep * m), 2)) & (k <= m))
        # stochastic rounding: the expected k is keep * m (up to the floor of 2)
        assert k.sum() == pytest.approx(np.maximum(keep * m, np.minimum(m, 2)).sum(), rel=0.02)
    # nested: for one seed a lower level keeps a prefix of what a higher one keeps
    for mode in ("prefix", "users"):
        ks = [kept_interactions(users, m, keep, mode, draws) for keep in (1.0, 0.5, 0.25)]
        assert np.all(ks[0] >= ks[1]) and np.all(ks[1] >= ks[2])
    chosen = kept_interactions(users, m, 0.25, "users", draws) > 0
    assert chosen.sum() == 1250
    assert np.array_equal(user_draws(10, 3), user_draws(10, 3)) and not np.array_equal(user_draws(10, 3),
                                                                                         user_draws(10, 4))


# ----------------------------------------------------------------------------- datasets


def test_keep_one_is_todays_data(data):
    ds, base = _splits(data)
    assert ds.sparsity_stats is None
    for extra in ({"sparsity_keep": 1.0, "sparsity_mode": "users", "sparsity_seed": 5},
                  {"sparsity_keep": 1, "sparsity_seed": None}):
        _, same = _splits(data, **extra)
        for a, b in zip(base, same):
            assert _equal(_rows(a), _rows(b), FIELDS + (SEQ_END_FIELD,))


@pytest.mark.parametrize("samples", ["lazy", "recbole"])
def test_prefix_keeps_the_most_recent_fraction_deterministically(data, samples):
    _, full = _splits(data, sequence_samples=samples)
    ds, half = _splits(data, sequence_samples=samples, sparsity_keep=0.5)
    stats = ds.sparsity_stats
    kept, total = stats["interactions"]
    assert stats["users"][0] == stats["users"][1] == 40  # every user keeps its last training sample
    assert abs(kept / total - 0.5) < 0.06
    # the training interaction matrix (targets plus each user's first kept item) holds the kept ones
    assert half[0]._dataset.inter_matrix(form="coo").nnz == kept and full[0]._dataset.inter_matrix().nnz == total

    # each user keeps its last k - 1 samples; each history is the full one cut at the first kept
    # interaction (k training interactions of m)
    full_users, half_users = _by_user(_rows(full[0])), _by_user(_rows(half[0]))
    assert set(half_users) == set(full_users)
    for u, samples_u in full_users.items():
        kept_u = half_users[u]
        m, k = len(samples_u) + 1, len(kept_u) + 1
        assert max(2, int(np.floor(0.5 * m))) <= k <= max(2, int(np.ceil(0.5 * m)))
        for j, ((key, length, hist, target), (key2, length2, hist2, target2)) in enumerate(
                zip(samples_u[m - k:], kept_u)):
            assert (target2, length2) == (target, min(length, j + 1))
            if samples == "lazy":
                assert key2 == key
            assert hist2[:length2] == hist[length - length2:length] and not any(hist2[length2:])

    # validation and test are those of the full data; the same seed gives the same samples,
    # another seed others
    for a, b in zip(full[1:], half[1:]):
        assert _equal(_rows(a), _rows(b))
    _, again = _splits(data, sequence_samples=samples, sparsity_keep=0.5)
    assert _equal(_rows(half[0]), _rows(again[0]))
    _, other = _splits(data, sequence_samples=samples, sparsity_keep=0.5, sparsity_seed=1)
    assert not _equal(_rows(half[0]), _rows(other[0]))


def test_lazy_and_materialised_samples_agree_and_levels_nest(data):
    _, lazy = _splits(data, sparsity_keep=0.4)
    _, table = _splits(data, sequence_samples="recbole", sparsity_keep=0.4)
    assert _equal(_rows(lazy[0]), _rows(table[0]))
    _, quarter = _splits(data, sparsity_keep=0.2)
    assert set(_rows(quarter[0])[SEQ_END_FIELD]) < set(_rows(lazy[0])[SEQ_END_FIELD])


def test_users_mode_keeps_whole_users(data):
    _, full = _splits(data)
    ds, half = _splits(data, sparsity_keep=0.5, sparsity_mode="users", sparsity_seed=3)
    assert ds.sparsity_stats["users"] == [20, 40]
    full_users, half_users = _by_user(_rows(full[0])), _by_user(_rows(half[0]))
    assert len(half_users) == 20 and all(half_users[u] == full_users[u] for u in half_users)
    for a, b in zip(full[1:], half[1:]):  # left-out users are still validated and tested, as before
        assert _equal(_rows(a), _rows(b))
    _, again = _splits(data, sparsity_keep=0.5, sparsity_mode="users", sparsity_seed=3)
    _, other = _splits(data, sparsity_keep=0.5, sparsity_mode="users", sparsity_seed=4)
    assert set(_by_user(_rows(again[0]))) == set(half_users) != set(_by_user(_rows(other[0])))


@pytest.mark.parametrize("windows", ["last", "sliding"])
def test_train_windows_are_taken_from_the_thinned_samples(data, windows):
    """MultiModalSequentialDataset (TSSR, SICSRec, the content baselines): thinning first, then the
    windows of what is left; validation and test unchanged."""
    _, full = _splits(data, dataset_class=MultiModalSequentialDataset, train_windows=windows)
    ds, half = _splits(data, dataset_class=MultiModalSequentialDataset, train_windows=windows, sparsity_keep=0.5)
    _, thinned = _splits(data, dataset_class=MultiModalSequentialDataset, sparsity_keep=0.5)
    rows, all_rows = _rows(half[0]), _rows(thinned[0])
    expected = MultiModalSequentialDataset.window_rows(all_rows["user_id"], windows, FAST["MAX_ITEM_LIST_LENGTH"])
    assert _equal(rows, {f: v[expected] for f, v in all_rows.items()}, FIELDS + (SEQ_END_FIELD,))
    if windows == "last":  # each user's last training target, its history shorter than before
        full_rows = _rows(full[0])
        assert np.array_equal(rows[SEQ_END_FIELD], full_rows[SEQ_END_FIELD])
        assert np.all(rows["item_length"] <= full_rows["item_length"])
        assert np.any(rows["item_length"] < full_rows["item_length"])
    for a, b in zip(full[1:], half[1:]):
        assert _equal(_rows(a), _rows(b))


def test_bad_settings_and_non_sequential_models_are_refused(data):
    with pytest.raises(ValueError, match=r"sparsity_keep must be a number in \(0, 1\]"):
        _splits(data, sparsity_keep=1.5)
    with pytest.raises(ValueError, match="sparsity_mode must be one of"):
        _splits(data, sparsity_keep=0.5, sparsity_mode="random")
    _splits(data, model="BPR")  # keep 1.0: nothing to thin
    with pytest.raises(ValueError, match="sequential models; BPR"):
        _splits(data, model="BPR", sparsity_keep=0.5)


# ----------------------------------------------------------------------------- the study axis


SPARSITY_STUDY = """\
name: sparse
datasets: [tiny]
models: [SASRec, GRU4Rec]
proposed: [GRU4Rec]
seeds: [1, 2]
sparsity: [1.0, 0.5, 0.25]
metrics: [Hit, NDCG]
topk: [5, 10]
config:
  data_path: data
  valid_metric: NDCG@10
"""


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_study_axis_cells_paths_and_configs(workdir):
    write_tiny_dataset(workdir / "data")
    s = st.validate_study(_write(workdir / "s.yaml", SPARSITY_STUDY))
    assert s.sparsity == [1.0, 0.5, 0.25] and len(s.cells) == 12
    assert s.cells[:4] == [("tiny", "SASRec", 1, 1.0), ("tiny", "SASRec", 2, 1.0), ("tiny", "GRU4Rec", 1, 1.0),
                           ("tiny", "GRU4Rec", 2, 1.0)]
    spec = s.cell_spec("tiny", "SASRec", 2, 0.5)
    assert spec["record"] == os.path.join(s.output_dir, "records", "tiny", "SASRec", "keep0.5", "seed2.json")
    assert spec["log"] == os.path.join(s.output_dir, "logs", "tiny", "SASRec", "keep0.5", "seed2.log")
    assert spec["config_dict"]["sparsity_keep"] == 0.5 and spec["sparsity"] == 0.5
    assert spec["config_dict"]["checkpoint_dir"] == os.path.join(s.output_dir, "saved", "tiny", "SASRec", "keep0.5")
    assert spec["fingerprint"] != s.cell_spec("tiny", "SASRec", 2, 0.25)["fingerprint"]
    assert st.cell_text("tiny", "SASRec", 2, 0.5) == "tiny / SASRec / seed 2 / keep 0.5"
    # without the axis: three-part cells and today's paths
    plain = st.validate_study(_write(workdir / "p.yaml", SPARSITY_STUDY.replace("sparsity: [1.0, 0.5, 0.25]\n", "")))
    assert plain.sparsity is None and plain.cells[0] == ("tiny", "SASRec", 1)
    assert plain.cell_spec("tiny", "SASRec", 1)["record"].endswith(os.path.join("records", "tiny", "SASRec", "seed1.json"))
    assert "sparsity" not in plain.cell_spec("tiny", "SASRec", 1)["config_dict"]

    bad = SPARSITY_STUDY.replace("[1.0, 0.5, 0.25]", "[1.0, 0, 0.5, 0.5]") + "  sparsity_keep: 0.3\n"
    with pytest.raises(st.StudyError) as exc:
        st.validate_study(_write(workdir / "b.yaml", bad))
    text = str(exc.value)
    assert "sparsity[1]: a level is the fraction of the training data kept, in (0, 1], got 0" in text
    assert "sparsity[3]: level 0.5 is listed twice" in text
    assert "config.sparsity_keep: 'sparsity_keep' is set per cell by the study's `sparsity:` list" in text


def _fake_records(s, values):
    """values: (model, level) -> per-seed ndcg@10; hit@10 = 2 x ndcg@10."""
    for (model, level), per_seed in values.items():
        for seed, v in zip(s.seeds, per_seed):
            if v is None:
                continue
            paths = s.cell_paths("tiny", model, seed, level)
            os.makedirs(os.path.dirname(paths["record"]), exist_ok=True)
            test = {"hit@5": v, "hit@10": 2 * v, "ndcg@5": v / 2, "ndcg@10": v}
            st._write_json(paths["record"], {
                "status": "finished", "dataset": "tiny", "model": model, "seed": seed, "valid_metric": "ndcg@10",
                "test_result": test, "best_valid_result": test, "history": {"valid_score": [v]},
                "config": {"sparsity_keep": level, "sparsity_mode": "prefix", "sparsity_seed": 0, "epochs": 3}})


def test_study_report_draws_accuracy_vs_sparsity(workdir):
    write_tiny_dataset(workdir / "data")
    s = st.validate_study(_write(workdir / "s.yaml", SPARSITY_STUDY))
    _fake_records(s, {("SASRec", 1.0): [0.30, 0.32], ("SASRec", 0.5): [0.24, 0.26], ("SASRec", 0.25): [0.15, None],
                      ("GRU4Rec", 1.0): [0.20, 0.23], ("GRU4Rec", 0.5): [0.19, 0.22], ("GRU4Rec", 0.25): [0.18, 0.19]})
    # a record of another level in this cell's place is not this cell's
    wrong = s.cell_paths("tiny", "GRU4Rec", 2, 0.25)["record"]
    assert st.complete_record(wrong, "tiny", "GRU4Rec", 2, 0.25) is not None
    assert st.complete_record(wrong, "tiny", "GRU4Rec", 2, 0.5) is None

    rows = st.collect_cells(s)
    assert len(rows) == 12 and sum(r["status"] == "finished" for r in rows) == 11
    assert {(r["sparsity"], r["sparsity_mode"]) for r in rows if r["status"] == "finished"} == \
        {(1.0, "prefix"), (0.5, "prefix"), (0.25, "prefix")}
    paths = st.write_report(s, rows)
    table = open(paths["tables"]["tiny"]).read()
    ndcg = table.split("**NDCG@10**\n\n")[1].split("\n\n")[0]
    lines = {line.split(" | ")[0]: line for line in ndcg.splitlines()}
    assert lines["| Model"] == "| Model | keep 1 | keep 0.5 | keep 0.25 |"
    # SASRec: 0.31 ± 0.0141, 0.25 (-19.4%), 0.15 (one seed: no std; -51.6%)
    assert lines["| SASRec"] == "| SASRec | 0.3100 ± 0.0141 | 0.2500 ± 0.0141 (-19.4%) | 0.1500 (-51.6%) [n=1] |"
    assert lines["| GRU4Rec"] == "| GRU4Rec | 0.2150 ± 0.0212 | 0.2050 ± 0.0212 (-4.7%) | 0.1850 ± 0.0071 (-14.0%) |"
    assert "**HR@10**" in table and "**HR@5**" not in table  # the valid metric's family: the @10 metrics
    assert "mode prefix, draws seeded by 0" in table
    # then each level's own tables (comparisons in the report's p-value family)
    for level in ("1", "0.5", "0.25"):
        assert f"## tiny, keep {level}\n" in table
    assert paths["summaries"]["tiny, keep 0.5"]["per_model"]["SASRec"]["n"] == 2
    assert os.path.isfile(os.path.join(s.output_dir, "plots", "tiny_sparsity.png"))
    assert os.path.isfile(os.path.join(s.output_dir, "plots", "tiny_keep0.5_metrics.png"))
    results = open(paths["results_md"]).read()
    assert "sparsity levels (fraction of the training data kept): 1, 0.5, 0.25" in results
    assert "![tiny_sparsity.png](plots/tiny_sparsity.png)" in results
    assert "| tiny | SASRec | 1 | 0.5 | finished |" in results
    header = open(paths["cells_csv"]).readline().strip().split(",")
    assert header[:4] == ["dataset", "model", "seed", "sparsity"]
    assert json.load(open(paths["cells_json"]))["cells"][0]["sparsity"] == 1.0
