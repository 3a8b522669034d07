"""Training-data sparsity: thin a run's training samples with a seed, leave evaluation alone.

Three keys (``properties/overall.yaml``):

* ``sparsity_keep``: the fraction of the training data kept, in (0, 1]; ``1.0`` (the default)
  thins nothing, and the training samples are exactly those of a run without these keys.
* ``sparsity_mode``: what is thinned.

  - ``prefix`` (default): every user keeps the most recent ``k`` of their ``m`` training
    interactions (the interactions before the validation target), ``k = floor(keep * m + u)``
    with ``u`` uniform in [0, 1) drawn per user from the seed (stochastic rounding: the expected
    ``k`` is ``keep * m``, no bias towards short or long histories), clipped to ``[2, m]``: every
    user keeps at least its last training sample. The samples whose target is older are dropped
    and the histories of the kept samples start at the first kept interaction: no training
    sample reads a dropped interaction.
  - ``users``: ``round(keep * n)`` of the ``n`` users with training samples (those with the
    smallest ``u``) keep all of them; the other users train on nothing.

* ``sparsity_seed``: the seed of the draws ``u`` (one per internal user id, independent of which
  users have training samples); ``~`` = the run's ``seed``.

**What evaluation sees: the same at every level.** Only the training split is thinned, after
RecBole's split: validation and test samples (targets and the whole history fed to the model,
up to ``MAX_ITEM_LIST_LENGTH``) are those of ``sparsity_keep: 1.0``, for every user, also for
the users ``users`` mode leaves out of training. Two levels are therefore scored on the same
users, targets and inputs, and their metrics are comparable; what changes is what the model
learned from. A history at evaluation may hold items whose training interactions were dropped
(their ID embeddings learned less, or nothing): that is part of what the axis measures, and
where item content can help. The slices' target popularity (:mod:`recbole_mm.slices`) counts
the full training data, so its buckets are the same at every level.

**Nested levels.** For one seed, the training data at a lower ``keep`` is a subset of that at a
higher one (``k`` grows with ``keep`` for the same ``u``; ``users`` takes the users in the same
order), so a curve over levels does not mix subsampling noise into the trend.

Sequential models only: their training samples are prefixes of each user's sequence (RecBole's
augmentation, the plugin's lazy samples or benchmark files, with a user's samples in time order).
A non-sequential model's evaluation masks the user's training items, which thinning would change,
so ``sparsity_keep < 1`` is an error there.
"""

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.utils import set_color

SPARSITY_MODES = ("prefix", "users")


def sparsity_settings(config):
    """``(keep, mode, seed)`` of a run, checked; ``keep == 1.0`` means nothing is thinned."""
    keep = config["sparsity_keep"]
    keep = 1.0 if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"sparsity_keep must be a number in (0, 1] (the fraction of the training data kept), "
                         f"got {keep!r}")
    mode = config["sparsity_mode"] or "prefix"
    if mode not in SPARSITY_MODES:
        raise ValueError(f"sparsity_mode must be one of {SPARSITY_MODES}, got {mode!r}")
    seed = config["sparsity_seed"]
    seed = config["seed"] if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"sparsity_seed must be an integer or ~ (the run's seed), got {seed!r}")
    return float(keep), mode, int(seed)


def user_draws(n_users, seed):
    """One number in [0, 1) per internal user id, fixed by ``seed``."""
    return np.random.default_rng(seed).random(int(n_users))


def kept_interactions(users, n_train, keep, mode, draws):
    """How many of their most recent training interactions ``users`` keep (0: none), given each
    one's number of training interactions ``n_train`` (see the module docstring). Users with fewer
    than 2 (no training sample) keep theirs and do not count in ``users`` mode."""
    users = np.asarray(users, dtype=np.int64)
    m = np.asarray(n_train, dtype=np.int64)
    if mode == "users":
        eligible = np.flatnonzero(m >= 2)
        n_keep = max(1, int(np.floor(keep * len(eligible) + 0.5))) if len(eligible) else 0
        chosen = np.zeros(len(users), dtype=bool)
        chosen[eligible[np.argsort(draws[users[eligible]], kind="stable")[:n_keep]]] = True
        return np.where(chosen | (m < 2), m, 0)
    if mode != "prefix":
        raise ValueError(f"sparsity_mode must be one of {SPARSITY_MODES}, got {mode!r}")
    k = np.floor(keep * m + draws[users]).astype(np.int64)
    return np.clip(k, np.minimum(m, 2), m)


