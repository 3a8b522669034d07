"""Building blocks shared by the plugin's models.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` with a boolean
mask (True = may attend). Sequences are right-padded (RecBole's layout), so with
``causal_padding_mask`` every query row sees at least position 0 and no row is fully masked.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
}


def causal_padding_mask(item_seq):
    """(B, 1, L, L) boolean mask: query t may attend key j iff j <= t and item j is not padding.

    With right padding, a padded query row (t >= length) still sees the valid prefix, so its
    output is finite and never depends on positions after it.
    """
    length = item_seq.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=item_seq.device).tril()
    key_valid = (item_seq > 0)[:, None, None, :]
    return causal[None, None] & key_valid


class MultiHeadAttention(nn.Module):
    """Multi-head attention over SDPA; queries and keys/values may come from different streams."""

    def __init__(self, hidden_size, n_heads, attn_dropout_prob):
        super().__init__()
        if hidden_size % n_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of n_heads ({n_heads})"
            )
        self.n_heads = n_heads
        self.head_dim = hidden_size // n_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout_prob = attn_dropout_prob

    def _split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key_value, mask):
        q, k, v = self._split(self.q(query)), self._split(self.k(key_value)), self._split(self.v(key_value))
        h = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout_prob if self.training else 0.0
        )
        b, _, n, _ = h.shape
        return self.out(h.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, hidden_size, inner_size, hidden_act="gelu"):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {hidden_act!r}")
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner_size), ACTIVATIONS[hidden_act](), nn.Linear(inner_size, hidden_size)
        )

    def forward(self, x):
        return self.net(x)


class ReZeroScale(nn.Module):
    """Learnable scalar on a residual branch (ReZero); identity when disabled."""

    def __init__(self, enabled, init_value):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init_value))) if enabled else None

    def forward(self, x):
        return x if self.alpha is None else self.alpha * x


class AttentionBlock(nn.Module):
    """Post-LN Transformer block; self-attention when ``key_value is None``, else cross-attention.

    ``h <- LN(h + Drop(a1 * MHA(h, kv, kv; mask)))``, ``h <- LN(h + Drop(a2 * FFN(h)))``.
    """

    def __init__(self, hidden_size, n_heads, inner_size, hidden_dropout_prob, attn_dropout_prob,
                 hidden_act="gelu", layer_norm_eps=1e-12, rezero=False, rezero_init=1e-8):
        super().__init__()
        self.attn = MultiHeadAttention(hidden_size, n_heads, attn_dropout_prob)
        self.ffn = FeedForward(hidden_size, inner_size, hidden_act)
        self.scale_attn = ReZeroScale(rezero, rezero_init)
        self.scale_ffn = ReZeroScale(rezero, rezero_init)
        self.ln1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ln2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.drop1 = nn.Dropout(hidden_dropout_prob)
        self.drop2 = nn.Dropout(hidden_dropout_prob)

    def forward(self, h, mask, key_value=None):
        kv = h if key_value is None else key_value
        h = self.ln1(h + self.drop1(self.scale_attn(self.attn(h, kv, mask))))
        return self.ln2(h + self.drop2(self.scale_ffn(self.ffn(h))))


class AttentionStack(nn.Module):
    """``n_layers`` :class:`AttentionBlock` s; in cross mode every layer reads the same keys/values.

    ``checkpoint`` (set by :func:`set_activation_checkpointing`): in training each block keeps only
    its input and is recomputed in backward (``torch.utils.checkpoint``, with the dropout RNG state
    replayed): the same outputs and gradients, a fraction of the activation memory, about one
    more forward pass of time."""

    checkpoint = False

    def __init__(self, n_layers, **block_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(AttentionBlock(**block_kwargs) for _ in range(n_layers))

    def forward(self, h, mask, key_value=None):
        recompute = self.checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                from torch.utils.checkpoint import checkpoint

                h = checkpoint(layer, h, mask, key_value, use_reentrant=False)
            else:
                h = layer(h, mask, key_value)
        return h


def set_activation_checkpointing(model, enabled):
    """Turn block-wise activation checkpointing on or off for every :class:`AttentionStack` of
    ``model`` (config ``activation_checkpointing``); returns how many stacks it set."""
    stacks = [m for m in model.modules() if isinstance(m, AttentionStack)]
    for stack in stacks:
        stack.checkpoint = bool(enabled)
    return len(stacks)


class ElementwiseGate(nn.Module):
    """``g = sigmoid(W [x; y] + b)``, output ``g * x + (1 - g) * y`` (per position, per channel)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.proj = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x, y):
        g = torch.sigmoid(self.proj(torch.cat([x, y], dim=-1)))
        return g * x + (1.0 - g) * y


