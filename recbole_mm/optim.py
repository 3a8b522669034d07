"""Optimisers for models with sparse tables.

A model whose ``optimizer_param_groups()`` marks a group ``"sparse": True`` (embedding tables built
with ``sparse=True``, e.g. SICSRec's ``sparse_table_updates``) gets :class:`SparseDenseOptimizer`:
``torch.optim.SparseAdam`` (lazy Adam: the moments and values of the rows a batch touched are
updated, every other row is left as it is) for those groups, and the run's ``learner`` for the rest.
A dense gradient on a sparse table (the whole table used in a step) is an error from SparseAdam.
"""

import torch

SPARSE_LEARNERS = ("adam", "adamw")


class SparseDenseOptimizer:
    """Two optimisers stepped as one: ``dense`` (any ``torch.optim``) and ``sparse`` (SparseAdam).

    ``param_groups`` lists both's groups; ``state_dict`` / ``load_state_dict`` carry both (a
    checkpoint of a dense-only run does not load into it, and the error says so)."""

    def __init__(self, dense, sparse):
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self):
        return list(self.dense.param_groups) + list(self.sparse.param_groups)

    @property
    def state(self):
        return {**self.dense.state, **self.sparse.state}

    def zero_grad(self, set_to_none=True):
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = self.dense.step(closure)
        self.sparse.step()
        return loss

    def state_dict(self):
        return {"sparse_dense": True, "dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or not state.get("sparse_dense"):
            raise ValueError("this checkpoint's optimizer state is a single optimizer's, but this run updates "
                             "sparse tables with a second one (sparse_table_updates): resume with the setting "
                             "the checkpoint was written with, or start afresh (--fresh)")
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def build_optimizer(groups, learner, learning_rate, weight_decay, dense_builder):
    """``dense_builder(groups)`` (the run's learner, e.g. a trainer's ``_build_optimizer``), or a
    :class:`SparseDenseOptimizer` when a group is marked ``"sparse": True``."""
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in groups]
    sparse = [dict(g) for g in groups if g.get("sparse")]
    if not sparse:
        return dense_builder(groups)
    if str(learner).lower() not in SPARSE_LEARNERS:
        raise ValueError(f"sparse table updates use SparseAdam (lazy Adam) for the tables, which needs "
                         f"learner: adam or adamw (got {learner!r}); set learner: adam or turn the "
                         f"sparse updates off")
    if weight_decay:
        raise ValueError(f"weight_decay {weight_decay} cannot apply to sparse tables (SparseAdam has none, "
                         f"and decaying every row each step is the dense update it avoids); regularise with "
                         f"the model's reg_weight, or turn the sparse updates off")
    for g in sparse:
        g.pop("sparse")
        g.setdefault("lr", learning_rate)
    dense = [dict(g, params=list(g["params"])) for g in groups if not g.get("sparse")]
    dense = [g for g in dense if g["params"]]
    return SparseDenseOptimizer(dense_builder(dense) if dense else _NoOptimizer(), torch.optim.SparseAdam(sparse))


class _NoOptimizer:
    """Stands in for the dense optimiser when every trainable parameter is a sparse table."""

    param_groups, state = [], {}

    def zero_grad(self, set_to_none=True):
        pass

    def step(self, closure=None):
        return closure() if closure is not None else None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
