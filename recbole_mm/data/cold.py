"""Cold-start items: hold a set of items out of training, evaluate on them as on every item.

Keys (``properties/overall.yaml``):

* ``cold_items``: the fraction of the items held out, in [0, 1); ``0.0`` (the default) holds out
  nothing and the training samples are exactly those of a run without these keys. The items with
  interactions (after RecBole's filtering) each get a number ``u`` in [0, 1) from ``cold_seed``
  (one per internal item id); the ``round(cold_items * n)`` with the smallest ``u`` are cold.
  Drawn per item, not per interaction: most items are rare, so the share of test targets that are
  cold is usually well below ``cold_items`` (the record counts them). Nested: for one seed, the
  cold set at a smaller fraction is a subset of that at a larger one.
* ``cold_items_after``: a timestamp (the ``.inter`` file's units) or ``~``; every item whose first
  interaction is later than it is cold too (new items), in addition to the drawn fraction.
* ``cold_seed``: the seed of the draws; ``~`` = the run's ``seed``.
* ``eval_item_sets``: which item sets the record reports test metrics for: ``all`` (RecBole's
  ``test_result``: always there), ``warm``, ``cold`` (``test_item_sets`` in the record).

**The rule: no held-out interaction reaches training.** After RecBole's split (leave-one-out: the
last two interactions of each user are the validation and test targets), every interaction with a
cold item in a user's *training part* is removed, and the training samples are rebuilt from what is
left, exactly as RecBole's augmentation builds them (every prefix -> its next item, histories of at
most ``MAX_ITEM_LIST_LENGTH`` of the remaining interactions): no training sample has a cold target
and no training history holds a cold item. Validation and test are untouched: their targets
(warm or cold) and their whole histories, which may hold cold items (a new item a user watched is
part of the user's history at test time; the model has to read it from content). Then
``sparsity_keep`` thins what is left (:mod:`recbole_mm.data.sparsity`) and ``train_windows`` picks
the windows (:class:`~recbole_mm.data.dataset.MultiModalSequentialDataset`).

**Warm and cold metrics.** Ranking stays over every item (cold ones included, RecBole's full
ranking): nothing is removed from the candidates, so nothing leaks through the candidate set. The
``warm`` / ``cold`` metrics are the test metrics averaged over the test users whose target is a
warm / cold item (the ``item_set`` slice family, :mod:`recbole_mm.slices`); they partition the test
users, so their ``n``-weighted mean is the overall metric.

**Models.** Cold items are not in the training softmax of the plugin's models (their logits are
-inf and they are never drawn as negatives: :class:`recbole_mm.model.softmax.CatalogueSoftmax`): a
held-out item does not exist yet at training time, as a new item does not, and a softmax that kept
them as negatives only would teach a content model to rank them last. Models with item IDs (TSSR,
SICSRec, IDContentSASRec) replace the ID row of every cold item (and TSSR's linear classifier rows
and bias), detached, so its own row never receives a gradient (:class:`recbole_mm.model.layers.ColdRows`):

* ``cold_item_rule: content_ridge`` (default): at evaluation, the row a ridge regression from the
  item's content features (the model's feature tables, plus a missing-content indicator per
  feature) to the table predicts; fitted on the warm items, the penalty chosen by generalised
  cross-validation, refitted whenever the table changed (once per evaluation). Each cold item is
  scored from its own content, also through ID tables and TSSR's linear classifier, which have no
  content on the item side. A TSSR with ``content_mode: finetune`` has no feature table and uses
  ``mean``.
* ``cold_item_rule: content_knn``: the mean row of its ``cold_item_neighbours`` (default 1) most
  content-similar warm items (cosine of the centred features). Unlike the ridge map, whose
  predictions shrink towards the mean row when content explains the table poorly, the rows keep a
  trained row's scale, so cold items compete for the top of a ranking (at a cost to warm targets
  when the content is weak: benchmarks/cold_rules.py, docs/BENCHMARKS.md).
* ``cold_item_rule: mean``: the mean of the warm items' rows (all cold items alike; the rule of the
  first cold-start runs).

ContentSASRec has no IDs: its item vectors are its content. RecBole's ID-only models (SASRec, ...)
are run as they are: their cold rows are trained only as negatives.

**Features and SICSRec stage 1.** Feature extraction reads item content only (``.item`` fields and
images, no interaction), so it cannot read a held-out interaction. SICSRec's stage-1 pair mining
(:func:`recbole_mm.model.sicsrec_pairs.user_sequences`) reads each user's training part with the
same cold interactions (and the interactions ``sparsity_keep`` drops) removed.

Sequential models with RecBole's leave-one-out split only (not ``benchmark_filename``): a
non-sequential model's evaluation masks the user's training items, which holding out would change.
"""

import hashlib

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.utils import set_color

ITEM_SETS = ("all", "warm", "cold")


