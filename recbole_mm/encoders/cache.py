"""Per-item helpers of the encoders in the graph: a bounded per-row cache for their intermediates
(an item's frozen lower-layer output, its preprocessed pixels), filled as batches bring rows and never
allocated for the whole catalogue, and :func:`encode_items` (each distinct item of a batch once)."""

import logging
import math

import torch

logger = logging.getLogger(__name__)


class BoundedRowCache:
    """Per-row tensors of one shape (e.g. an item's frozen lower-layer output, (T, H)), kept for
    the rows seen so far within ``budget_mb`` (``None``: no bound), stored as ``dtype``.

    ``get(rows, compute)`` returns ``(len(rows), *shape)``: cached rows are read back, the others
    computed by ``compute(missing_rows)`` (each distinct row once) and kept while the budget lasts.
    The store grows with the rows seen (doubling, at most ``capacity`` rows), never to the
    whole catalogue up front.
    """

    def __init__(self, n_rows, shape, budget_mb=2048, dtype=torch.float32, name="cache"):
        self.n_rows, self.shape, self.dtype, self.name = int(n_rows), tuple(shape), dtype, name
        row_bytes = max(1, math.prod(self.shape)) * torch.empty((), dtype=dtype).element_size()
        self.capacity = self.n_rows if budget_mb is None else min(self.n_rows, int(budget_mb * 2 ** 20 // row_bytes))
        self.row_bytes = row_bytes
        self.slot = None  # (n_rows,) long on the store's device: slot of a cached row, -1 = not cached
        self.store = None  # (allocated, *shape)
        self.used = 0
        self.uncached = 0  # rows computed without a slot once the budget was spent
        self._warned = False

    def _ensure(self, device):
        if self.slot is None or self.slot.device != device:
            self.slot = torch.full((self.n_rows,), -1, dtype=torch.long, device=device)
            self.store, self.used = None, 0

    def _grow(self, needed, device):
        allocated = 0 if self.store is None else self.store.size(0)
        if needed <= allocated:
            return
        size = min(self.capacity, max(needed, 2 * allocated, 64))
        store = torch.empty((size,) + self.shape, dtype=self.dtype, device=device)
        if allocated:
            store[:allocated] = self.store
        self.store = store

    def nbytes(self):
        return 0 if self.store is None else self.store.numel() * self.store.element_size()

    def get(self, rows, compute):
        device = rows.device
        self._ensure(device)
        slots = self.slot[rows]
        hit = slots >= 0
        if rows.numel() and hit.all():
            return self.store[slots].float() if self.dtype != torch.float32 else self.store[slots]
        miss_rows, inverse = torch.unique(rows[~hit], return_inverse=True)
        values = compute(miss_rows)
        out = values.new_empty((rows.size(0),) + tuple(values.shape[1:]))
        if hit.any():
            out[hit] = self.store[slots[hit]].to(values.dtype)
        out[~hit] = values[inverse]
        room = self.capacity - self.used
        keep = min(room, miss_rows.numel())
        if keep > 0:
            self._grow(self.used + keep, device)
            new_slots = torch.arange(self.used, self.used + keep, device=device)
            self.store[new_slots] = values[:keep].detach().to(self.dtype)
            self.slot[miss_rows[:keep]] = new_slots
            self.used += keep
        if keep < miss_rows.numel():
            self.uncached += miss_rows.numel() - keep
            if not self._warned:
                self._warned = True
                logger.info(f"{self.name}: budget full ({self.used:,} of {self.n_rows:,} items, "
                            f"{self.nbytes() / 2 ** 20:.0f} MiB); further items are recomputed each time they occur")
        return out


def encode_items(item_ids, encode_rows, unique=True):
    """``item_ids`` of any shape -> (*item_ids.shape, dim) from ``encode_rows(1-d ids) -> (n, dim)``:
    each distinct id once (``unique``), or every position as it is (the original TSSR regime)."""
    flat = item_ids.reshape(-1)
    if unique:
        uniq, inverse = torch.unique(flat, return_inverse=True)
        vec = encode_rows(uniq)[inverse]
    else:
        vec = encode_rows(flat)
    return vec.view(*item_ids.shape, -1)


def zeros_in_graph(out, params, training):
    """``out`` (zeros for a batch none of whose items has this content) with the trainable ``params``
    taking part in the graph at zero gradient when training: DDP's reduction expects every rank to use
    every parameter."""
    if training and torch.is_grad_enabled():
        out = out + sum(p.view(-1)[0] * 0.0 for p in params)
    return out
