"""Test metrics per slice (recbole_mm.slices): a hand-built case against hand computation, the
popularity and history length of a real split against counts from the raw file, the slices of a
tiny run adding up to its test_result, and the "slices" section of a study report."""

import json
import math
import os
import types

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_mm import slices as sl
from recbole_mm import study as st
from recbole_mm.study import validate_study

from conftest import FAST, build_tiny, write_tiny_dataset
from test_study import VARIANT_STUDY, env, write  # noqa: F401 - env is a fixture


def topk_rows(ranks, k_max):
    """RecBole's ``rec.topk`` rows for one positive per sample at 1-based ``ranks``."""
    rows = torch.zeros(len(ranks), k_max + 1, dtype=torch.int)
    for i, r in enumerate(ranks):
        if r <= k_max:
            rows[i, r - 1] = 1
    rows[:, -1] = 1
    return rows


# ----------------------------------------------------------------------------- by hand


def test_buckets_and_labels():
    assert sl.bucket_labels(sl.POPULARITY_EDGES, 0) == ["0", "1-5", "6-20", "21-100", ">100"]
    assert sl.bucket_labels(sl.HISTORY_EDGES, 1) == ["1-5", "6-10", "11-20", ">20"]
    # upper bounds are inclusive
    assert sl.bucketize([0, 1, 5, 6, 20, 21, 100, 101, 10 ** 6], sl.POPULARITY_EDGES).tolist() == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sl.bucketize([1, 5, 6, 10, 11, 20, 21], sl.HISTORY_EDGES).tolist() == [0, 0, 1, 1, 2, 2, 3]


def test_slice_metrics_of_a_hand_built_case():
    # six test users: the rank of their target, its training popularity, their history length
    ranks = [1, 3, 12, 2, 10, 5]
    popularity = [0, 3, 7, 50, 150, 3]
    history = [2, 8, 30, 4, 15, 9]
    values = sl.per_sample_metrics(topk_rows(ranks, 10), ["Hit", "NDCG", "MRR", "ItemCoverage"], [5, 10])
    # ItemCoverage is not a mean over users: not sliced
    assert sorted(values) == ["hit@10", "hit@5", "mrr@10", "mrr@5", "ndcg@10", "ndcg@5"]
    # one positive: NDCG@k = 1 / log2(rank + 1), MRR@k = 1 / rank, within k
    assert values["hit@10"].tolist() == [1, 1, 0, 1, 1, 1]
    assert values["hit@5"].tolist() == [1, 1, 0, 1, 0, 1]
    assert values["ndcg@10"] == pytest.approx([1, 0.5, 0, 1 / math.log2(3), 1 / math.log2(11), 1 / math.log2(6)])
    assert values["mrr@5"] == pytest.approx([1, 1 / 3, 0, 0.5, 0, 0.2])

    pop = sl.slice_metrics(values, sl.bucketize(popularity, sl.POPULARITY_EDGES),
                           sl.bucket_labels(sl.POPULARITY_EDGES, 0))
    assert list(pop) == ["0", "1-5", "6-20", "21-100", ">100"]
    assert pop["0"] == {"n": 1, "hit@5": 1, "hit@10": 1, "ndcg@5": 1, "ndcg@10": 1, "mrr@5": 1, "mrr@10": 1}
    # "1-5": users 2 (rank 3) and 6 (rank 5)
    assert pop["1-5"]["n"] == 2 and pop["1-5"]["hit@5"] == 1.0
    assert pop["1-5"]["ndcg@10"] == pytest.approx((0.5 + 1 / math.log2(6)) / 2, abs=1e-6)
    assert pop["1-5"]["mrr@10"] == pytest.approx((1 / 3 + 1 / 5) / 2, abs=1e-6)
    assert pop["6-20"] == {"n": 1, "hit@5": 0, "hit@10": 0, "ndcg@5": 0, "ndcg@10": 0, "mrr@5": 0, "mrr@10": 0}
    assert pop[">100"]["hit@10"] == 1 and pop[">100"]["hit@5"] == 0 and pop[">100"]["mrr@10"] == 0.1

    hist = sl.slice_metrics(values, sl.bucketize(history, sl.HISTORY_EDGES), sl.bucket_labels(sl.HISTORY_EDGES, 1))
    # 1-5: users 1, 4 (ranks 1, 2); 6-10: users 2, 6 (ranks 3, 5); 11-20: user 5 (rank 10); >20: user 3 (rank 12)
    assert [hist[b]["n"] for b in hist] == [2, 2, 1, 1]
    assert hist["1-5"]["mrr@10"] == pytest.approx(0.75) and hist["6-10"]["hit@10"] == 1
    assert hist["11-20"]["ndcg@10"] == pytest.approx(1 / math.log2(11), abs=1e-6) and hist[">20"]["hit@10"] == 0

    # an empty bucket is {"n": 0}; every family's n-weighted mean is the overall mean
    empty = sl.slice_metrics(values, [0] * 6, ["a", "b"])
    assert empty["b"] == {"n": 0}
    for table in (pop, hist, empty):
        for key, v in values.items():
            assert sl.weighted_mean(table, key) == pytest.approx(v.mean(), abs=1e-6)