def cold_settings(config):
    """``(fraction, after, seed)`` of a run, checked; nothing is held out when ``fraction == 0`` and
    ``after`` is None."""
    fraction = config["cold_items"]
    fraction = 0.0 if fraction is None else fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"cold_items must be a number in [0, 1) (the fraction of the items held out of "
                         f"training), got {fraction!r}")
    after = config["cold_items_after"]
    if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))):
        raise ValueError(f"cold_items_after must be a timestamp (a number in the .inter file's units) or ~, "
                         f"got {after!r}")
    seed = config["cold_seed"]
    seed = config["seed"] if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"cold_seed must be an integer or ~ (the run's seed), got {seed!r}")
    return float(fraction), (None if after is None else float(after)), int(seed)


def eval_item_sets(config):
    """The item sets of ``eval_item_sets`` (checked), ``all`` first."""
    sets = config["eval_item_sets"]
    sets = ["all"] if sets is None else ([sets] if isinstance(sets, str) else list(sets))
    bad = [s for s in sets if s not in ITEM_SETS]
    if bad:
        raise ValueError(f"eval_item_sets: unknown item set(s) {bad}; choose among {list(ITEM_SETS)}")
    return ["all"] + [s for s in ("warm", "cold") if s in sets]


def holds_out(config):
    fraction, after, _ = cold_settings(config)
    return fraction > 0 or after is not None


def choose_cold_items(n_items, items, times, fraction, after, seed):
    """Bool mask over internal item ids (``n_items``): the cold items, given every interaction's
    ``items`` and ``times`` (``times`` only read when ``after`` is set). Row 0 (PAD) is never cold."""
    items = np.asarray(items, dtype=np.int64)
    present = np.bincount(items, minlength=n_items) > 0
    present[0] = False
    cold = np.zeros(n_items, dtype=bool)
    candidates = np.flatnonzero(present)
    n_cold = int(np.floor(fraction * len(candidates) + 0.5))
    if n_cold:
        draws = np.random.default_rng(seed).random(n_items)
        cold[candidates[np.argsort(draws[candidates], kind="stable")[:n_cold]]] = True
    if after is not None:
        if times is None:
            raise ValueError("cold_items_after needs the interactions' time field")
        first = np.full(n_items, np.inf)
        np.minimum.at(first, items, np.asarray(times, dtype=np.float64))
        cold |= present & (first > after)
    return cold


def cold_item_mask(dataset):
    """The cold items of ``dataset`` (a RecBole dataset after filtering and remapping, before or after
    ``build()``; read from its interactions) as a bool numpy array over internal ids, or None when
    the config holds nothing out (``eval_item_sets`` is checked here too, before any training)."""
    eval_item_sets(dataset.config)
    fraction, after, seed = cold_settings(dataset.config)
    if fraction == 0 and after is None:
        return None
    inter = dataset.inter_feat
    if hasattr(inter, "sort_values"):  # a DataFrame: before build()
        items = inter[dataset.iid_field].to_numpy()
        times = inter[dataset.time_field].to_numpy() if dataset.time_field in inter.columns else None
    else:
        raise ValueError("cold_item_mask needs the dataset before build() (the interactions, not the samples)")
    return choose_cold_items(dataset.item_num, items, times, fraction, after, seed)


def cold_tokens_digest(dataset, cold):
    """sha256 of the sorted raw tokens of the cold items: names the set in the record."""
    tokens = sorted(str(t) for t in np.asarray(dataset.field2id_token[dataset.iid_field])[np.flatnonzero(cold)])
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


# ----------------------------------------------------------------------------- the training split


def training_sequences(dataset, train):
    """Each user's training interactions as flat per-list-field arrays (the users' groups in the
    split's order, time order within a user), from the training samples (every prefix: each user's
    first sample has history length 1). Returns ``(flat, uids, row_of)``: ``flat`` maps each list
    field (``item_id_list``, ...) to a tensor over the training interactions; ``uids`` the user of
    each; ``row_of`` the training sample whose target each is (-1: a user's first interaction)."""
    from recbole_mm.data.lazy import SEQ_END_FIELD
    from recbole_mm.data.vectorised import group_order

    inter = train.inter_feat
    length_field = dataset.item_list_length_field
    uids = inter[dataset.uid_field].numpy()
    lengths = inter[length_field].numpy()
    n = len(uids)
    order, counts = group_order(uids)
    starts = np.cumsum(counts) - counts
    first_rows = order[starts]
    if n and (lengths[first_rows] != 1).any():
        raise ValueError("cold_items rebuilds the training samples from every prefix of each user's training "
                         "interactions (RecBole's augmentation); this training split has users without a "
                         "sample of history length 1 (benchmark files?)")
    groups = len(counts)
    offsets = starts + np.arange(groups)  # flat index of each user's first interaction
    pos = np.arange(n) - np.repeat(starts, counts)
    flat_pos = np.repeat(offsets, counts) + 1 + pos  # flat index of the target of row order[i]
    total = n + groups
    row_of = np.full(total, -1, dtype=np.int64)
    row_of[flat_pos] = order
    flat_uids = np.empty(total, dtype=np.int64)
    flat_uids[flat_pos] = uids[order]
    flat_uids[offsets] = uids[first_rows]
    if getattr(train, "lazy_sequences", False):
        seq_end = inter[SEQ_END_FIELD].numpy()
        source = np.empty(total, dtype=np.int64)
        source[flat_pos] = seq_end[order]
        source[offsets] = seq_end[first_rows] - 1
        same_user = flat_uids[1:] == flat_uids[:-1]
        if not np.all(np.diff(source)[same_user] == 1):
            raise ValueError("cold_items: a user's training samples are not consecutive interactions")
        index = torch.from_numpy(source)
        flat = {field: values[index] for field, values in train._seq_flat.items()}
    else:
        suffix = dataset.config["LIST_SUFFIX"]
        flat = {}
        for field in inter.columns:
            if field == dataset.uid_field or field + suffix not in inter.columns:
                continue
            values = inter[field]
            out = torch.zeros((total,) + tuple(values.shape[1:]), dtype=values.dtype)
            out[torch.from_numpy(flat_pos)] = values[torch.from_numpy(order)]
            out[torch.from_numpy(offsets)] = inter[field + suffix][torch.from_numpy(first_rows), 0]
            flat[field + suffix] = out
    return flat, flat_uids, row_of