def _table_digest(weight):
    import hashlib

    # hashed in place (no .tobytes() copy: a table may be a 1.5 GB memory map shared by processes)
    digest = hashlib.sha256(weight.detach().cpu().contiguous().numpy()).digest()
    return torch.tensor(list(digest), dtype=torch.uint8)


def keep_out_of_checkpoints(embedding):
    """A frozen feature table (``nn.Embedding``) stays out of ``state_dict``: its 32-byte sha256
    (``<prefix>sha256``) goes in instead, so checkpoints do not carry the tables (1.5 GB at 1M items
    with 384-d text) and loading one against other features fails with a clear error. A checkpoint
    written before (with the table itself) still loads."""
    def save(module, state_dict, prefix, local_metadata):
        if module.weight.requires_grad:
            return  # trained tables are state
        state_dict.pop(prefix + "weight", None)
        if getattr(module, "_table_sha256", None) is None:
            module._table_sha256 = _table_digest(module.weight)
        state_dict[prefix + "sha256"] = module._table_sha256.clone()

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        stored = state_dict.pop(prefix + "sha256", None)
        if stored is None:
            return
        if getattr(module, "_table_sha256", None) is None:
            module._table_sha256 = _table_digest(module.weight)
        if not torch.equal(stored.to(torch.uint8).cpu(), module._table_sha256):
            error_msgs.append(f"{prefix}weight: the checkpoint was trained on other item features than this "
                              f"dataset's (sha256 of the aligned table differs); re-extract the same features or "
                              f"train afresh")
        state_dict[prefix + "weight"] = module.weight  # the table this model already holds

    embedding.register_state_dict_post_hook(save)
    embedding.register_load_state_dict_pre_hook(load)
    return embedding


MISSING_MODALITY = ("zero", "learned", "id")


def missing_modality_setting(config, model_name):
    """The validated ``missing_modality`` of ``config`` (``properties/overall.yaml``)."""
    mode = config["missing_modality"]
    mode = "zero" if mode is None else str(mode)
    if mode not in MISSING_MODALITY:
        raise ValueError(f"{model_name}: missing_modality must be one of {MISSING_MODALITY}, got {mode!r}")
    return mode


def dataset_missing_masks(dataset, names, model_name):
    """``name -> bool (n_items,)``: True for the items whose feature ``name`` has no content, from
    the dataset's own ``mm_missing`` (aligned to internal item ids), with PAD (item 0) False."""
    found = getattr(dataset, "mm_missing", None) or {}
    absent = [n for n in names if n not in found]
    if absent:
        raise KeyError(f"{model_name}: missing_modality needs the dataset's missing-content masks of {absent} "
                       f"(MultiModalSequentialDataset.mm_missing); it has {sorted(found)}")
    masks = {}
    for n in names:
        mask = torch.as_tensor(found[n]).to(torch.bool).reshape(-1).clone()
        if mask.numel() > 0:
            mask[0] = False  # PAD is not an item without content: it keeps its own (zero) treatment
        masks[n] = mask
    return masks


