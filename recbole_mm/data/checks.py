"""Interaction checks every dataset the plugin builds goes through (RecBole's models included).

RecBole trains on an ``.inter`` file as it is. A file whose rows are duplicated (an export run
twice, a join that fanned out) then makes the leave-one-out target equal to the last history
item, and full-ranking metrics of any sequential model approach 1.0 (measured: Hit@5 = 1.0,
NDCG@10 = 0.995 on a doubled ml-100k-like file) with nothing in the output to say why.

:class:`InteractionChecksMixin` runs before RecBole's own filtering and counts

* **exact duplicates**: rows equal on (user, item, timestamp) (on every loaded column when there
  is no timestamp), and
* **consecutive repeats**: an item a user interacts with again right after itself (in time
  order), which inflate metrics the same way when the target repeats the last history item.

What happens to each is a config choice (``duplicate_interactions`` and ``consecutive_repeats``
in ``properties/overall.yaml``): ``drop`` (default: dropped, counted and logged as a WARNING),
``error`` (the run stops, naming the file, the counts and an example) or ``keep`` (trained on
as they are, still counted and logged: for re-consumption studies). The counts are kept in
``dataset.interaction_checks`` and written into the run record.
"""

import os

import numpy as np
import pandas as pd

ACTIONS = ("drop", "error", "keep")


class DuplicateInteractionsError(ValueError):
    """The ``.inter`` file holds duplicated interactions and the config says ``error``."""


def _action(config, key):
    value = config[key]
    value = "drop" if value is None else str(value).lower()
    if value not in ACTIONS:
        raise ValueError(f"{key} must be one of {', '.join(ACTIONS)}, got {config[key]!r}")
    return value


def find_duplicates(inter, uid, iid, time_field=None):
    """Boolean masks (exact duplicate rows, consecutive repeats) over ``inter``'s rows, in row order.

    A row is an exact duplicate when an earlier row has the same (user, item, timestamp) (every
    column when ``time_field`` is None). A row is a consecutive repeat when, among the rows that are
    not exact duplicates, the same user's previous interaction in time order (stable: file order
    breaks ties) has the same item.
    """
    n = len(inter)
    if n == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    subset = [uid, iid, time_field] if time_field and time_field in inter else list(inter.columns)
    exact = inter.duplicated(subset=subset, keep="first").to_numpy()
    rest = np.flatnonzero(~exact)
    users = pd.factorize(inter[uid].to_numpy()[rest])[0]
    items = pd.factorize(inter[iid].to_numpy()[rest])[0]
    if time_field and time_field in inter:
        times = inter[time_field].to_numpy()[rest]
        order = np.lexsort((np.arange(len(rest)), times, users))  # stable: user, time, file order
    else:
        order = np.lexsort((np.arange(len(rest)), users))
    su, si = users[order], items[order]
    rep_sorted = np.zeros(len(rest), dtype=bool)
    rep_sorted[1:] = (su[1:] == su[:-1]) & (si[1:] == si[:-1])
    repeat = np.zeros(n, dtype=bool)
    repeat[rest[order[rep_sorted]]] = True
    return exact, repeat


