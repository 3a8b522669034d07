"""Next-item softmax over the catalogue in training: full, or sampled with log-Q correction.

``softmax: full`` (default) is the exact cross-entropy over every item, in chunks of rows within
``ce_memory_mb`` (:func:`~recbole_mm.model.layers.chunked_cross_entropy`). ``softmax: sampled``
scores each row against a subset of the catalogue instead, for catalogues where the exact loss
is too slow:

* ``sampled_negatives: in_batch``: the distinct target items of the batch are the candidates
  (each row's own target among them). Popular items are candidates more often than their share
  of the softmax warrants, so with ``logq_correction`` each candidate's logit is lowered by
  ``log q(item)``, q the item's frequency among the training targets (Yi et al., "Sampling-bias-
  corrected neural modeling for large corpus item recommendations", RecSys 2019).
* ``uniform`` / ``popularity``: ``n_sampled_negatives`` items drawn per batch (with replacement,
  uniformly or in proportion to their training frequency), shared by every row, next to each
  row's own target; a drawn item equal to the row's target is masked out ("accidental hit"), and
  with ``logq_correction`` every logit, the target's included, is lowered by the log of its
  expected count ``K q(item)`` (the sampled softmax of Jean et al., ACL 2015).

Only training uses it: validation and test always rank every item. Cold-start items
(``cold_items``, :mod:`recbole_mm.data.cold`) are not in the training softmax at all (their logits
are -inf, they are never drawn as negatives): held out of training, they do not exist yet for
the model, as a new item does not; a softmax that kept them would teach the model to rank them
last. The item frequencies come from the training dataset the model is built on (its samples'
targets, +1 smoothing), held as a plain tensor (never in a checkpoint, never broadcast by DDP).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_mm.model.layers import checkpointed_sum, chunked_cross_entropy

SOFTMAX_CHOICES = ("full", "sampled")
NEGATIVE_CHOICES = ("in_batch", "uniform", "popularity")


def _candidate_ce_sum(hidden, target, cand, cand_bias):
    """Summed CE of rows ``hidden`` (R, d) over candidate vectors ``cand`` (C, d) + ``cand_bias`` (C,)."""
    return F.cross_entropy(hidden @ cand.t() + cand_bias, target, reduction="sum")


def _sampled_ce_sum(hidden, pos, pos_bias, labels, neg, neg_bias, neg_ids):
    """Summed CE of each row's own target (column 0) against the shared drawn items ``neg``."""
    pos_logit = (hidden * pos).sum(-1) + pos_bias
    neg_logits = (hidden @ neg.t() + neg_bias).masked_fill(labels[:, None] == neg_ids[None, :], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(labels), reduction="sum")


def item_frequencies(dataset, n_items):
    """Training frequency of every item id (its samples' targets), +1 smoothing; PAD (0) gets 0."""
    counts = torch.ones(n_items, dtype=torch.float64)
    inter = getattr(dataset, "inter_feat", None)
    field = getattr(dataset, "iid_field", None)
    if inter is not None and field is not None and field in inter:
        ids = inter[field].long()
        counts += torch.bincount(ids[(ids > 0) & (ids < n_items)], minlength=n_items).double()
    counts[0] = 0.0
    return counts