def thin_samples(uids, order, lengths, keep, mode, draws):
    """The training samples to keep and their history lengths.

    ``uids``, ``order`` and ``lengths`` are per sample: its user, a key that puts a user's samples
    in time order (the flat index of the target), its history length. A user with ``s`` samples
    has ``m = s + 1`` training interactions (every sample's target plus the first item); keeping
    its last ``k`` keeps its last ``k - 1`` samples, each history cut to the interactions since
    the first kept one. Returns ``(rows, lengths)``: indices into the samples, ascending (the
    split's order is kept), and the new history lengths of those rows.
    """
    uids = np.asarray(uids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(uids)
    if n == 0:
        return np.zeros(0, dtype=np.int64), lengths
    by_user = np.lexsort((np.asarray(order), uids))
    sorted_uids = uids[by_user]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_uids[1:] != sorted_uids[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, n))
    from_end = np.empty(n, dtype=np.int64)  # 0: the user's most recent sample
    from_end[by_user] = np.repeat(counts, counts) - 1 - (np.arange(n) - np.repeat(starts, counts))
    k = kept_interactions(sorted_uids[starts], counts + 1, keep, mode, draws)
    k_row = np.empty(n, dtype=np.int64)
    k_row[by_user] = np.repeat(k, counts)
    rows = np.flatnonzero(from_end < k_row - 1)
    return rows, np.minimum(lengths[rows], (k_row - 1 - from_end)[rows])


def drop_oldest(lists, new_length, cut):
    """Materialised histories (``(B, L, ...)``, left-aligned, zero-padded on the right) without
    their ``cut`` oldest items: row b keeps ``lists[b, cut[b]: cut[b] + new_length[b]]``."""
    width = lists.shape[1]
    offsets = torch.arange(width, dtype=torch.long)
    valid = offsets[None, :] < new_length[:, None]
    index = torch.where(valid, cut[:, None] + offsets[None, :], torch.zeros_like(offsets)[None, :])
    out = lists[torch.arange(len(lists))[:, None], index]
    return out.masked_fill(~valid.reshape(valid.shape + (1,) * (out.dim() - 2)), 0)


def thin_training(dataset, train):
    """Thin ``train`` (the training split ``dataset.build()`` made) in place as the config says;
    returns what was kept (a dict, also logged), or None when ``sparsity_keep`` is 1."""
    from recbole_mm.data.lazy import SEQ_END_FIELD
    from recbole_mm.data.vectorised import take

    keep, mode, seed = sparsity_settings(dataset.config)
    if keep >= 1.0:
        return None
    inter = train.inter_feat
    length_field = getattr(dataset, "item_list_length_field", None)
    if length_field is None or length_field not in inter:
        raise ValueError(f"sparsity_keep < 1 thins the training histories of sequential models; "
                         f"{dataset.config['model']} ({type(dataset).__name__}) has none (its evaluation "
                         "masks each user's training items, which thinning would change). Use a sequential "
                         "model or sparsity_keep: 1.0")
    uids = inter[dataset.uid_field].numpy()
    lengths = inter[length_field].numpy()
    lazy = SEQ_END_FIELD in inter
    order = inter[SEQ_END_FIELD].numpy() if lazy else np.arange(len(uids))
    rows, new_length = thin_samples(uids, order, lengths, keep, mode, user_draws(dataset.user_num, seed))
    samples = take(inter, rows)
    new = {length_field: torch.as_tensor(new_length, dtype=inter[length_field].dtype)}
    cut = torch.from_numpy(lengths[rows] - new_length)
    if not lazy and bool((cut > 0).any()):  # lazy histories are cut from the flat arrays by length
        suffix = dataset.config["LIST_SUFFIX"]
        for field in inter.columns:
            if field + suffix in inter.columns:
                new[field + suffix] = drop_oldest(samples[field + suffix], torch.from_numpy(new_length), cut)
    samples.update(Interaction(new))
    train.inter_feat = samples
    users_before = np.unique(uids)
    users_after = np.unique(uids[rows])
    stats = {"keep": keep, "mode": mode, "seed": seed,
             "samples": [int(len(rows)), int(len(uids))],
             "interactions": [int(len(rows) + len(users_after)), int(len(uids) + len(users_before))],
             "users": [int(len(users_after)), int(len(users_before))]}
    dataset.logger.info(
        set_color("train sparsity", "blue") + f": {mode}, keep {keep:g} (seed {seed}): kept {stats['samples'][0]} "
        f"of {stats['samples'][1]} training samples, {stats['interactions'][0]} of {stats['interactions'][1]} training interactions, "
        f"{stats['users'][0]} of {stats['users'][1]} users; validation and test unchanged")
    return stats
