"""SICSRec: self-supervised representation learning with ID-content modality alignment.

Reference: D. Zhou, W. Pan, Z. Ming. "Self-supervised representation learning with ID-Content
modality alignment for sequential recommendation", Frontiers of Computer Science 20(12), 2025
(arXiv 2510.10556). Specification: ``docs/SICSRec.md``.

Stage 1 (:mod:`recbole_mm.model.sicsrec.alignment`) aligns text/image encoders on mined item pairs and
exports item feature tables. Stage 2 is this module's :class:`SICSRec`, trained in two steps by
:class:`~recbole_mm.model.sicsrec.trainer.SICSRecTrainer`:

* **step 1** (:mod:`recbole_mm.model.sicsrec.id_pretraining`): an ID-only SASRec (RecBole's own
  ``SASRec``, CE loss) of the same width, trained once and saved under a deterministic path in
  ``checkpoint_dir`` (or loaded from ``pretrained_id_encoder``); a later run with the same data and
  step-1 settings reuses it;
* **step 2**: :class:`SICSRec` loads it, freezes the ID Transformer, inserts zero-initialised
  rank-``r`` adapters after its attention and feed-forward sublayers, and trains the content
  encoder, the ID->content cross-attention decoder and the fusion layer with
  ``L_rec + alpha * L_CACL + lambda * reg``.

Every deviation from the official code is a named switch in ``properties/model/SICSRec.yaml``;
the defaults are the corrected behaviour.
"""

from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder

from recbole_mm.model.layers import (
    AttentionStack,
    LowRankAdapter,
    MissingContent,
    causal_padding_mask,
    contrastive_scale,
    dataset_missing_masks,
    gather_positions,
    gather_rows,
    id_table,
    keep_out_of_checkpoints,
    missing_modality_setting,
    set_activation_checkpointing,
    with_cold_items,
)
from recbole_mm.model.softmax import CatalogueSoftmax
from recbole_mm.model.sicsrec.settings import base_feature_names, modalities, stage1_feature_names
from recbole_mm.registry import ModelSpec

_CHOICES = {
    "content_modality": ("text", "image", "both"),
    "cacl_duplicate_mask": ("neg_inf", "zero"),
    "reg_norm": ("frobenius", "squared"),
    "contrast_negatives": ("global", "local"),
}
_ADAPTER_POSITIONS = ("attn", "ffn")
_REQUIRED = ("hidden_size", "inner_size", "n_layers", "n_heads", "hidden_dropout_prob", "attn_dropout_prob",
             "hidden_act", "layer_norm_eps", "initializer_range", "adapter_rank", "tau", "alpha", "reg_weight")

# step-1 parameters, named exactly as in RecBole's SASRec (so a SASRec checkpoint loads as step 1)
ID_ENCODER_PREFIXES = ("item_embedding.", "position_embedding.", "LayerNorm.", "trm_encoder.")


# the model protocol (recbole_mm.registry, docs/ADDING_A_MODEL.md): its dataset runs stage 1 when the
# aligned features are missing; its trainer runs step 1 (an ID SASRec), which a finished SASRec run of
# the same settings can publish (publish_step1) into the run's share_dir; trim_safe: outputs unchanged
# when batches are cut to their longest history (tests/test_lazy.py)
MODEL_SPECS = (
    ModelSpec(name="SICSRec", model="recbole_mm.model.sicsrec.model:SICSRec", role="proposed", trim_safe=True,
              dataset="recbole_mm.model.sicsrec.dataset:SICSRecDataset",
              trainer="recbole_mm.model.sicsrec.trainer:SICSRecTrainer",
              features="recbole_mm.model.sicsrec.model:SICSRec.required_features",
              publishers=(("SASRec", "recbole_mm.model.sicsrec.id_pretraining:publish_step1"),),
              test_config={"stage1": False}),
)


