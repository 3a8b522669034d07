"""Test metrics per slice of the test samples: target popularity, history length, target modality.

Content models are meant to help where item IDs know little: rare targets, short histories. One
overall number hides that, so every run record also holds ``test_slices``: the same top-k metrics
as ``test_result`` (every per-user top-k metric of RecBole in ``metrics``: Hit, MRR, NDCG,
Precision, Recall, MAP, at every ``topk``), averaged over the test samples of each bucket, with the
number of samples ``n`` (one per test user under leave-one-out):

* ``target_popularity``: interactions of the target item in the **training data** (the
  interactions models train on: every interaction but the validation and test targets), in fixed
  bins ``0 | 1-5 | 6-20 | 21-100 | >100`` (:data:`POPULARITY_EDGES`). Fixed bins, not quantiles,
  so that buckets mean the same on every dataset and run; ``0`` holds targets never seen in
  training.
* ``history_length``: the user's interactions before the test target, ``1-5 | 6-10 | 11-20 | >20``
  (:data:`HISTORY_EDGES`); the whole history, not the ``MAX_ITEM_LIST_LENGTH`` the model reads.
* ``modality``: which content the target item has, ``text+image | text | image | none``, from the
  missing masks of the features the run loaded (:class:`~recbole_mm.data.dataset.MultiModalSequentialDataset`;
  a feature's modality: :func:`feature_modality`; ``modalities`` lists those loaded, and with one of them
  the buckets are that one and ``none``, e.g. ``text | none``); runs without item features
  (RecBole's own models) have no modality slice.
* ``item_set``: whether the test target is a ``warm`` item or a ``cold`` one (held out of training:
  ``cold_items`` / ``cold_items_after``, :mod:`recbole_mm.data.cold`); runs without cold items have no
  item-set slice. Ranking is over every item, as in ``test_result``: the warm / cold metrics are the
  overall metrics restricted to the users whose target is warm / cold.

Every family partitions the test samples, so the ``n``-weighted mean of a family's buckets equals
the overall metric (``test_result``, which RecBole rounds to ``metric_decimal_place``). The per-sample
values come from the very top-k matrix RecBole's evaluator scored (``rec.topk``, kept by the trainer's
collector, see :class:`recbole_mm.trainer.GatheringCollector`), through RecBole's own metric classes:
no second ranking, no tie rule of our own. Under DDP that matrix is the one gathered from every rank
in single-process order; when the ranks' rows could not be gathered, no slices are computed (the
record says why). Only sequential models with full-ranking evaluation are sliced (one target per
test sample); other runs record ``{"skipped": why}``.

:func:`slice_metrics` is the pure part (per-sample values + bucket codes -> table);
:func:`compute_test_slices` reads the run's datasets.
"""

import inspect

import numpy as np
import torch

POPULARITY_EDGES = (0, 5, 20, 100)  # upper bounds (inclusive) of the buckets; the last bucket is open
HISTORY_EDGES = (5, 10, 20)
MODALITY_BUCKETS = ("text+image", "text", "image", "none")
FAMILIES = ("target_popularity", "history_length", "modality", "item_set")
ITEM_SET_BUCKETS = ("warm", "cold")
DEFINITIONS = {
    "target_popularity": "interactions of the target item in the training data (every interaction but the "
                         "validation and test targets)",
    "history_length": "interactions of the user before the test target (the whole history, not the "
                      "MAX_ITEM_LIST_LENGTH the model reads)",
    "modality": "content the target item has, from the missing masks of the item features the run loaded",
    "item_set": "whether the test target is a warm item or a cold one (held out of training, recbole_mm.data.cold); "
                "ranked over all items, as test_result",
}
PLACES = 6  # decimals kept in the record


def bucket_labels(edges, low):
    """Labels of the buckets ``[low, e0], [e0 + 1, e1], ..., > e_last`` (``"1-5"``, ``"0"``, ``">100"``)."""
    labels, start = [], low
    for edge in edges:
        labels.append(str(start) if start == edge else f"{start}-{edge}")
        start = edge + 1
    labels.append(f">{edges[-1]}")
    return labels


def bucketize(values, edges):
    """Bucket index of each value for upper-inclusive ``edges`` (``len(edges)`` = the open last bucket)."""
    return np.searchsorted(np.asarray(edges), np.asarray(values), side="left")


