"""End-to-end content encoders for ``content_mode: finetune``.

A ``transformers`` text encoder sits in the graph with only its top ``k`` layers trainable.
Per batch, each unique item is encoded once (not B x L times); for BERT-like encoders
(``embeddings`` + ``encoder.layer``) the output of the frozen lower layers is computed once per
item and cached (:class:`BoundedRowCache`), so a step runs only the ``k`` trainable layers.

The cache is filled for items as batches bring them, never allocated for the whole catalogue:
``cache_mb`` bounds it (default 2048 MiB; at 64 tokens x 384 dims in float32 that is ~21,800
items) and ``cache_dtype: float16`` halves an item's share. Items that arrive once the budget is
spent are not cached: their lower layers are recomputed (under ``no_grad``) each time they occur,
which costs time, never memory; one log line says when that starts.
"""

import logging

import torch
import torch.nn as nn

from .cache import BoundedRowCache, encode_items

logger = logging.getLogger(__name__)


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _pool(hidden, mask, pooling, pooler=None):
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        if pooler is None:
            raise ValueError("pooling 'pooler' needs an encoder with a pooler layer; use 'mean' or 'cls'")
        return pooler(hidden)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class FinetuneTextEncoder(nn.Module):
    """Item text -> vector with a partly trainable ``transformers`` encoder.

    Args:
        encoder: a loaded ``transformers`` model (``AutoModel``).
        input_ids, attention_mask: (n_items, T) tokenised item texts aligned to internal ids.
        trainable_layers: how many top layers train (0 = fully frozen encoder).
        pooling: ``mean`` | ``cls`` | ``pooler``.
        unique_items: encode each unique item of a batch once (``False``: every position,
            padding included, as the original TSSR code does).
        cache_lower: cache the frozen lower layers' output per item (BERT-like encoders).
        cache_mb: the cache's budget in MiB (``None``: every item the batches bring).
        cache_dtype: ``float32`` (exact) or ``float16`` (half the memory per item).
        lora: None, or a dict for :func:`recbole_mm.encoders.lora.apply_lora`: the top
            ``trainable_layers`` layers get adapters and every encoder weight stays frozen.
    """

    def __init__(self, encoder, input_ids, attention_mask, trainable_layers=1, pooling="mean",
                 unique_items=True, cache_lower=True, cache_mb=2048, cache_dtype="float32", lora=None):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.unique_items = unique_items
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        layers = self._layers()
        n_layers = len(layers) if layers is not None else 0
        if trainable_layers < 0 or (layers is not None and trainable_layers > n_layers):
            raise ValueError(f"encoder_trainable_layers must be in [0, {n_layers}], got {trainable_layers}")
        self.trainable_layers = trainable_layers
        self.split_ok = layers is not None and hasattr(encoder, "embeddings")
        self.cache_lower = bool(cache_lower and self.split_ok)
        if layers is None and trainable_layers > 0:
            logger.warning("encoder layers not found: the whole encoder is trainable")
        for p in encoder.parameters():
            p.requires_grad = False
        if layers is not None:
            for layer in list(layers)[n_layers - trainable_layers:]:
                for p in layer.parameters():
                    p.requires_grad = True
        else:
            for p in encoder.parameters():
                p.requires_grad = trainable_layers > 0
        pooler = getattr(encoder, "pooler", None)
        if pooling == "pooler" and pooler is not None and trainable_layers > 0:
            for p in pooler.parameters():
                p.requires_grad = True
        self.lora_names = None
        if lora is not None:
            from .lora import apply_lora

            if layers is None or trainable_layers < 1:
                raise ValueError("LoRA on the text encoder needs its layer list and encoder_trainable_layers >= 1 "
                                 "(the layers that get adapters)")
            self.lora_names = apply_lora(encoder, list(layers)[n_layers - trainable_layers:], **lora)
        self.n_layers = n_layers
        self.out_dim = encoder.config.hidden_size
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"encoder cache dtype must be float32 or float16, got {cache_dtype!r}")
        self.cache = BoundedRowCache(
            input_ids.size(0), (input_ids.size(1), self.out_dim), budget_mb=cache_mb,
            dtype=getattr(torch, cache_dtype), name="encoder lower-layer cache")

    def encoder_parameters(self):
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def _layers(self):
        for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
            obj = self.encoder
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, nn.ModuleList):
                return obj
        return None

    def train(self, mode=True):
        super().train(mode)
        # frozen statistics and no dropout in the frozen lower part: the cache stays valid
        if self.trainable_layers == 0:
            self.encoder.eval()
        return self

    def _extended_mask(self, mask, dtype):
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def _frozen_states(self, ids, mask, n_layers):
        """The embeddings' output and each of the first ``n_layers`` layers' outputs, in eval mode
        under no_grad (the frozen part's computation)."""
        with torch.no_grad():
            was_training = self.encoder.training
            self.encoder.eval()
            try:
                states = [self.encoder.embeddings(input_ids=ids)]
                ext = self._extended_mask(mask, states[0].dtype)
                for layer in self._layers()[:n_layers]:
                    states.append(_layer_output(layer(states[-1], ext)))
            finally:
                self.encoder.train(was_training)
        return states

    def _lower(self, ids, mask):
        """Frozen part: embeddings + the lower ``n - k`` layers, under no_grad."""
        return self._frozen_states(ids, mask, self.n_layers - self.trainable_layers)[-1]

    def _encode_rows(self, rows):
        device = next(self.encoder.parameters()).device
        ids = self.input_ids[rows.cpu()].to(device)
        mask = self.attention_mask[rows.cpu()].to(device)
        if not self.split_ok:
            out = self.encoder(input_ids=ids, attention_mask=mask)
            return _pool(out.last_hidden_state, mask, self.pooling, getattr(self.encoder, "pooler", None))
        if self.cache_lower:
            h = self.cache.get(rows.to(device), lambda todo: self._lower(
                self.input_ids[todo.cpu()].to(device), self.attention_mask[todo.cpu()].to(device)))
        else:
            h = self._lower(ids, mask)
        ext = self._extended_mask(mask, h.dtype)
        for layer in self._layers()[self.n_layers - self.trainable_layers:]:
            h = _layer_output(layer(h, ext))
        return _pool(h, mask, self.pooling, getattr(self.encoder, "pooler", None))

    # ------------------------------------------------------------------ side adapter taps
    def n_rows(self):
        return self.input_ids.size(0)

    def has_content(self, rows):
        return torch.ones(rows.shape, dtype=torch.bool, device=rows.device)

    def tap_dims(self):
        """Widths of :meth:`taps`: the embeddings and every layer but the last, then the output (an
        encoder whose layer list is not known: as many as its ``hidden_states``, probed on one item)."""
        if self.split_ok:
            return [self.out_dim] * (self.n_layers + 1)
        return [self.out_dim] * (self.taps(torch.zeros(1, dtype=torch.long)).shape[-1] // self.out_dim)

    @torch.no_grad()
    def taps(self, rows):
        """(len(rows), sum(tap_dims)) for :class:`~recbole_mm.encoders.side.SideAdapterEncoder`: the
        frozen encoder's pooled states (embeddings, each layer but the last) and its pooled output."""
        device = next(self.encoder.parameters()).device
        ids, mask = self.input_ids[rows.cpu()].to(device), self.attention_mask[rows.cpu()].to(device)
        if self.split_ok:
            states = self._frozen_states(ids, mask, self.n_layers)
        else:
            was = self.encoder.training
            self.encoder.eval()
            try:
                hidden = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            finally:
                self.encoder.train(was)
            if not hidden or hidden[-1].shape[-1] != self.out_dim:
                raise ValueError(f"encoder_peft: side needs the text encoder's hidden states at every depth; "
                                 f"{type(self.encoder).__name__} gives none of its hidden size: use encoder_peft: "
                                 "lora or ~")
            states = list(hidden)
        # the inner states by their (masked) mean: their first token is the same for every item
        inner = [_pool(h, mask, "mean") for h in states[:-1]]
        return torch.cat(inner + [_pool(states[-1], mask, self.pooling, getattr(self.encoder, "pooler", None))], -1)

    def forward(self, item_ids):
        """``item_ids`` of any shape -> (*item_ids.shape, hidden) item text vectors."""
        return encode_items(item_ids, self._encode_rows, self.unique_items)


def load_text_encoder(name_or_path):
    """``AutoModel`` + ``AutoTokenizer`` from a hub name or local folder ('default' = offline MiniLM)."""
    from transformers import AutoModel, AutoTokenizer

    from recbole_mm.features.encoders import resolve_encoder

    path = resolve_encoder(name_or_path)
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