class MissingContent(nn.Module):
    """What stands in for the projected content of items whose feature is missing (``missing_modality``).

    ``masks``: feature name -> bool (n_items,) (:func:`dataset_missing_masks`), kept as
    non-persistent buffers (rebuilt from the dataset, never in checkpoints). ``mode``:

    * ``learned``: one trainable vector (``hidden_size``) per feature, used for every item without
      that content; its gradient comes only from such items;
    * ``id``: one trainable vector per item without that content (rows only for those items, in
      item-id order; ``row_<name>`` maps an item id to its row, -1 for items with content), so
      image-less items stay distinguishable in a model without IDs.

    :meth:`replace` swaps the projected vectors of missing items (``torch.where``: projections of
    items with content are untouched and the projection gets no gradient from missing items).
    Parameters start at zero without drawing random numbers (the other weights of a model are the
    same as with ``zero`` under one seed); models draw them with :meth:`reset_parameters` at the
    end of ``__init__``.
    """

    def __init__(self, masks, hidden_size, mode):
        super().__init__()
        if mode not in MISSING_MODALITY[1:]:
            raise ValueError(f"MissingContent mode must be one of {MISSING_MODALITY[1:]}, got {mode!r}")
        self.mode = mode
        self.names = list(masks)
        self.vectors = nn.ParameterDict()
        for n, mask in masks.items():
            mask = torch.as_tensor(mask, dtype=torch.bool)
            self.register_buffer(f"mask_{n}", mask, persistent=False)
            if mode == "learned":
                self.vectors[n] = nn.Parameter(torch.zeros(hidden_size))
            elif bool(mask.any()):
                rows = torch.full(mask.shape, -1, dtype=torch.int32)
                rows[mask] = torch.arange(int(mask.sum()), dtype=torch.int32)
                self.register_buffer(f"row_{n}", rows, persistent=False)
                self.vectors[n] = nn.Parameter(torch.zeros(int(mask.sum()), hidden_size))
            # id with no missing item: nothing to learn, no (unused) parameter

    def reset_parameters(self, init_fn):
        """Draw every replacement vector with ``init_fn(tensor)`` (in place)."""
        with torch.no_grad():
            for p in self.vectors.values():
                init_fn(p)

    def counts(self):
        """Feature name -> number of items without that content."""
        return {n: int(self.get_buffer(f"mask_{n}").sum()) for n in self.names}

    def replace(self, name, item_ids, z):
        """``z`` (*item_ids.shape, d), the projected content of ``item_ids``, with the rows of items
        lacking feature ``name`` replaced."""
        if name not in self.vectors:
            return z
        miss = self.get_buffer(f"mask_{name}")[item_ids].unsqueeze(-1)
        if self.mode == "learned":
            sub = self.vectors[name].to(z.dtype).expand_as(z)
        else:
            rows = self.get_buffer(f"row_{name}")[item_ids].clamp_min(0)
            sub = F.embedding(rows, self.vectors[name]).to(z.dtype)
        return torch.where(miss, sub, z)


