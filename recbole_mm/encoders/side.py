"""A side adapter on cached hidden states (IISAN-style, ``encoder_peft: side``).

The encoder stays wholly frozen. Its hidden states at every depth (the embeddings / stem, each
layer / block, and its final pooled output: the "taps"), each pooled to one vector per item, are
computed once per item under ``no_grad`` and cached (:class:`~recbole_mm.encoders.cache.BoundedRowCache`,
``cache_mb``). A small side network of width ``r`` (``side_bottleneck``) trains on them: each tap
projected down to ``r`` (``P_l``), a stream ``s`` that starts from the first tap and, at each deeper
tap, mixes it in through a learned gate and an adapter ``A_l`` (``r -> r -> r``, GELU), and a layer
back up to the encoder's width::

    s_0 = P_0 t_0
    s_l = s_{l-1} + A_l(LN_l(g_l P_l t_l + (1 - g_l) s_{l-1})),  g_l = sigmoid(gate_l),  l = 1 .. L-1
    out = t_L + W_out s_{L-1}

so its size is ``r`` times the taps' widths plus ``2 r^2`` per depth plus ``r`` times the output width,
well under the top block's. ``t_L`` is the frozen encoder's own output (pooled as configured) and
``W_out`` starts at zero, so the
model starts equal to the frozen encoder and a step never runs the encoder again for a cached item:
no backward pass through the backbone, which is what makes side adapters cheap (Fu et al., IISAN,
SIGIR 2024). Simplification: the taps are pooled vectors (IISAN adapts token-level states).

Items without an image get a zero vector, as the other image encoders give them (a model's
``missing_modality`` decides what stands in for it).
"""

import torch
import torch.nn as nn

from .cache import BoundedRowCache, encode_items, zeros_in_graph


def pool_tap(h, pooling="mean", mask=None):
    """One vector per item from a hidden state: a feature map (B, C, H, W) by its spatial mean, a
    token sequence (B, T, D) by its first token (``cls`` / ``pooler``) or its (masked) mean, (B, D) as is."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 3:
        if pooling in ("cls", "pooler"):
            return h[:, 0]
        if mask is None:
            return h.mean(1)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    return h


class SideAdapterEncoder(nn.Module):
    """A frozen content encoder (:class:`~recbole_mm.encoders.text.FinetuneTextEncoder` or
    :class:`~recbole_mm.encoders.image.FinetuneImageEncoder` with no trainable layer) plus a side
    network on its cached per-depth pooled states.

    Args:
        base: the frozen encoder; it gives ``tap_dims()`` and ``taps(rows)`` -> (n, sum(tap_dims)).
        bottleneck: the side network's width ``r``.
        cache_mb / cache_dtype: the tap caches' budget and the inner taps' storage type (the frozen
            output is kept in float32; items beyond the budget have their taps recomputed each time
            they occur).
        unique_items: each distinct item of a batch once.
    """

    def __init__(self, base, bottleneck=64, cache_mb=2048, cache_dtype="float32", unique_items=True):
        super().__init__()
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"encoder cache dtype must be float32 or float16, got {cache_dtype!r}")
        if int(bottleneck) < 1:
            raise ValueError(f"side_bottleneck must be >= 1, got {bottleneck}")
        self.base = base
        for p in base.parameters():
            p.requires_grad = False
        self.dims = [int(d) for d in base.tap_dims()]
        if len(self.dims) < 2:
            raise ValueError("a side adapter needs the encoder's intermediate states and its output (2 taps or more)")
        d = self.out_dim = self.dims[-1]
        r = int(bottleneck)
        inner = self.dims[:-1]
        self.proj = nn.ModuleList(nn.Linear(k, r) for k in inner)
        self.norm = nn.ModuleList(nn.LayerNorm(r) for _ in inner[1:])
        self.down = nn.ModuleList(nn.Linear(r, r) for _ in inner[1:])
        self.up = nn.ModuleList(nn.Linear(r, r) for _ in inner[1:])
        # one gate per deeper tap (none with two taps: an unused parameter would break DDP's reduction)
        self.gate = nn.Parameter(torch.zeros(len(inner) - 1)) if len(inner) > 1 else None
        self.out = nn.Linear(r, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.unique_items = bool(unique_items)
        n_items = base.n_rows()
        # the inner taps in cache_dtype; the frozen output in float32, so the model starts (and, with
        # the output layer at zero, stays) exactly at the frozen encoder on cached items too. The budget
        # is shared in proportion to the bytes per item.
        inner_bytes = sum(inner) * (2 if cache_dtype == "float16" else 4)
        share = inner_bytes / (inner_bytes + 4 * d)
        mb = (lambda f: None if cache_mb is None else cache_mb * f)
        self.cache = BoundedRowCache(n_items, (sum(inner),), budget_mb=mb(share), dtype=getattr(torch, cache_dtype),
                                     name="side adapter tap cache")
        self.out_cache = BoundedRowCache(n_items, (d,), budget_mb=mb(1 - share), dtype=torch.float32,
                                         name="side adapter output cache")

    @property
    def encoder(self):  # the frozen backbone (TSSR keeps its weights out of its own init)
        return self.base.encoder

    def encoder_parameters(self):
        """None of the backbone's: the side network trains at the model's learning rate."""
        return []

    def owned_modules(self):
        """Modules whose initialisation is this module's own (the zero output layer included)."""
        return list(self.modules())

    def train(self, mode=True):
        super().train(mode)
        self.base.eval()  # the backbone is frozen: its dropout off, its statistics fixed
        return self

    def _side(self, inner, final):
        parts = torch.split(inner, self.dims[:-1], dim=-1)
        s = self.proj[0](parts[0])
        for i in range(1, len(parts)):
            g = torch.sigmoid(self.gate[i - 1])
            x = g * self.proj[i](parts[i]) + (1 - g) * s
            s = s + self.up[i - 1](torch.nn.functional.gelu(self.down[i - 1](self.norm[i - 1](x))))
        return final + self.out(s)

    def _taps(self, rows):
        """(inner taps, frozen output) of ``rows`` from the caches; the backbone runs once for the
        rows neither cache holds (both caches fill from that one run)."""
        width = sum(self.dims[:-1])
        ran = {}

        def compute(todo):
            ran["rows"], ran["taps"] = todo, self.base.taps(todo)
            return ran["taps"][:, :width]

        def compute_out(todo):
            if "rows" in ran and torch.equal(ran["rows"], todo):
                return ran["taps"][:, width:]
            return self.base.taps(todo)[:, width:]  # the two caches' budgets ran out at different rows

        return self.cache.get(rows, compute).float(), self.out_cache.get(rows, compute_out).float()

    def _encode_rows(self, rows):
        device = next(self.parameters()).device
        rows = rows.to(device)
        has = self.base.has_content(rows)
        out = torch.zeros(rows.size(0), self.out_dim, device=device)
        if not has.any():
            return zeros_in_graph(out, [p for p in self.parameters() if p.requires_grad], self.training)
        todo = rows[has]
        vec = self._side(*self._taps(todo))
        gone = ~self.base.has_content(todo)  # a file found unreadable while computing its taps
        if gone.any():
            vec = vec.masked_fill(gone[:, None], 0.0)
        out = out.to(vec.dtype)
        out[has] = vec
        return out

    def forward(self, item_ids):
        """``item_ids`` of any shape -> (*item_ids.shape, out_dim) item vectors."""
        return encode_items(item_ids, self._encode_rows, self.unique_items)