def per_sample_metrics(topk_rows, metrics, topk):
    """``{"hit@10": array(n_samples), ...}``: every per-user top-k metric of ``metrics`` (RecBole names,
    any case) at every k of ``topk``, per sample, from RecBole's ``rec.topk`` matrix (one row per
    sample: 0/1 at each of the first ``max(topk)`` ranks, then the number of positives).

    RecBole's own metric classes compute the values (``metric_info``); their mean over the samples is
    what RecBole reports. Metrics that are not a mean over users (ItemCoverage, GiniIndex, ...) or need
    scores (AUC, GAUC, ...) are left out."""
    from recbole.config import Config
    from recbole.evaluator.base_metric import TopkMetric
    from recbole.evaluator.register import metrics_dict

    if not hasattr(np, "float"):  # NDCG.metric_info reads np.float, which RecBole's Config defines
        Config.compatibility_settings(None)  # (as every run's Config does: without one, e.g. in a test)
    rows = torch.as_tensor(topk_rows)
    topk = [topk] if isinstance(topk, int) else list(topk)
    k_max = max(topk)
    pos_index, pos_len = torch.split(rows, [k_max, 1], dim=1)
    pos_index = pos_index.to(torch.bool).cpu().numpy()
    pos_len = pos_len.squeeze(-1).cpu().numpy()
    out = {}
    for name in metrics:
        name = name.lower()
        cls = metrics_dict.get(name)
        if cls is None or not issubclass(cls, TopkMetric) or not hasattr(cls, "metric_info"):
            continue
        metric = cls({"topk": topk, "metric_decimal_place": PLACES})
        n_args = len(inspect.signature(metric.metric_info).parameters)
        values = metric.metric_info(pos_index) if n_args == 1 else metric.metric_info(pos_index, pos_len)
        for k in topk:
            out[f"{name}@{k}"] = np.asarray(values[:, k - 1], dtype=np.float64)
    return out


def slice_metrics(values, codes, labels):
    """``{label: {"n": count, metric: mean, ...}}`` over the samples of each bucket, in ``labels``'
    order (an empty bucket: ``{"n": 0}``). ``values``: metric -> per-sample array; ``codes``: the
    bucket index of each sample (``-1``: in no bucket)."""
    codes = np.asarray(codes, dtype=np.int64)
    kept = codes >= 0
    counts = np.bincount(codes[kept], minlength=len(labels))
    table = {label: {"n": int(counts[b])} for b, label in enumerate(labels)}
    for key, v in values.items():
        sums = np.bincount(codes[kept], weights=np.asarray(v, dtype=np.float64)[kept], minlength=len(labels))
        for b, label in enumerate(labels):
            if counts[b]:
                table[label][key] = round(float(sums[b] / counts[b]), PLACES)
    return table


def weighted_mean(table, key):
    """The ``n``-weighted mean of ``key`` over a family's buckets (equals the overall metric)."""
    n = sum(b["n"] for b in table.values())
    return sum(b["n"] * b[key] for b in table.values() if b["n"]) / n if n else None


# ----------------------------------------------------------------------------- the run's data


def _column(dataset, field):
    return dataset.inter_feat[field].cpu().numpy()


def first_items(dataset):
    """The first item of every user's sequence (the history of the samples of history length 1),
    read from RecBole's materialised lists or the lazy flat arrays."""
    inter = dataset.inter_feat
    first = inter[inter[dataset.item_list_length_field] == 1]
    if getattr(dataset, "lazy_sequences", False):
        first = dataset.histories(first, width=1)
    return first[dataset.item_id_list_field][:, 0].cpu().numpy()


def training_popularity(dataset, held_out):
    """Interactions per internal item id in the training data: every interaction of the full
    (augmented, unsplit) ``dataset`` (each sample's target plus each user's first item) less the
    targets of the ``held_out`` splits (validation, test). Independent of ``train_windows``, which
    thins the training samples, not the interactions."""
    n_items = dataset.item_num
    counts = np.bincount(_column(dataset, dataset.iid_field), minlength=n_items)
    counts += np.bincount(first_items(dataset), minlength=n_items)
    for split in held_out:
        if split is not None and len(split.inter_feat):
            counts -= np.bincount(_column(split, split.iid_field), minlength=n_items)
    return counts


def history_lengths(dataset, test):
    """The user's interactions before each test sample's target. A user's samples (full ``dataset``)
    are one per interaction but the first, and the test samples are each user's last: a sample's
    history is the user's samples less the test samples after it (in time, then history-length
    order)."""
    uid = dataset.uid_field
    per_user = np.bincount(_column(dataset, uid), minlength=dataset.user_num)
    users = _column(test, uid)
    n = len(users)
    keys = [np.arange(n), _column(test, test.item_list_length_field)]
    if test.time_field in test.inter_feat:
        keys.append(_column(test, test.time_field))
    order = np.lexsort(tuple(keys) + (users,))
    sorted_users = users[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_users[1:] != sorted_users[:-1]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, n))
    position = np.arange(n) - np.repeat(starts, sizes)
    after = np.empty(n, dtype=np.int64)
    after[order] = np.repeat(sizes, sizes) - 1 - position
    return per_user[users] - after