class SICSRec(SequentialRecommender):
    r"""SICSRec stage 2 as a RecBole sequential recommender (trained by :class:`SICSRecTrainer`)."""

    @staticmethod
    def required_features(config):
        names = stage1_feature_names(config) if config["stage1"] else base_feature_names(config)
        return list(names.values())

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        missing = [k for k in _REQUIRED if config[k] is None]
        if missing:
            raise ValueError(f"SICSRec: missing config keys {missing} (defaults live in properties/model/SICSRec.yaml)")
        for key, allowed in _CHOICES.items():
            if config[key] not in allowed:
                raise ValueError(f"SICSRec: {key} must be one of {allowed}, got {config[key]!r}")
        positions = list(config["adapter_positions"])
        bad = [p for p in positions if p not in _ADAPTER_POSITIONS]
        if bad:
            raise ValueError(f"SICSRec: adapter_positions must be a subset of {_ADAPTER_POSITIONS}, got {positions}")

        # hyper-parameters
        self.hidden_size = config["hidden_size"]
        self.inner_size = config["inner_size"]
        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.n_decoder_layers = config["n_decoder_layers"] or self.n_layers  # ~ = n_layers
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.item_dropout_prob = config["item_dropout_prob"]
        self.hidden_act = config["hidden_act"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        self.adapter_rank = config["adapter_rank"]
        self.adapter_positions = positions
        self.tau = float(config["tau"])
        self.alpha = float(config["alpha"])
        self.reg_weight = float(config["reg_weight"])
        self.reg_norm = config["reg_norm"]
        self.cacl_duplicate_mask = config["cacl_duplicate_mask"]
        self.contrast_negatives = config["contrast_negatives"]
        self.decoder_chain_layers = bool(config["decoder_chain_layers"])
        self.predict_normalize_items = bool(config["predict_normalize_items"])
        self.content_tables_trainable = bool(config["content_tables_trainable"])
        self.id_embedding_trainable = bool(config["id_embedding_trainable"])
        self.sparse_table_updates = bool(config["sparse_table_updates"])
        if self.sparse_table_updates and config["clip_grad_norm"]:
            raise ValueError("SICSRec: sparse_table_updates cannot be combined with clip_grad_norm (RecBole clips "
                             "every parameter's gradient with a norm sparse gradients do not support); remove "
                             "clip_grad_norm or set sparse_table_updates: False")
        if self.sparse_table_updates and not config["single_spec"]:
            raise ValueError("SICSRec: sparse_table_updates is single-process only (RecBole's DDP step gives every "
                             "parameter a dense zero gradient, which SparseAdam refuses, and NCCL has no sparse "
                             "all-reduce); run without DDP or set sparse_table_updates: False")
        self.modalities = modalities(config)
        self.feature_names = dict(zip(self.modalities, self.required_features(config)))
        self.missing_modality = missing_modality_setting(config, "SICSRec")
        mlp_hidden = config["content_mlp_hidden"]
        d = self.hidden_size

        # step-1 ID encoder: RecBole SASRec's modules under SASRec's names (frozen Transformer)
        # sparse_table_updates: E is sparse only when no step reads it whole (softmax: sampled; the full
        # softmax scores every row, a dense gradient)
        self.sparse_id_table = (self.sparse_table_updates and self.id_embedding_trainable
                                and (config["softmax"]) == "sampled")
        self.item_embedding = nn.Embedding(self.n_items, d, padding_idx=0, sparse=self.sparse_id_table)
        self.position_embedding = nn.Embedding(self.max_seq_length, d)
        self.trm_encoder = TransformerEncoder(
            n_layers=self.n_layers, n_heads=self.n_heads, hidden_size=d, inner_size=self.inner_size,
            hidden_dropout_prob=self.hidden_dropout_prob, attn_dropout_prob=self.attn_dropout_prob,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
        )
        self.LayerNorm = nn.LayerNorm(d, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)
        self.adapter_attn = nn.ModuleList(LowRankAdapter(d, self.adapter_rank, self.initializer_range)
                                          for _ in range(self.n_layers)) if "attn" in positions else None
        self.adapter_ffn = nn.ModuleList(LowRankAdapter(d, self.adapter_rank, self.initializer_range)
                                         for _ in range(self.n_layers)) if "ffn" in positions else None

        # content stream: stage-1 tables (trainable copies), per-modality MLPs, Transformer
        tables, mlps = {}, {}
        for m in self.modalities:
            table = dataset.mm_features[self.feature_names[m]].float()
            # trainable: a copy of its own; frozen: the dataset's (memory-mapped, shared) table itself, not saved
            tables[m] = keep_out_of_checkpoints(nn.Embedding.from_pretrained(
                table.clone() if self.content_tables_trainable else table,
                freeze=not self.content_tables_trainable, padding_idx=0,
                sparse=self.sparse_table_updates and self.content_tables_trainable))
            hidden = int(mlp_hidden or max(1, table.shape[1] // 2))
            mlps[m] = nn.Sequential(nn.Linear(table.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.content_tables = nn.ModuleDict(tables)
        self.content_mlps = nn.ModuleDict(mlps)
        # items without a modality's content (missing_modality): their MLP output is replaced
        self.missing_content = None
        if self.missing_modality != "zero":
            masks = dataset_missing_masks(dataset, list(self.feature_names.values()), "SICSRec")
            self.missing_content = MissingContent(
                {m: masks[self.feature_names[m]] for m in self.modalities}, d, self.missing_modality)
        self.content_LayerNorm = nn.LayerNorm(d, eps=self.layer_norm_eps)
        self.content_dropout = nn.Dropout(self.hidden_dropout_prob)
        block = dict(hidden_size=d, n_heads=self.n_heads, inner_size=self.inner_size,
                     hidden_dropout_prob=self.hidden_dropout_prob, attn_dropout_prob=self.attn_dropout_prob,
                     hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps)
        self.content_encoder = AttentionStack(self.n_layers, **block)

        # mix-modality decoder: ID states attend to content states (cross-attention + FFN per layer)
        self.decoder_q_LayerNorm = nn.LayerNorm(d, eps=self.layer_norm_eps)
        self.decoder_kv_LayerNorm = nn.LayerNorm(d, eps=self.layer_norm_eps)
        self.decoder_dropout = nn.Dropout(self.hidden_dropout_prob)
        self.decoder = AttentionStack(self.n_decoder_layers, **block)

        # fusion and item-side dropout
        self.fusion = nn.Linear(3 * d, d)
        self.item_dropout = nn.Dropout(self.item_dropout_prob)
        self.softmax = CatalogueSoftmax(config, dataset, self.n_items, "SICSRec")
        set_activation_checkpointing(self, config["activation_checkpointing"])

        self._init_weights()
        # cold items (recbole_mm.data.cold): ID rows from the stage-1 content features (layers.ColdRows)
        self.item_embedding = with_cold_items(self.item_embedding, dataset, list(self.feature_names.values()))
        self.freeze_id_encoder()

    # ------------------------------------------------------------------ set-up
    def _init_weights(self):
        """SASRec's init (N(0, initializer_range), LayerNorm 1/0, zero biases) for every module
        except the stage-1 tables; adapters start as the identity."""
        skip = {id(m) for m in self.content_tables.modules()}
        for module in self.modules():
            if id(module) in skip:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data.normal_(mean=0.0, std=self.initializer_range)
            elif isinstance(module, nn.LayerNorm):
                module.bias.data.zero_()
                module.weight.data.fill_(1.0)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        for adapters in (self.adapter_attn, self.adapter_ffn):
            if adapters is not None:
                for adapter in adapters:
                    adapter.reset_parameters(self.initializer_range)
        if self.missing_content is not None:  # last: every other weight is as with missing_modality: zero
            self.missing_content.reset_parameters(lambda w: w.normal_(0.0, self.initializer_range))

    def freeze_id_encoder(self):
        """Step 2: the ID Transformer is frozen; the adapters train; E, positions and the input
        LayerNorm train unless ``id_embedding_trainable`` is False."""
        for p in self.trm_encoder.parameters():
            p.requires_grad = False
        for module in (self.item_embedding, self.position_embedding, self.LayerNorm):
            for p in module.parameters():
                p.requires_grad = self.id_embedding_trainable

    def id_encoder_keys(self):
        return [k for k in self.state_dict() if k.startswith(ID_ENCODER_PREFIXES)]

    def load_id_encoder(self, state_dict):
        """Load step 1 (a SASRec ``state_dict`` or a RecBole checkpoint dict).

        Fails when a step-1 parameter (embedding, positions, LayerNorm, Transformer) is missing
        or has another shape; unrelated keys of the checkpoint are ignored with a warning.
        """
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        own = self.state_dict()
        need = self.id_encoder_keys()
        absent = [k for k in need if k not in state_dict]
        shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in need
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if absent or shapes:
            raise ValueError(
                "SICSRec: the step-1 checkpoint does not match this model's ID encoder"
                + (f"; missing keys {absent}" if absent else "")
                + (f"; shape mismatches {shapes}" if shapes else "")
                + ". Step 1 must be a SASRec with the same hidden_size, inner_size, n_layers, n_heads, "
                "MAX_ITEM_LIST_LENGTH and item set."
            )
        extra = [k for k in state_dict if k not in need]
        if extra:
            getLogger().warning(f"SICSRec: ignoring step-1 keys that are not part of the ID encoder: {extra[:10]}")
        with torch.no_grad():
            for k in need:
                own[k].copy_(state_dict[k].to(own[k].device, own[k].dtype))

    # ------------------------------------------------------------------ encoders
    def id_encoder_states(self, item_seq):
        """(B, L, d) states of the (frozen) step-1 Transformer with the adapters."""
        positions = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        x = self.item_embedding(item_seq) + self.position_embedding(positions)[None]
        x = self.dropout(self.LayerNorm(x))
        mask = self.get_attention_mask(item_seq)
        for i, layer in enumerate(self.trm_encoder.layer):
            x = layer.multi_head_attention(x, mask)
            if self.adapter_attn is not None:
                x = self.adapter_attn[i](x)
            x = layer.feed_forward(x)
            if self.adapter_ffn is not None:
                x = self.adapter_ffn[i](x)
        return x

    def item_content(self, item_ids):
        """Normalised content vectors c = normalize(sum_m MLP_m(T_m[x])), shape (*item_ids.shape, d).

        Each distinct item of ``item_ids`` goes through the MLPs once (a batch of B x L positions
        holds far fewer distinct items); the result and its gradients are the same. With
        ``missing_modality: learned | id`` the MLP output of a modality an item lacks is replaced
        (:class:`~recbole_mm.model.layers.MissingContent`).
        """
        uniq, inverse = torch.unique(item_ids.reshape(-1), return_inverse=True)
        z = None
        for m in self.modalities:
            h = self.content_mlps[m](self.content_tables[m](uniq))
            if self.missing_content is not None:
                h = self.missing_content.replace(m, uniq, h)
            z = h if z is None else z + h
        return F.normalize(z, dim=-1)[inverse].view(*item_ids.shape, -1)

    def content_states(self, item_seq, mask):
        positions = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        c = self.item_content(item_seq) + self.position_embedding(positions)[None]
        return self.content_encoder(self.content_dropout(self.content_LayerNorm(c)), mask)

    def decode(self, h_id, h_c, mask):
        """ID -> content cross-attention. Layers chained (fix) or, as the official code, every
        layer reading the original queries (only the last one counts)."""
        q = self.decoder_dropout(self.decoder_q_LayerNorm(h_id))
        kv = self.decoder_dropout(self.decoder_kv_LayerNorm(h_c))
        if self.decoder_chain_layers:
            return self.decoder(q, mask, key_value=kv)
        out = q
        for layer in self.decoder.layers:
            out = layer(q, mask, key_value=kv)
        return out

    def forward(self, item_seq, item_seq_len, all_positions=False):
        """Normalised sequence vector ``s`` (B, d) at the last valid position.

        The decoder has no self-attention, so each query position is independent: only the
        last valid position is decoded (``all_positions=True`` decodes every position and
        gathers, for tests).
        """
        last = item_seq_len - 1
        mask = causal_padding_mask(item_seq)
        h_id = self.id_encoder_states(item_seq)
        h_c = self.content_states(item_seq, mask)
        if all_positions:
            h_ic = gather_positions(self.decode(h_id, h_c, mask), last)
        else:
            q_mask = gather_positions(mask[:, 0], last)[:, None, None, :]  # (B, 1, 1, L)
            h_ic = self.decode(gather_positions(h_id, last)[:, None], h_c, q_mask)[:, 0]
        fused = torch.cat([gather_positions(h_id, last), gather_positions(h_c, last), h_ic], dim=-1)
        return F.normalize(self.fusion(fused), dim=-1)

    # ------------------------------------------------------------------ scoring and losses
    def item_matrix(self):
        """Item-side vectors used for scoring: normalize(Dropout(E)) in training, normalize(E)
        at inference (or raw E with ``predict_normalize_items: False``, the official inference)."""
        weight = id_table(self.item_embedding)
        if self.training:
            return F.normalize(self.item_dropout(weight), dim=-1)
        if self.predict_normalize_items:
            return F.normalize(weight, dim=-1)
        return weight

    def logits(self, s):
        if not self.training and not self.predict_normalize_items:
            return s @ self.item_matrix().t()  # official: s . E, no temperature
        return s @ self.item_matrix().t() / self.tau

    def ce_loss(self, s, target):
        """Next-item CE of the training states ``s`` against ``target``: softmax over every item, or
        ``softmax: sampled`` (:class:`~recbole_mm.model.softmax.CatalogueSoftmax`) over a subset of
        the rows of :meth:`item_matrix` (the same dropout, normalisation and temperature)."""
        def rows(ids):
            return F.normalize(self.item_dropout(self.item_embedding(ids)), dim=-1)

        return self.softmax(s / self.tau, target, rows, all_items=self.item_matrix)

    def cacl_loss(self, s, target):
        """Content-aware contrastive loss: s_b against the content vectors of the batch's targets.

        In-batch rows whose target equals row b's target are removed from b's denominator
        (``neg_inf``) or, as the official code, set to logit 0 (``zero``). Under DDP with
        ``contrast_negatives: global`` this rank's rows go against the targets of every rank
        (:func:`~recbole_mm.model.layers.gather_rows`); DDP's averaged gradient is that of the loss
        over the whole global batch.
        """
        if self.contrast_negatives == "global":
            target_all, offset = gather_rows(target)
        else:
            target_all, offset = target, 0
        n = target_all.size(0)
        if n < 2:
            return s.sum() * 0.0
        logits = s @ self.item_content(target_all).t() / self.tau
        rows = torch.arange(s.size(0), device=s.device)
        dup = target[:, None] == target_all[None, :]
        dup[rows, rows + offset] = False
        fill = float("-inf") if self.cacl_duplicate_mask == "neg_inf" else 0.0
        logits = logits.masked_fill(dup, fill)
        return F.cross_entropy(logits, rows + offset, reduction="sum") * contrastive_scale(n)

    @torch.no_grad()
    def content_spread(self, batch_size=65536):
        """Mean pairwise cosine of the content vectors of all items (1.0 = collapsed to one vector).

        O(n_items x d): with unit vectors, mean_{i != j} c_i.c_j = (|sum c|^2 - n) / (n (n - 1)).
        """
        n = self.n_items - 1
        if n < 2:
            return float("nan")
        total = None
        for start in range(1, self.n_items, batch_size):
            ids = torch.arange(start, min(self.n_items, start + batch_size), device=self.item_embedding.weight.device)
            part = self.item_content(ids).sum(0)
            total = part if total is None else total + part
        return float((total.pow(2).sum() - n) / (n * (n - 1)))

    def reg_loss(self, rows=None):
        """``reg_norm`` of E and the trainable stage-1 tables. A sparse table (``sparse_table_updates``)
        counts only ``rows``, the items of this batch's histories and targets (lazy regularisation: a
        dense norm would touch every row each step); the others count whole."""
        def part(module, whole):
            # a sparse table's batch rows; else the whole table (built only then: not on the sparse path)
            return module(rows) if module.sparse and rows is not None else whole()

        tables = [part(self.item_embedding, lambda: id_table(self.item_embedding))] \
            if self.item_embedding.weight.requires_grad else []
        tables += [part(t, lambda t=t: t.weight) for t in self.content_tables.values() if t.weight.requires_grad]
        if not tables:
            return self.fusion.weight.sum() * 0.0
        if self.reg_norm == "squared":
            return sum(t.pow(2).sum() for t in tables)
        return sum(torch.linalg.vector_norm(t) for t in tables)

    @property
    def loss_names(self):
        """Names of ``calculate_loss``'s terms, in its order (the epoch log shows them); the
        CACL and regularisation terms are already weighted by alpha / reg_weight."""
        return ("ce",) + (("cacl",) if self.alpha > 0 else ()) + (("reg",) if self.reg_weight > 0 else ())

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]
        s = self.forward(item_seq, item_seq_len)
        losses = [self.ce_loss(s, target)]
        if self.alpha > 0:
            losses.append(self.alpha * self.cacl_loss(s, target))
        if self.reg_weight > 0:
            rows = torch.unique(torch.cat([item_seq.reshape(-1), target])) if self.sparse_table_updates else None
            losses.append(self.reg_weight * self.reg_loss(rows))
        return tuple(losses)

    def optimizer_param_groups(self):
        """Trainable parameters; with ``sparse_table_updates`` the sparse tables form a group of their
        own (``"sparse": True``: SparseAdam, :mod:`recbole_mm.optim`), updated only where a batch read them."""
        params = [p for p in self.parameters() if p.requires_grad]
        sparse = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse}
        groups = [{"params": [p for p in params if id(p) not in sparse]}]
        if sparse:
            groups.append({"params": [p for p in params if id(p) in sparse], "sparse": True})
        return groups

    def predict(self, interaction):
        s = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        scores = self.logits(s)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def full_sort_predict(self, interaction):
        return self.logits(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))