def test_per_sample_metrics_average_to_recboles_own():
    from recbole.evaluator.collector import DataStruct
    from recbole.evaluator.metrics import MRR, NDCG, Hit, Recall

    rows = topk_rows([1, 3, 12, 2, 10, 5, 7, 4], 10)
    struct = DataStruct()
    struct.set("rec.topk", rows)
    config = {"topk": [5, 10], "metric_decimal_place": 6}
    values = sl.per_sample_metrics(rows, ["hit", "ndcg", "mrr", "recall"], [5, 10])
    for cls in (Hit, NDCG, MRR, Recall):
        for key, value in cls(config).calculate_metric(struct).items():
            assert values[key].mean() == pytest.approx(value, abs=1e-6)


def test_modality_buckets_from_missing_masks():
    # items 1..5; text missing for 2 and 4, image missing for 3 and 4
    missing = {"text": torch.tensor([True, False, True, False, True, False]),
               "img": torch.tensor([True, False, False, True, True, False])}
    types_ = {"text": "text", "img": "image"}
    ds = types.SimpleNamespace(mm_missing=missing, feature_spec=lambda name: {"type": types_[name]})
    codes, labels, loaded = sl.modality_codes(ds, np.array([1, 2, 3, 4, 5, 1]))
    assert labels == ["text+image", "text", "image", "none"] and loaded == ["text", "image"]
    assert [labels[c] for c in codes] == ["text+image", "image", "text", "none", "text+image", "text+image"]
    # text alone: "text | none"
    ds.mm_missing = {"text": missing["text"]}
    codes, labels, loaded = sl.modality_codes(ds, np.array([1, 2, 4]))
    assert (labels, loaded) == (["text", "none"], ["text"]) and [labels[c] for c in codes] == ["text", "none", "none"]
    # no features, or features of unknown modality: no modality slice
    assert sl.modality_codes(types.SimpleNamespace(), np.array([1])) is None
    ds = types.SimpleNamespace(mm_missing={"u": missing["text"]}, feature_spec=lambda name: {"type": "user"})
    assert sl.modality_codes(ds, np.array([1])) is None


# ----------------------------------------------------------------------------- a real split