def feature_modality(dataset, name):
    """``text``, ``image`` or None: the modality of the loaded feature ``name``, from the dataset's
    ``feature_modality(name)`` when it has one, else the feature's spec (``mm_features: {name: {type:
    ...}}``), else its manifest in the feature store (``modality`` or ``type``: e.g. SICSRec's
    stage-1 tables, which have no spec)."""
    hook = getattr(dataset, "feature_modality", None)
    if callable(hook):
        return hook(name)
    try:
        kind = dataset.feature_spec(name).get("type")
    except (KeyError, AttributeError, TypeError):
        kind = None
    if kind is None:
        config = getattr(dataset, "config", None)
        if config is not None and config["data_path"]:
            from recbole_mm.features import FeatureStore

            manifest = FeatureStore(config["data_path"], dataset.dataset_name).read_manifest(name) or {}
            kind = manifest.get("modality") or manifest.get("type")
    kind = str(kind or "").lower()
    return kind if kind in ("text", "image") else None


def modality_codes(dataset, items):
    """``(codes, labels, modalities)``: each item's bucket among ``labels`` (those of
    :data:`MODALITY_BUCKETS` the loaded modalities can tell apart: ``text | none`` with text
    features only), and the modalities loaded; None without text or image features."""
    missing = getattr(dataset, "mm_missing", None) or {}
    has = {"text": None, "image": None}
    for name, mask in missing.items():
        kind = feature_modality(dataset, name)
        if kind not in has:
            continue  # e.g. an imported matrix (type user): its modality is unknown
        present = ~mask.cpu().numpy()[items]
        has[kind] = present if has[kind] is None else (has[kind] | present)
    loaded = [kind for kind in ("text", "image") if has[kind] is not None]
    if not loaded:
        return None
    text = has["text"] if has["text"] is not None else np.zeros(len(items), dtype=bool)
    image = has["image"] if has["image"] is not None else np.zeros(len(items), dtype=bool)
    codes = np.select([text & image, text, image], [0, 1, 2], default=3)
    if len(loaded) == 2:
        return codes, list(MODALITY_BUCKETS), loaded
    labels = [loaded[0], "none"]
    return np.where(codes == 3, 1, 0), labels, loaded


def compute_test_slices(topk_rows, config, dataset, valid_data, test_data):
    """The ``test_slices`` of a run record: ``{family: {"definition", "edges", "buckets": {label:
    {"n", metric...}}}}``, or ``{"skipped": why}`` when the run cannot be sliced."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    test = getattr(test_data, "_dataset", None)
    if test is None or not hasattr(dataset, "item_list_length_field"):
        return {"skipped": "only sequential models are sliced (one target per test sample)"}
    if not isinstance(test_data, FullSortEvalDataLoader) or not test_data.is_sequential:
        return {"skipped": "only full-ranking evaluation is sliced"}
    if topk_rows is None:
        return {"skipped": "no per-sample top-k rows: no top-k metric in `metrics`, or a distributed "
                           "evaluation whose ranks' rows could not be gathered"}
    if len(topk_rows) != len(test.inter_feat):
        return {"skipped": f"{len(topk_rows)} evaluated rows for {len(test.inter_feat)} test samples"}
    values = per_sample_metrics(topk_rows, config["metrics"], config["topk"])
    if not values:
        return {"skipped": "no per-user top-k metric in `metrics`"}
    items = _column(test, test.iid_field)
    valid = getattr(valid_data, "_dataset", None)
    out = {}
    popularity = training_popularity(dataset, [valid, test])[items]
    out["target_popularity"] = {"edges": list(POPULARITY_EDGES), "codes": bucketize(popularity, POPULARITY_EDGES),
                                "labels": bucket_labels(POPULARITY_EDGES, 0)}
    history = history_lengths(dataset, test)
    out["history_length"] = {"edges": list(HISTORY_EDGES), "codes": bucketize(history, HISTORY_EDGES),
                             "labels": bucket_labels(HISTORY_EDGES, 1)}
    modality = modality_codes(dataset, items)
    if modality is not None:
        codes, labels, loaded = modality
        out["modality"] = {"modalities": loaded, "codes": codes, "labels": labels}
    cold = getattr(dataset, "cold_items", None)
    if cold is not None:
        out["item_set"] = {"codes": np.asarray(cold, dtype=bool)[items].astype(np.int64),
                           "labels": list(ITEM_SET_BUCKETS)}
    slices = {}
    for family, spec in out.items():
        entry = {"definition": DEFINITIONS[family]}
        entry.update({k: v for k, v in spec.items() if k not in ("codes", "labels")})
        entry["buckets"] = slice_metrics(values, spec["codes"], spec["labels"])
        slices[family] = entry
    return slices