class InteractionChecksMixin:
    """Counts (and by default drops) duplicated interactions before RecBole filters the data."""

    def _data_filtering(self):
        self._check_interactions()
        super()._data_filtering()

    def _data_processing(self):
        if self.benchmark_filename_list is not None:  # pre-split files: RecBole skips _data_filtering
            self._check_interactions(can_drop=False)
        super()._data_processing()

    def _check_interactions(self, can_drop=True):
        inter = self.inter_feat
        self.interaction_checks = {}
        if inter is None or self.uid_field not in inter or self.iid_field not in inter:
            return
        time_field = self.time_field if self.time_field in inter else None
        exact, repeat = find_duplicates(inter, self.uid_field, self.iid_field, time_field)
        n_exact, n_repeat = int(exact.sum()), int(repeat.sum())
        inter_file = os.path.join(self.dataset_path, f"{self.dataset_name}.inter")
        self.interaction_checks = {"rows": int(len(inter)), "exact_duplicates": n_exact,
                                   "consecutive_repeats": n_repeat, "dropped": 0}
        drop = np.zeros(len(inter), dtype=bool)
        for count, mask, key, what in (
            (n_exact, exact, "duplicate_interactions",
             "exact duplicate rows (same user, item and timestamp)" if time_field
             else "exact duplicate rows (no timestamp loaded: every column equal)"),
            (n_repeat, repeat, "consecutive_repeats",
             "consecutive repeats (a user's interaction with the item just interacted with)"),
        ):
            if not count:
                continue
            action = _action(self.config, key)
            first = int(np.flatnonzero(mask)[0])
            example = ", ".join(f"{c}={inter[c].iloc[first]}" for c in
                                [self.uid_field, self.iid_field] + ([time_field] if time_field else []))
            message = (f"{inter_file}: {count} of {len(inter)} interactions are {what}, e.g. {example}. "
                       "Left in, they put the test target in the history and inflate every metric.")
            if action == "error":
                raise DuplicateInteractionsError(
                    f"{message} Fix the file, or set {key}: drop (drop them) or {key}: keep (train on them).")
            if action == "drop" and can_drop:
                drop |= mask
                self.logger.warning(f"{message} Dropped ({key}: drop; {key}: keep trains on them, "
                                    f"{key}: error stops instead).")
            elif action == "drop":
                self.logger.warning(f"{message} They are NOT dropped: the dataset comes as pre-split "
                                    f"benchmark files ({self.benchmark_filename_list}); fix the files.")
            else:
                self.logger.warning(f"{message} Kept ({key}: keep).")
        if drop.any():
            self.inter_feat = inter.loc[~drop].reset_index(drop=True)
            self.interaction_checks["dropped"] = int(drop.sum())


_CHECKED = {}


def with_interaction_checks(dataset_class):
    """``dataset_class`` with :class:`InteractionChecksMixin`, the vectorised loading and splitting of
    :mod:`recbole_mm.data.vectorised` and, for a sequential dataset that augments with RecBole's
    loop, :class:`~recbole_mm.data.lazy.LazySequencesMixin` (a class of this module, cached, so
    that datasets stay picklable: RecBole's ``save_dataset``)."""
    from recbole_mm.data.lazy import LazySequencesMixin, uses_lazy_sequences
    from recbole_mm.data.vectorised import VectorisedDatasetMixin

    if issubclass(dataset_class, InteractionChecksMixin):
        return dataset_class
    if dataset_class not in _CHECKED:
        name = f"Checked{dataset_class.__name__}"
        lazy = (LazySequencesMixin,) if uses_lazy_sequences(dataset_class) else ()
        bases = (InteractionChecksMixin,) + lazy + (VectorisedDatasetMixin, dataset_class)
        cls = type(name, bases, {"__module__": __name__})
        globals()[name] = cls
        _CHECKED[dataset_class] = cls
    return _CHECKED[dataset_class]


def recbole_dataset_class(config):
    """The dataset class RecBole's ``create_dataset`` would choose for ``config``."""
    import importlib

    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    if hasattr(module, config["model"] + "Dataset"):
        return getattr(module, config["model"] + "Dataset")
    type2class = {
        ModelType.GENERAL: "Dataset",
        ModelType.SEQUENTIAL: "SequentialDataset",
        ModelType.CONTEXT: "Dataset",
        ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
        ModelType.TRADITIONAL: "Dataset",
        ModelType.DECISIONTREE: "Dataset",
    }
    return getattr(module, type2class[config["MODEL_TYPE"]])


def __getattr__(name):
    # unpickling a saved ``Checked<RecBoleDataset>`` in a fresh process creates its class here
    if name.startswith("Checked"):
        import importlib

        base = getattr(importlib.import_module("recbole.data.dataset"), name[len("Checked"):], None)
        if base is not None:
            return with_interaction_checks(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