class ContentProjector(nn.Module):
    """Projects one or more item-feature matrices (text, image) to ``hidden_size`` and sums them.

    The frozen feature tables are held as frozen ``nn.Embedding`` s (parameters with
    ``requires_grad=False``), never as buffers: DDP would re-broadcast buffers every step. They
    are left out of checkpoints (:func:`keep_out_of_checkpoints`).

    ``missing_modality`` (``zero`` | ``learned`` | ``id``) with ``missing`` (name -> bool mask,
    :func:`dataset_missing_masks`): ``zero`` projects an item's zero feature row like any other
    (every item without that content gets the same vector: the projection's bias); otherwise a
    :class:`MissingContent` replaces the projection of each missing modality of such items (with
    two modalities only the missing one is replaced).
    """

    def __init__(self, tables, hidden_size, dropout_prob=0.0, missing=None, missing_modality="zero"):
        super().__init__()
        self.names = list(tables)
        self.tables = nn.ModuleDict({
            n: keep_out_of_checkpoints(nn.Embedding.from_pretrained(t.float(), freeze=True, padding_idx=0))
            for n, t in tables.items()})
        self.proj = nn.ModuleDict({n: nn.Linear(t.shape[1], hidden_size) for n, t in tables.items()})
        self.dropout = nn.Dropout(dropout_prob)
        if missing_modality not in MISSING_MODALITY:
            raise ValueError(f"missing_modality must be one of {MISSING_MODALITY}, got {missing_modality!r}")
        if missing_modality == "zero":
            self.missing = None
        else:
            if missing is None or any(n not in missing for n in self.names):
                raise ValueError(f"missing_modality: {missing_modality} needs a missing mask for every feature "
                                 f"{self.names}")
            self.missing = MissingContent({n: missing[n] for n in self.names}, hidden_size, missing_modality)

    def raw_dims(self):
        return {n: self.tables[n].embedding_dim for n in self.names}

    def project(self, features, item_ids=None):
        """``features``: name -> (..., dim) raw features of ``item_ids``; returns (..., hidden_size).
        Without ``item_ids`` no missing-content replacement happens."""
        out = None
        for n in self.names:
            z = self.proj[n](self.dropout(features[n]))
            if self.missing is not None and item_ids is not None:
                z = self.missing.replace(n, item_ids, z)
            out = z if out is None else out + z
        return out

    def forward(self, item_ids):
        return self.project({n: self.tables[n](item_ids) for n in self.names}, item_ids)

    @torch.no_grad()
    def match_missing_scale(self, sample=4096):
        """Rescale the ``learned`` / ``id`` missing-content vectors of each feature to the root mean
        square of the projected content they stand in for (the projections of up to ``sample`` items
        that have it), keeping their drawn directions. Drawn at an embedding's small scale next to
        projected content an order of magnitude larger, they stay near zero in training, and a
        content-only model then ranks items without that content in the middle of every list
        (docs/notes/2026-12-04.md, "Images on a real catalogue"). Uses no random numbers."""
        if self.missing is None:
            return
        for n in self.names:
            if n not in self.missing.vectors:
                continue
            have = torch.nonzero(~self.missing.get_buffer(f"mask_{n}")).flatten()
            have = have[have > 0][:sample]
            if have.numel() == 0:
                continue
            target = self.proj[n](self.tables[n](have)).pow(2).mean().sqrt()
            vectors = self.missing.vectors[n]
            vectors.mul_(target / vectors.pow(2).mean().sqrt().clamp_min(1e-12))


