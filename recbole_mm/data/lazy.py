"""Lazy sequential samples: training data that grows with interactions, not interactions x L.

RecBole's ``SequentialDataset.data_augmentation`` turns N interactions into N - n_users samples
(every prefix -> its next item) with a per-sample Python loop, and materialises each list field
as an ``(N, MAX_ITEM_LIST_LENGTH)`` table (12 B x L per sample for item ids and timestamps:
about 1.8 GB at 3M samples and L=50). :class:`LazySequencesMixin` builds **the same samples, in
the same order**, vectorised, and keeps

* the interactions sorted by (user, time) as flat per-field arrays (``O(N)``), and
* one row per sample in ``inter_feat`` (user, target item, target timestamp, ``item_length``
  and :data:`SEQ_END_FIELD`, the flat index of the target: the history is the ``item_length``
  interactions before it),

and cuts the list fields (``item_id_list``, ``timestamp_list``, ...) when a batch is built
(``dataset[index]``, which every RecBole data loader calls). RecBole's splits, filtering,
evaluation and the models see the same tensors as before.

**Trimming** (``trim_batches``): each batch's list fields are cut to its longest history instead
of ``MAX_ITEM_LIST_LENGTH``. Histories are left-aligned with padding on the right, so a model
whose positions are ``arange`` from the left and whose attention masks padding gives the same
outputs (tested per model). ``auto`` trims for the models verified to be unaffected
(the models whose :class:`~recbole_mm.registry.ModelSpec` says ``trim_safe=True``).

**Length bucketing** (``length_bucketing: True``, opt-in): the training sampler shuffles, cuts the
permutation into pools of ``bucket_pool_batches`` batches, sorts each pool by history length and
shuffles the resulting batches, as NLP toolkits do, so that trimmed batches carry little padding.

``sequence_samples: recbole`` keeps RecBole's own materialised augmentation (for comparisons).
"""

from logging import getLogger

import numpy as np
import torch
from recbole.data.dataloader.general_dataloader import TrainDataLoader
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from recbole_mm.data.vectorised import take

SEQ_END_FIELD = "seq_end_index"
SAMPLE_MODES = ("lazy", "recbole")


def sample_mode(config):
    mode = config["sequence_samples"] or "lazy"
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sequence_samples must be one of {SAMPLE_MODES}, got {mode!r}")
    return mode


def trimming(config):
    """Whether batches are cut to their longest history (``trim_batches``: auto | True | False)."""
    value = config["trim_batches"]
    if isinstance(value, str) and value.lower() != "auto":
        raise ValueError(f"trim_batches must be auto, True or False, got {value!r}")
    from recbole_mm.registry import UnknownModelError, get_spec

    name = config["model"]
    try:  # the model's spec says whether its outputs are verified independent of right padding
        verified = get_spec(name).trim_safe
    except UnknownModelError:
        verified = False
    if value is None or isinstance(value, str):  # auto
        return verified
    if value and not verified:
        getLogger().warning(f"trim_batches: True for {name}, whose outputs are not verified to be independent "
                            "of right padding (e.g. layers sized by MAX_ITEM_LIST_LENGTH); compare with "
                            "trim_batches: False before trusting its results")
    return bool(value)


def prefix_samples(uids, max_len):
    """RecBole's augmentation, vectorised: for interactions sorted by (user, time) with user ids
    ``uids``, the flat indices of the targets (every interaction but each user's first) and the
    history length of each (``min(position in the user's sequence, max_len)``)."""
    uids = np.asarray(uids)
    n = len(uids)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first = np.ones(n, dtype=bool)
    first[1:] = uids[1:] != uids[:-1]
    starts = np.flatnonzero(first)
    position = np.arange(n, dtype=np.int64) - np.repeat(starts, np.diff(np.append(starts, n)))
    target = np.flatnonzero(position >= 1)
    return target, np.minimum(position[target], int(max_len))


def cut_histories(flat, seq_end, length, width):
    """``(B, width, ...)`` tensor whose row b holds ``flat[seq_end[b] - length[b]: seq_end[b]]``
    left-aligned, zero-padded on the right (RecBole's layout)."""
    offsets = torch.arange(width, dtype=torch.long)
    valid = offsets[None, :] < length[:, None]
    index = (seq_end - length)[:, None] + offsets[None, :]
    out = flat[torch.where(valid, index, torch.zeros_like(index))]
    return out.masked_fill(~valid.reshape(valid.shape + (1,) * (out.dim() - 2)), 0)