def _raw_counts(root, dataset):
    """From the raw .inter file: training interactions per internal item id (all but each user's last
    two: leave-one-out validation and test) and each user's history length at the test step."""
    inter = pd.read_csv(os.path.join(str(root), "data", "tiny", "tiny.inter"), sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter = inter.sort_values(["user_id", "timestamp"])
    from_end = inter.groupby("user_id").cumcount(ascending=False)
    train = inter[from_end >= 2]
    item_id = dataset.field2token_id["item_id"]
    popularity = np.zeros(dataset.item_num, dtype=np.int64)
    for token, count in train["item_id"].value_counts().items():
        popularity[item_id[token]] = count
    history = (inter.groupby("user_id").size() - 1).to_dict()
    return popularity, history


@pytest.mark.parametrize("overrides", [{}, {"sequence_samples": "recbole", "train_windows": "last"}],
                         ids=["lazy", "recbole-last-windows"])
def test_popularity_and_history_of_a_real_split(tmp_path, overrides):
    config, dataset, (train, valid, test) = build_tiny(tmp_path, "SASRec", **overrides)
    popularity, history = _raw_counts(tmp_path, dataset)
    got = sl.training_popularity(dataset, [valid._dataset, test._dataset])
    assert got.tolist() == popularity.tolist()
    if not overrides:  # all training samples kept: RecBole's own training matrix counts the same
        assert got.tolist() == np.asarray(train._dataset.inter_matrix().sum(axis=0)).ravel().tolist()
    tokens = dataset.field2id_token["user_id"][test._dataset.inter_feat["user_id"].numpy()]
    lengths = sl.history_lengths(dataset, test._dataset)
    assert lengths.tolist() == [history[t] for t in tokens]
    # FAST has MAX_ITEM_LIST_LENGTH 10: the model reads at most 10, the slice counts them all
    assert lengths.max() > config["MAX_ITEM_LIST_LENGTH"]

    # the whole computation, with fake ranks and (on this plain dataset) a text mask
    test_set = test._dataset
    n = len(test_set.inter_feat)
    ranks = (np.arange(n) % 13) + 1
    missing = torch.zeros(dataset.item_num, dtype=torch.bool)
    missing[0] = missing[1::3] = True
    dataset.mm_missing = {"text": missing}
    dataset.feature_spec = lambda name: {"type": "text"}
    out = sl.compute_test_slices(topk_rows(ranks, 20), config, dataset, valid, test)
    assert list(out) == ["target_popularity", "history_length", "modality"]
    assert out["target_popularity"]["edges"] == [0, 5, 20, 100] and out["history_length"]["edges"] == [5, 10, 20]
    assert out["modality"]["modalities"] == ["text"] and list(out["modality"]["buckets"]) == ["text", "none"]
    items = test_set.inter_feat["item_id"].numpy()
    assert out["modality"]["buckets"]["none"]["n"] == int(missing[items].sum())
    expected_hist = np.bincount(sl.bucketize(lengths, sl.HISTORY_EDGES), minlength=4)
    assert [b["n"] for b in out["history_length"]["buckets"].values()] == expected_hist.tolist()
    hit10 = (ranks <= 10).mean()
    for family in out.values():
        assert sl.weighted_mean(family["buckets"], "hit@10") == pytest.approx(hit10, abs=1e-6)
    # rows that are not the test set's: not sliced
    assert "skipped" in sl.compute_test_slices(topk_rows(ranks[:-1], 20), config, dataset, valid, test)
    assert "skipped" in sl.compute_test_slices(None, config, dataset, valid, test)


def test_the_slices_of_a_tiny_run_add_up_to_its_test_result(workdir):
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(workdir / "data")
    record = workdir / "run.json"
    cfg = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"),
               record_path=str(record), metrics=["Hit", "NDCG", "MRR"], topk=[5, 10])
    result = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=cfg)
    slices = json.loads(record.read_text())["test_slices"]
    assert slices == json.loads(json.dumps(result["test_slices"]))
    assert list(slices) == ["target_popularity", "history_length"]  # SASRec loads no item features
    test_result = result["test_result"]
    assert sorted(test_result) == ["hit@10", "hit@5", "mrr@10", "mrr@5", "ndcg@10", "ndcg@5"]
    for family in slices.values():
        assert sum(b["n"] for b in family["buckets"].values()) == 40  # one test sample per user
        for key, value in test_result.items():
            # test_result is rounded to metric_decimal_place (4)
            assert sl.weighted_mean(family["buckets"], key) == pytest.approx(value, abs=6e-5)


# ----------------------------------------------------------------------------- a study report


def _bucket(n, hit, ndcg):
    return {"n": n, "hit@10": hit, "ndcg@10": ndcg, "hit@5": 0.0, "ndcg@5": 0.0}