def checkpointed_sum(fn, chunk, sliced, fixed=()):
    """``fn(*[t[part] for t in sliced], *fixed)`` summed over parts of ``chunk`` rows (dim 0 of every
    ``sliced`` tensor), each part recomputed in backward (``torch.utils.checkpoint``): peak memory is
    one part's intermediates. ``fn`` must return a sum over its rows."""
    from torch.utils.checkpoint import checkpoint

    total = sliced[0].new_zeros(())
    for start in range(0, sliced[0].size(0), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(fn, *(t[part] for t in sliced), *fixed, use_reentrant=False)
    return total


def _ce_sum(hidden, labels, weight, bias):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_cross_entropy(hidden, weight, labels, bias=None, memory_mb=None):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` (rows x n_items logits) against ``labels``.

    With ``memory_mb`` the rows go in chunks whose logits take at most that much (float32, with
    their softmax and gradient: 3 copies), each recomputed in backward (:func:`checkpointed_sum`):
    peak memory is independent of rows x n_items and the loss and gradients equal the one-shot
    computation up to float summation order. Without it, or when everything fits, it is the
    one-shot ``F.cross_entropy``.
    """
    rows, n_items = hidden.size(0), weight.size(0)
    chunk = rows if not memory_mb else max(1, int(memory_mb * 2 ** 20 // (3 * 4 * n_items)))
    if chunk >= rows:
        return _ce_sum(hidden, labels, weight, bias) / max(rows, 1)
    return checkpointed_sum(_ce_sum, chunk, (hidden, labels), (weight, bias)) / rows


def gather_positions(output, index):
    """``output`` (B, L, d) at ``index`` (B,) -> (B, d)."""
    return output[torch.arange(output.size(0), device=output.device), index]


def _process_group():
    """``torch.distributed`` when a process group of more than one rank is running, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts). Backward: every rank's gradient
    of the gathered tensor is summed (all-reduce) and each rank keeps the slice of its own rows, so
    a loss one rank computes against the gathered rows trains the rows of every rank."""

    @staticmethod
    def forward(ctx, x, sizes, rank):
        dist = _process_group()
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.size(0)] = x
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _process_group().all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x, differentiable=False):
    """``(rows of every DDP rank concatenated, offset of this rank's rows)``; ``(x, 0)`` without DDP.

    ``differentiable=True``: gradients reach every rank's rows (:class:`_GatherRows`); otherwise the
    result is a constant (labels, ids). For contrastive losses computed as this rank's rows
    against the gathered columns (:func:`contrastive_scale`).
    """
    dist = _process_group()
    if dist is None:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.size(0)], device=x.device))
    sizes = [int(n.item()) for n in sizes]
    rank = dist.get_rank()
    if differentiable and torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, sizes, rank), sum(sizes[:rank])
    with torch.no_grad():
        return _GatherRows.forward(type("ctx", (), {})(), x.detach(), sizes, rank), sum(sizes[:rank])


def contrastive_scale(n_global_rows):
    """Factor that turns a rank's summed per-row losses into its share of the global mean such that
    DDP's gradient average equals the gradient of the global mean: world_size / global rows
    (1 / rows without DDP)."""
    dist = _process_group()
    world = dist.get_world_size() if dist is not None else 1
    return world / max(int(n_global_rows), 1)


COLD_ITEM_RULES = ("content_ridge", "content_knn", "mean")


class ContentRidge:
    """The content-to-table map of :class:`ColdRows`' ``content_ridge`` rule.

    ``features``: the model's content features, a list of (n_items, D_i) tensors (the dataset's
    frozen, aligned tables, referenced, not copied; missing-content indicator columns may be among
    them). A table ``T`` (n_items, k) is regressed on the warm items' centred features,
    ``T_w = mean(T_w) + (X_w - mean(X_w)) W`` with ridge penalty ``lam``, and a cold item's row is
    ``mean(T_w) + (x - mean(X_w)) W``. ``lam`` is chosen per table by generalised cross-validation
    (GCV) over a log grid, all in the D-dimensional eigenbasis of the warm features' scatter matrix
    (computed once here), so a fit costs one pass over the tables (X_w^T T_w) plus D x D x k. As
    ``lam`` grows the rule tends to the ``mean`` rule. Float64 on the CPU.
    """

    GRID = tuple(10.0 ** (e / 2) for e in range(-8, 7))  # lam / (trace(G) / D)
    CHUNK = 65536

    def __init__(self, features, warm, cold):
        self.features = [f.detach() for f in features]
        self.warm = warm.detach().cpu()
        self.n_warm = int(self.warm.sum())
        dim = sum(int(f.shape[1]) for f in self.features)
        total = torch.zeros(dim, dtype=torch.float64)
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        for rows, x in self._warm_chunks():
            total += x.sum(0)
            gram += x.t() @ x
        self.mean = total / max(self.n_warm, 1)
        gram -= self.n_warm * torch.outer(self.mean, self.mean)
        self.eigvals, self.eigvecs = torch.linalg.eigh(gram)
        self.eigvals = self.eigvals.clamp_min(0.0)
        self.scale = float(self.eigvals.sum()) / max(dim, 1) or 1.0
        cold_ids = torch.nonzero(cold.cpu()).flatten()
        self.x_cold = self._rows(cold_ids) - self.mean  # (n_cold, D) float64
        self.last = {}

    def _rows(self, ids):
        return torch.cat([f[ids].double() for f in self.features], dim=1)

    def _warm_chunks(self):
        ids = torch.nonzero(self.warm).flatten()
        for start in range(0, ids.numel(), self.CHUNK):
            rows = ids[start:start + self.CHUNK]
            yield rows, self._rows(rows)

    def predict(self, table):
        """The cold items' rows of ``table`` (n_items, ...) by the fitted map, float64 (n_cold, k)."""
        t = table.detach().reshape(table.shape[0], -1)
        k = t.shape[1]
        cross = torch.zeros(self.mean.numel(), k, dtype=torch.float64)
        t_sum = torch.zeros(k, dtype=torch.float64)
        t_sq = torch.zeros((), dtype=torch.float64)
        for rows, x in self._warm_chunks():
            y = t[rows.to(t.device)].to("cpu", torch.float64)
            cross += x.t() @ y
            t_sum += y.sum(0)
            t_sq += y.pow(2).sum()
        n = max(self.n_warm, 1)
        t_mean = t_sum / n
        cross -= torch.outer(self.mean * n, t_mean)  # X~^T T~ = X^T T - n mu_x mu_t^T
        rss0 = float(t_sq - n * t_mean.pow(2).sum())  # |T~|^2
        z = self.eigvecs.t() @ cross  # (D, k)
        z2 = z.pow(2).sum(1)  # (D,)
        s = self.eigvals
        best = None
        for c in self.GRID:
            lam = c * self.scale
            df = float((s / (s + lam)).sum())
            rss = rss0 - float((z2 * (s + 2 * lam) / (s + lam).pow(2)).sum())
            gcv = max(rss, 0.0) / max(n - df, 1e-9) ** 2
            if best is None or gcv < best[0]:
                best = (gcv, lam, df, rss)
        _, lam, df, rss = best
        weight = self.eigvecs @ (z / (s + lam)[:, None])  # (D, k)
        self.last = {"lambda": lam, "df": df, "r2": (1.0 - rss / rss0) if rss0 > 0 else float("nan")}
        return t_mean + self.x_cold @ weight


class ContentNeighbours:
    """The content-to-table map of :class:`ColdRows`' ``content_knn`` rule: a cold item's row is the
    mean of the rows of its ``k`` nearest warm items by content (cosine of the centred features,
    each feature block scaled to unit mean norm first so no modality dominates by its scale). The
    neighbours are found once (float32, the warm rows built once); unlike the ridge map the rows keep
    a trained row's scale (``k = 1``: a warm item's own row and bias), so cold items compete with warm
    ones for the top of a ranking."""

    CHUNK = 4096

    def __init__(self, features, warm, cold, k=1):
        self.k = max(1, int(k))
        warm_ids = torch.nonzero(warm.cpu()).flatten()
        cold_ids = torch.nonzero(cold.cpu()).flatten()

        def rows(ids):  # centred, each block scaled to unit mean norm, unit rows (float32)
            return F.normalize(torch.cat([(f.detach()[ids].float() - m) / s for f, m, s in stats], dim=1), dim=1)

        stats = []
        for f in features:
            warm_rows = f.detach()[warm_ids].float()
            mean = warm_rows.mean(0)
            stats.append((f, mean, (warm_rows - mean).norm(dim=1).mean().clamp_min(1e-12)))
            del warm_rows
        warm_x = rows(warm_ids).t()  # (D, n_warm), built once
        k = min(self.k, warm_ids.numel())
        best = []
        for start in range(0, cold_ids.numel(), self.CHUNK):
            sim = rows(cold_ids[start:start + self.CHUNK]) @ warm_x
            best.append(sim.topk(k, dim=1).indices)
        self.neighbours = warm_ids[torch.cat(best)] if best else torch.zeros(0, k, dtype=torch.long)
        self.last = {"k": k}

    def predict(self, table):
        t = table.detach().reshape(table.shape[0], -1)
        return t[self.neighbours.to(t.device)].double().mean(1).cpu()


class ColdRows(nn.Module):
    """The cold-item rule (:mod:`recbole_mm.data.cold`) for any per-item table ``(n_items, ...)``
    (ID embeddings, a linear classifier's weight rows and bias): the rows of cold items (held out
    of training) are replaced, detached, so a cold item's own row never receives a gradient.

    * ``content_ridge`` (with ``features``, at evaluation): the rows a ridge regression from the
      items' content features to the table, fitted on the warm items, predicts for the cold items'
      content (:class:`ContentRidge`; cached until the table changes), so cold items are scored
      from what they show, each differently;
    * ``content_knn`` (with ``features``, at evaluation): the mean row of the ``k`` warm items most
      similar in content (:class:`ContentNeighbours`);
    * ``mean`` (without features, and always in training): the mean of the warm items' rows (PAD
      excluded), every cold item the same. Training never ranks cold items (they are out of the
      training softmax, :class:`~recbole_mm.model.softmax.CatalogueSoftmax`), so the cheap rule
      there changes no loss.

    Non-persistent buffers: no checkpoint key."""

    def __init__(self, cold_items, features=None, rule="content_ridge", neighbours=1):
        super().__init__()
        cold = torch.as_tensor(cold_items, dtype=torch.bool).clone()
        cold[0] = False
        warm = ~cold
        warm[0] = False
        index = torch.full((cold.numel(),), -1, dtype=torch.long)
        index[cold] = torch.arange(int(cold.sum()))
        self.register_buffer("cold", cold, persistent=False)
        self.register_buffer("warm", warm, persistent=False)
        self.register_buffer("cold_index", index, persistent=False)
        # the map from content to a table's cold rows (predict(table) -> (n_cold, k) float64), or None
        # for the mean rule
        if not features or rule == "mean":
            self.content_map = None
        elif rule == "content_knn":
            self.content_map = ContentNeighbours(features, warm, cold, neighbours)
        else:
            self.content_map = ContentRidge(features, warm, cold)
        self._cache = {}

    @property
    def rule(self):
        if self.content_map is None:
            return "mean"
        return "content_knn" if isinstance(self.content_map, ContentNeighbours) else "content_ridge"

    def mean_row(self, table):
        return table.detach()[self.warm].mean(0)

    def _content_rows(self, table):
        # _version catches optimizer steps and in-place ops; a sum over a sample of rows also catches
        # writes that do not bump it (a fused optimizer, .data writes)
        probe = float(table.detach()[:: max(1, table.shape[0] // 64)].double().sum())
        key = (table.data_ptr(), table._version, tuple(table.shape), table.dtype, table.device, probe)
        hit = self._cache.get(id(table))
        if hit is None or hit[0] != key:
            rows = self.content_map.predict(table).to(table.device, table.dtype)
            rows = rows.reshape((-1,) + tuple(table.shape[1:]))
            hit = (key, rows)
            self._cache[id(table)] = hit
        return hit[1]

    def forward(self, table):
        """``table`` with its cold rows replaced."""
        if self.content_map is None or self.training:
            mask = self.cold.view((-1,) + (1,) * (table.dim() - 1))
            return torch.where(mask, self.mean_row(table).to(table.dtype), table)
        return torch.index_put(table, (torch.nonzero(self.cold).flatten(),), self._content_rows(table))

    def rows(self, table, ids, looked_up):
        """``looked_up`` (= ``table[ids]``) with the cold ids' rows replaced."""
        mask = self.cold[ids]
        if not bool(mask.any()):  # no cold id: nothing to replace (no pass over the table)
            return looked_up
        mask = mask.view(tuple(ids.shape) + (1,) * (looked_up.dim() - ids.dim()))
        if self.content_map is None or self.training:
            return torch.where(mask, self.mean_row(table).to(looked_up.dtype), looked_up)
        repl = self._content_rows(table)[self.cold_index[ids].clamp_min(0)]
        return torch.where(mask, repl.to(looked_up.dtype), looked_up)


def _config_value(dataset, key):
    config = getattr(dataset, "config", None)
    try:
        return None if config is None else config[key]
    except (KeyError, TypeError):
        return None


def cold_item_rule(dataset):
    """``(rule, neighbours)`` of ``dataset``'s config (``cold_item_rule``, ``cold_item_neighbours``), checked."""
    rule = _config_value(dataset, "cold_item_rule") or "content_ridge"
    if rule not in COLD_ITEM_RULES:
        raise ValueError(f"cold_item_rule must be one of {COLD_ITEM_RULES}, got {rule!r}")
    k = _config_value(dataset, "cold_item_neighbours")
    k = 1 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"cold_item_neighbours must be an integer >= 1, got {k!r}")
    return rule, k


def cold_item_features(dataset, names):
    """The content features the content cold-item rules map from: the dataset's tables of ``names``
    (those it has) and, per feature with a missing-content mask, an indicator column (``content_ridge``
    only); None under ``cold_item_rule: mean`` or when the dataset has none of them."""
    rule, _ = cold_item_rule(dataset)
    if rule == "mean":
        return None
    tables = getattr(dataset, "mm_features", None) or {}
    missing = getattr(dataset, "mm_missing", None) or {}
    out = []
    for name in names or ():
        if name in tables:
            out.append(torch.as_tensor(tables[name]))
            if name in missing and rule == "content_ridge":
                out.append(torch.as_tensor(missing[name]).reshape(-1, 1).float())
    return out or None


def cold_rows(dataset, features=None):
    """A :class:`ColdRows` for ``dataset``'s cold items (``dataset.cold_items``), or None without any.
    ``features``: the feature names the model reads (its content), for the ``content_ridge`` rule."""
    cold = getattr(dataset, "cold_items", None)
    if cold is None:
        return None
    cold = torch.as_tensor(cold, dtype=torch.bool)
    if not bool(cold[1:].any()):
        return None
    rule, k = cold_item_rule(dataset)
    return ColdRows(cold, cold_item_features(dataset, features), rule=rule, neighbours=k)


class ItemIDEmbedding(nn.Embedding):
    """An item-ID table with the cold-item rule (:class:`ColdRows`) applied wherever it is read:
    lookups (``forward``) and the whole table (:func:`id_table`). Shares the weight of the
    ``nn.Embedding`` it replaces (:func:`with_cold_items`), so checkpoints keep
    ``item_embedding.weight`` as before."""

    def __init__(self, embedding, rule):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                         _weight=embedding.weight.data, _freeze=not embedding.weight.requires_grad,
                         sparse=embedding.sparse)
        self.cold_rule = rule.to(embedding.weight.device)

    def table(self):
        return self.cold_rule(self.weight)

    def forward(self, ids):
        return self.cold_rule.rows(self.weight, ids, super().forward(ids))


def with_cold_items(embedding, dataset, features=None):
    """``embedding`` (a model's item-ID ``nn.Embedding``) as an :class:`ItemIDEmbedding` sharing its
    weight when ``dataset`` has cold items (``dataset.cold_items``); unchanged otherwise.
    ``features``: the feature names the model reads (the ``content_ridge`` rule's inputs)."""
    rule = cold_rows(dataset, features)
    return embedding if rule is None else ItemIDEmbedding(embedding, rule)


def id_table(embedding):
    """The (n_items, d) ID table a model scores with (cold rows replaced for :class:`ItemIDEmbedding`)."""
    return embedding.table() if isinstance(embedding, ItemIDEmbedding) else embedding.weight


def xavier_init(module, bias_value=0.0, embedding_bound=None):
    """TSSR-style init: xavier-normal Linear weights with constant bias, uniform embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, bias_value)
    elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
        bound = embedding_bound or math.sqrt(1.0 / module.num_embeddings)
        nn.init.uniform_(module.weight, -bound, bound)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class LowRankAdapter(nn.Module):
    """Residual rank-``r`` bottleneck on activations: ``x + B(A x)`` (SICSRec's "LoRA" adapter).

    ``A`` (``down``, d -> r) is drawn from N(0, ``init_std``) and ``B`` (``up``, r -> d) starts at
    zero, so a fresh adapter is exactly the identity: inserting it into a pretrained network
    does not change the network's outputs until it has been trained.
    """

    def __init__(self, hidden_size, rank, init_std=0.02):
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.down = nn.Linear(hidden_size, int(rank), bias=False)
        self.up = nn.Linear(int(rank), hidden_size, bias=False)
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std=0.02):
        nn.init.normal_(self.down.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return x + self.up(self.down(x))


class ItemVectorSASRecMixin:
    """For subclasses of RecBole's ``SASRec`` whose item vectors come from ``self.item_vectors(ids)``
    (content, or content + ID) instead of ``item_embedding``: SASRec's input layer and Transformer
    over those vectors (ContentSASRec, IDContentSASRec, UniSRec)."""

    def sequence_output(self, item_seq):
        """Transformer output at every position, (B, L, hidden_size); position t sees items <= t."""
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        input_emb = self.item_vectors(item_seq) + self.position_embedding(position_ids)[None]
        input_emb = self.dropout(self.LayerNorm(input_emb))
        mask = self.get_attention_mask(item_seq)
        return self.trm_encoder(input_emb, mask, output_all_encoded_layers=True)[-1]

    def forward(self, item_seq, item_seq_len):
        """The sequence representation (B, hidden_size): the output at the last valid position."""
        return self.gather_indexes(self.sequence_output(item_seq), item_seq_len - 1)