class LazySequencesMixin:
    """For :class:`recbole.data.dataset.SequentialDataset` subclasses (see the module docstring)."""

    _seq_flat = None  # list field -> flat tensor over the interactions sorted by (user, time)
    trims_batches = False

    def data_augmentation(self):
        if sample_mode(self.config) == "recbole":
            return super().data_augmentation()
        self.logger.debug("data_augmentation (lazy)")
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        target, length = prefix_samples(self.inter_feat[self.uid_field].numpy(), self.max_item_list_len)
        self._seq_flat = {getattr(self, f"{field}_list_field"): self.inter_feat[field]
                          for field in self.inter_feat if field != self.uid_field}
        samples = take(self.inter_feat, target)
        samples.update(Interaction({
            self.item_list_length_field: torch.from_numpy(length),
            SEQ_END_FIELD: torch.from_numpy(target),
        }))
        self.set_field_property(SEQ_END_FIELD, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
        self.inter_feat = samples
        self.trims_batches = trimming(self.config)

    @property
    def lazy_sequences(self):
        return self._seq_flat is not None

    def histories(self, inter, width=None):
        """``inter`` (rows of ``inter_feat``) with its list fields cut from the flat arrays:
        ``width`` columns (default: the batch's longest history when trimming, else
        ``MAX_ITEM_LIST_LENGTH``)."""
        length = inter[self.item_list_length_field]
        if width is None:
            width = int(length.max()) if (self.trims_batches and len(length)) else self.max_item_list_len
            width = max(width, 1)
        seq_end = inter[SEQ_END_FIELD]
        inter.update(Interaction({field: cut_histories(flat, seq_end, length, width)
                                  for field, flat in self._seq_flat.items()}))
        return inter

    def __getitem__(self, index, join=True):
        df = self.inter_feat[index]
        if self._seq_flat is not None:
            df = self.histories(df)
        return self.join(df) if join else df

    def inter_matrix(self, form="coo", value_field=None):
        """RecBole's ``SequentialDataset.inter_matrix`` (targets plus each user's first item),
        reading the first items from the flat arrays."""
        if self._seq_flat is None:
            return super().inter_matrix(form, value_field)
        if not self.uid_field or not self.iid_field:
            raise ValueError("dataset does not exist uid/iid, thus can not converted to sparse matrix.")
        first = self.inter_feat[self.inter_feat[self.item_list_length_field] == 1]
        first = self.histories(first, width=1)
        suffix = self.config["LIST_SUFFIX"]
        new = {}
        for field in first.columns:
            if field in (SEQ_END_FIELD, self.item_list_length_field) or field.endswith(suffix):
                continue
            head = first[field + suffix][:, 0] if (field != self.uid_field and field + suffix in first) \
                else first[field]
            new[field] = torch.cat([self.inter_feat[field], head])
        return self._create_sparse_matrix(Interaction(new), self.uid_field, self.iid_field, form, value_field)


def uses_lazy_sequences(dataset_class):
    """Whether ``dataset_class`` augments with RecBole's own ``SequentialDataset`` loop (which the
    mixin replaces); datasets with their own augmentation (e.g. DIEN's) keep it."""
    from recbole.data.dataset import SequentialDataset

    return issubclass(dataset_class, SequentialDataset) and \
        dataset_class.data_augmentation is SequentialDataset.data_augmentation


# ----------------------------------------------------------------------------- bucketing
def length_buckets(lengths, batch_size, pool_batches, generator):
    """Batches (lists of sample indices) for one epoch: a random permutation cut into pools of
    ``pool_batches`` batches, each pool sorted by length (stable) and cut into batches, then the
    batches shuffled. Every index appears exactly once; only a pool's last batch can be short."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator)
    pool = max(1, int(pool_batches)) * batch_size
    batches = []
    for start in range(0, n, pool):
        chunk = perm[start:start + pool]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i].tolist() for i in order]


class LengthBucketBatchSampler:
    """Batch sampler over a lazy dataset's training samples (see :func:`length_buckets`).

    Under DDP every rank draws the same global batches (``batch_size x world_size``, same seeded
    generator) and takes its interleaved share of each, so ranks see batches of similar length.
    """

    def __init__(self, lengths, batch_size, pool_batches, generator, rank=0, world_size=1):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = int(batch_size)
        self.pool_batches = int(pool_batches)
        self.generator = generator
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self):
        global_size = self.batch_size * self.world_size
        for batch in length_buckets(self.lengths, global_size, self.pool_batches, self.generator):
            share = batch[self.rank::self.world_size]
            if share:
                yield share

    def __len__(self):
        n, global_size = len(self.lengths), self.batch_size * self.world_size
        pool = max(1, self.pool_batches) * global_size
        full, rest = divmod(n, pool)
        return full * self.pool_batches + -(-rest // global_size)


class BucketedTrainDataLoader(TrainDataLoader):
    """RecBole's ``TrainDataLoader`` drawing its batches from :class:`LengthBucketBatchSampler`."""

    def __init__(self, config, dataset, sampler, shuffle=True):
        super().__init__(config, dataset, sampler, shuffle=shuffle)
        rank, world = 0, 1
        if not config["single_spec"]:
            rank, world = torch.distributed.get_rank(), config["world_size"]
        self._buckets = LengthBucketBatchSampler(
            dataset.inter_feat[dataset.item_list_length_field], self.step,
            config["bucket_pool_batches"] or 64, self.generator, rank, world)

    @property
    def _index_sampler(self):  # torch's DataLoader iterates (and sizes itself by) this sampler
        return self._buckets


def data_preparation(config, dataset):
    """RecBole's ``data_preparation``; with ``length_bucketing: True`` the training loader draws
    length-bucketed batches (lazy sequential datasets only); full-ranking evaluation blocks fit
    ``eval_memory_mb`` (:func:`cap_eval_batch`) and trimmed evaluation sets are ordered by history
    length (:func:`sort_by_length`)."""
    from recbole.data import data_preparation as recbole_data_preparation

    cap_eval_batch(config, dataset)
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if config["length_bucketing"]:
        train_set = train_data._dataset
        if not getattr(train_set, "lazy_sequences", False):
            raise ValueError(f"length_bucketing needs lazy sequential samples (a sequential model with "
                             f"sequence_samples: lazy); {config['model']} uses {type(train_set).__name__}")
        if not train_set.trims_batches:
            getLogger().warning("length_bucketing without trim_batches: batches keep MAX_ITEM_LIST_LENGTH "
                                "columns, so bucketing saves nothing")
        train_data = BucketedTrainDataLoader(config, train_set, train_data._sampler, shuffle=True)
    for loader in (valid_data, test_data):
        sort_by_length(loader)
    return train_data, valid_data, test_data


def cap_eval_batch(config, dataset):
    """Full-ranking evaluation of a sequential model scores ``eval_batch_size`` users x every item at
    once (RecBole divides the batch by the number of items only for other models). With
    ``eval_memory_mb`` the users per block are capped so that the scores (float32, counted twice:
    scores and their top-k/masking copies) take at most that much; metrics are unchanged."""
    from recbole.utils import ModelType

    budget, mode = config["eval_memory_mb"], config["eval_args"]["mode"]
    modes = mode.values() if isinstance(mode, dict) else [mode]
    if not budget or config["MODEL_TYPE"] != ModelType.SEQUENTIAL or "full" not in modes:
        return
    cap = max(1, int(budget * 2 ** 20 // (2 * 4 * dataset.item_num)))
    if config["eval_batch_size"] > cap:
        getLogger().info(f"eval_batch_size {config['eval_batch_size']} -> {cap}: {cap} users x {dataset.item_num} "
                         f"items of scores fit eval_memory_mb={budget}")
        config["eval_batch_size"] = cap


def sort_by_length(loader):
    """Order a trimmed full-ranking evaluation set by history length (stable), so each batch is cut
    to users of similar length. Full-ranking metrics are means over users: the order is free (a
    negative-sampling evaluation loader indexes users at construction and is left alone)."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader

    ds = getattr(loader, "_dataset", None)
    if isinstance(loader, FullSortEvalDataLoader) and loader.is_sequential and getattr(ds, "trims_batches", False):
        order = torch.argsort(ds.inter_feat[ds.item_list_length_field], stable=True)
        ds.inter_feat = take(ds.inter_feat, order)