class CatalogueSoftmax(nn.Module):
    """The training CE of a model that scores items by ``hidden . v(item) (+ b(item))``.

    ``loss(hidden, labels, item_vectors, item_bias=None, all_items=None)``: ``item_vectors(ids)``
    gives (len(ids), d) vectors, ``item_bias(ids)`` (len(ids),) biases; ``all_items()``, if given,
    gives the whole (n_items, d) matrix for the full softmax (default: ``item_vectors`` of every id).
    """

    def __init__(self, config, dataset, n_items, model_name):
        super().__init__()
        self.mode = config["softmax"]
        self.negatives = config["sampled_negatives"]
        if self.mode not in SOFTMAX_CHOICES:
            raise ValueError(f"{model_name}: softmax must be one of {SOFTMAX_CHOICES}, got {self.mode!r}")
        if self.negatives not in NEGATIVE_CHOICES:
            raise ValueError(
                f"{model_name}: sampled_negatives must be one of {NEGATIVE_CHOICES}, got {self.negatives!r}")
        n = config["n_sampled_negatives"]
        self.n_negatives = 1024 if n is None else int(n)
        if self.n_negatives < 1:
            raise ValueError(f"{model_name}: n_sampled_negatives must be >= 1, got {self.n_negatives}")
        self.logq = config["logq_correction"] is not False
        self.memory_mb = config["ce_memory_mb"]
        self.n_items = n_items
        cold = getattr(dataset, "cold_items", None)
        cold = None if cold is None else torch.as_tensor(cold, dtype=torch.bool)
        self.excluded = cold if cold is not None and bool(cold.any()) else None
        # plain tensor (moved on first use): -inf on the held-out items' training logits, built once
        self.exclusion_bias = None if self.excluded is None else \
            torch.zeros(n_items).masked_fill(self.excluded, float("-inf"))
        if self.sampled:
            counts = item_frequencies(dataset, n_items)
            if self.negatives == "uniform":
                counts = torch.ones(n_items, dtype=torch.float64)
                counts[0] = 0.0
            if self.excluded is not None:
                counts[self.excluded] = 0.0
            probs = counts / counts.sum()
            # plain tensors, not buffers: DDP would broadcast buffers every step; moved on first use
            self.probs = probs.float()
            self.log_q = probs.clamp_min(1e-30).log().float()

    @property
    def sampled(self):
        return self.mode == "sampled"

    def describe(self):
        if not self.sampled:
            return "full softmax over every item"
        what = "the batch's targets" if self.negatives == "in_batch" else \
            f"{self.n_negatives} {self.negatives} items per batch"
        return f"sampled softmax over {what}, log-Q correction {'on' if self.logq else 'off'}"

    def _chunk(self, rows, columns):
        if not self.memory_mb:
            return rows
        return max(1, int(self.memory_mb * 2 ** 20 // (3 * 4 * max(columns, 1))))

    def _bias(self, item_bias, ids, correction):
        b = item_bias(ids) if item_bias is not None else None
        if self.logq:
            corr = self.log_q[ids] + correction
            b = -corr if b is None else b - corr
        if b is None:
            b = torch.zeros(ids.size(0), device=ids.device)
        return b

    def forward(self, hidden, labels, item_vectors, item_bias=None, all_items=None):
        """Mean CE of rows ``hidden`` (R, d) whose targets are ``labels`` (R,) (all > 0)."""
        rows = hidden.size(0)
        if rows == 0:
            return hidden.sum() * 0.0
        if not self.sampled or not self.training:
            weight = all_items() if all_items is not None else \
                item_vectors(torch.arange(self.n_items, device=hidden.device))
            bias = item_bias(torch.arange(self.n_items, device=hidden.device)) if item_bias is not None else None
            if self.training and self.exclusion_bias is not None:
                if self.exclusion_bias.device != hidden.device:
                    self.exclusion_bias = self.exclusion_bias.to(hidden.device)
                mask = self.exclusion_bias.to(hidden.dtype)
                bias = mask if bias is None else bias + mask
            return chunked_cross_entropy(hidden, weight, labels, bias=bias, memory_mb=self.memory_mb)
        if self.log_q.device != hidden.device:
            self.probs, self.log_q = self.probs.to(hidden.device), self.log_q.to(hidden.device)
        if self.negatives == "in_batch":
            cand_ids, target = torch.unique(labels, return_inverse=True)
            cand = item_vectors(cand_ids)
            bias = self._bias(item_bias, cand_ids, 0.0)
            chunk = self._chunk(rows, cand_ids.numel())
            if chunk >= rows:
                return _candidate_ce_sum(hidden, target, cand, bias) / rows
            return checkpointed_sum(_candidate_ce_sum, chunk, (hidden, target), (cand, bias)) / rows
        neg_ids = torch.multinomial(self.probs, self.n_negatives, replacement=True)
        log_k = math.log(self.n_negatives)
        neg = item_vectors(neg_ids)
        neg_bias = self._bias(item_bias, neg_ids, log_k)
        pos = item_vectors(labels)
        pos_bias = self._bias(item_bias, labels, log_k)
        chunk = self._chunk(rows, self.n_negatives + 1)
        if chunk >= rows:
            return _sampled_ce_sum(hidden, pos, pos_bias, labels, neg, neg_bias, neg_ids) / rows
        return checkpointed_sum(_sampled_ce_sum, chunk, (hidden, pos, pos_bias, labels),
                                (neg, neg_bias, neg_ids)) / rows