def test_a_study_report_has_a_slices_section(env):
    study = validate_study(write(env / "v.yaml", VARIANT_STUDY))
    for model in study.models:
        for seed in study.seeds:
            paths = study.cell_paths("tiny", model, seed)
            os.makedirs(os.path.dirname(paths["record"]), exist_ok=True)
            hit = 0.2 * seed + (0.1 if model == "GRU4Rec" else 0.0)
            slices = {
                "target_popularity": {"definition": "...", "edges": [0, 5, 20, 100], "buckets": {
                    "0": {"n": 0}, "1-5": _bucket(10, hit, hit / 2), "6-20": _bucket(30, hit + 0.1, 0.1),
                    "21-100": {"n": 0}, ">100": {"n": 0}}},
                "history_length": {"definition": "...", "edges": [5, 10, 20], "buckets": {
                    "1-5": _bucket(25 + seed, hit, 0.05), "6-10": _bucket(15 - seed, 0.5, 0.25),
                    "11-20": {"n": 0}, ">20": {"n": 0}}},
            }
            if model == "GRU4Rec":  # as if it loaded text features
                slices["modality"] = {"definition": "...", "modalities": ["text"], "buckets": {
                    "text": _bucket(38, 0.4, 0.2), "none": _bucket(2, 0.0, 0.0)}}
            with open(paths["record"], "w") as f:
                json.dump({"status": "finished", "dataset": "tiny", "model": study.model_of(model), "seed": seed,
                           "valid_metric": "NDCG@10", "test_result": {"hit@10": 0.3, "ndcg@10": 0.2},
                           "best_valid_result": {"ndcg@10": 0.2}, "timings_s": {"total": 1.0},
                           "test_slices": slices}, f)
    paths = st.write_report(study)
    table = open(paths["tables"]["tiny"]).read()
    assert table.strip() in open(paths["results_md"]).read()
    section = table[table.index("### tiny: slices"):]
    # the valid metric's family (@10) of the report's metrics; empty buckets left out
    assert "Test metrics per slice of the test users: HR@10 / NDCG@10, mean over the finished seeds" in section
    assert "| Model | 1-5 | 6-20 |\n|---|---|---|\n| users | 10 | 30 |" in section
    # seeds 1 and 2: hit = 0.2, 0.4 (mean 0.3); GRU4Rec + 0.1
    assert "| SASRec | 0.3000 / 0.1500 | 0.4000 / 0.1000 |" in section
    assert "| GRU4Rec | 0.4000 / 0.2000 | 0.5000 / 0.1000 |" in section
    assert "| SASRec+bucketing | 0.3000 / 0.1500 | 0.4000 / 0.1000 |" in section
    # users differ between the runs: a range
    assert "| Model | 1-5 | 6-10 |\n|---|---|---|\n| users | 26-27 | 13-14 |" in section
    # the modality slice: GRU4Rec alone
    modality = section[section.index("**Target modality"):]
    assert "| users | 38 | 2 |\n| GRU4Rec | 0.4000 / 0.2000 | 0.0000 / 0.0000 |" in modality
    assert "| SASRec |" not in modality
    cells = json.load(open(paths["cells_json"]))["cells"]
    assert cells[0]["slices"]["target_popularity"]["buckets"]["1-5"]["n"] == 10


# ----------------------------------------------------------------------------- DDP


def test_ddp_slices_equal_single_process_slices(workdir):
    """2 CPU processes (gloo) on 41 users (DistributedSampler pads the shards with a duplicate): the
    record's slices are computed on the rows gathered from both ranks, so they equal the slices of a
    single-process evaluation of the same checkpoint."""
    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation
    from recbole_mm.quick_start import create_dataset
    from recbole_mm.registry import get_model, get_trainer
    from test_distributed import ddp_cli_run

    cfg, record, _proc = ddp_cli_run(workdir, "SASRec")
    assert record["distributed"]["world_size"] == 2

    config = MMConfig(model="SASRec", dataset="tiny", config_dict=dict(cfg, checkpoint_dir=str(workdir / "eval")))
    dataset = create_dataset(config)
    _, valid, test = data_preparation(config, dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, get_model("SASRec")(config, test._dataset))
    trainer.evaluate(test, load_best_model=True, model_file=record["checkpoint"])
    single = sl.compute_test_slices(trainer.last_eval_topk(), config, dataset, valid, test)
    assert sum(b["n"] for b in single["history_length"]["buckets"].values()) == 41
    assert record["test_slices"] == json.loads(json.dumps(single))