def drop_cold_samples(dataset, train, cold):
    """Rebuild ``train`` (in place) without any interaction with an item of ``cold`` (bool over
    internal ids): targets and histories (see the module docstring). Returns ``(samples before,
    samples after, interactions before, interactions after)``."""
    from recbole_mm.data.lazy import SEQ_END_FIELD, cut_histories, prefix_samples
    from recbole_mm.data.vectorised import take

    inter = train.inter_feat
    length_field = dataset.item_list_length_field
    flat, flat_uids, row_of = training_sequences(dataset, train)
    items = flat[dataset.item_id_list_field].numpy()
    kept = np.flatnonzero(~np.asarray(cold, dtype=bool)[items])
    target, length = prefix_samples(flat_uids[kept], dataset.max_item_list_len)
    rows = row_of[kept][target]
    assert (rows >= 0).all(), "a user's first interaction cannot be a target"
    samples = take(inter, rows)
    new_flat = {field: values[torch.from_numpy(kept)] for field, values in flat.items()}
    new_length = torch.as_tensor(length, dtype=inter[length_field].dtype)
    new = {length_field: new_length}
    if getattr(train, "lazy_sequences", False):
        new[SEQ_END_FIELD] = torch.as_tensor(target, dtype=inter[SEQ_END_FIELD].dtype)
        train._seq_flat = new_flat  # the training split's own arrays (a copy of the dataset object)
    else:
        seq_end = torch.from_numpy(target)
        for field, values in new_flat.items():
            new[field] = cut_histories(values, seq_end, new_length.long(), inter[field].shape[1])
    samples.update(Interaction(new))
    train.inter_feat = samples
    return len(inter), len(rows), len(items), len(kept)


def hold_out_cold_items(dataset, datasets, cold):
    """Apply the rule to the split ``datasets`` (train, valid, test) of ``dataset``; returns the
    record's ``cold_items`` entry (also logged), or None when nothing is held out."""
    if cold is None:
        return None
    fraction, after, seed = cold_settings(dataset.config)
    length_field = getattr(dataset, "item_list_length_field", None)
    train = datasets[0]
    if length_field is None or length_field not in train.inter_feat:
        raise ValueError(f"cold_items holds items out of the training histories of sequential models; "
                         f"{dataset.config['model']} ({type(dataset).__name__}) has none (its evaluation masks "
                         "each user's training items, which holding out would change). Use a sequential model "
                         "or cold_items: 0.0 and cold_items_after: ~")
    if dataset.config["benchmark_filename"] is not None:
        raise ValueError("cold_items needs RecBole's leave-one-out split; benchmark_filename fixes the training "
                         "samples in files. Remove cold_items / cold_items_after or the benchmark files")
    samples = drop_cold_samples(dataset, train, cold)
    cold_t = torch.from_numpy(cold)
    targets = {}
    for name, split in zip(("valid", "test"), datasets[1:]):
        items = split.inter_feat[split.iid_field]
        targets[name] = [int(cold_t[items].sum()), int(len(items))]
    for split in datasets:
        split.cold_items = cold
    stats = {"fraction": fraction, "after": after, "seed": seed,
             "items": [int(cold.sum()), int(len(cold) - 1)], "items_sha256": cold_tokens_digest(dataset, cold),
             "train_samples": [samples[1], samples[0]], "train_interactions": [samples[3], samples[2]],
             "cold_targets": targets}
    dataset.logger.info(
        set_color("cold items", "blue") + f": {stats['items'][0]} of {stats['items'][1]} items held out of training "
        f"(fraction {fraction:g}, seed {seed}" + (f", first seen after {after:g}" if after is not None else "")
        + f"); kept {samples[1]} of {samples[0]} training samples, {samples[3]} of {samples[2]} training "
        f"interactions; cold targets: valid {targets['valid'][0]}/{targets['valid'][1]}, test "
        f"{targets['test'][0]}/{targets['test'][1]}")
    return stats
