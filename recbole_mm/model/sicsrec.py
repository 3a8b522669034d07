"""SICSRec: self-supervised representation learning with ID-content modality alignment.

Reference: D. Zhou, W. Pan, Z. Ming. "Self-supervised representation learning with ID-Content
modality alignment for sequential recommendation", Frontiers of Computer Science 20(12), 2025
(arXiv 2510.10556). Specification: ``docs/SICSRec.md``.

Stage 1 (``recbole_mm.model.sicsrec_stage1``) aligns text/image encoders on mined item pairs and
exports item feature tables. Stage 2 is this module, trained in two steps by
:class:`SICSRecTrainer`:

* **step 1**: an ID-only SASRec (RecBole's own ``SASRec``, CE loss) of the same width, trained
  once and saved under a deterministic path in ``checkpoint_dir`` (or loaded from
  ``pretrained_id_encoder``); a later run with the same data and step-1 settings reuses it;
* **step 2**: :class:`SICSRec` loads it, freezes the ID Transformer, inserts zero-initialised
  rank-``r`` adapters after its attention and feed-forward sublayers, and trains the content
  encoder, the ID->content cross-attention decoder and the fusion layer with
  ``L_rec + alpha * L_CACL + lambda * reg``.

Every deviation from the official code is a named switch in ``properties/model/SICSRec.yaml``;
the defaults are the corrected behaviour.
"""

import copy
import hashlib
import json
import os
from logging import getLogger

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder
from recbole.utils import init_seed, set_color

from recbole_mm.compat import torch_load
from recbole_mm.atomic import torch_save_atomic
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
from recbole_mm.model.sicsrec_stage1 import base_feature_names, modalities, stage1_feature_names
from recbole_mm.registry import ModelSpec, get_spec
from recbole_mm.trainer import MMTrainer, format_metrics
from recbole_mm.utils import jsonable

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
    ModelSpec(name="SICSRec", model="recbole_mm.model.sicsrec:SICSRec", role="proposed", trim_safe=True,
              dataset="recbole_mm.model.sicsrec_stage1:SICSRecDataset",
              trainer="recbole_mm.model.sicsrec:SICSRecTrainer",
              features="recbole_mm.model.sicsrec:SICSRec.required_features",
              publishers=(("SASRec", "recbole_mm.model.sicsrec:publish_step1"),),
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
                                and (config["softmax"] or "full") == "sampled")
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


# ====================================================================== trainer

# config keys that decide what step 1 learns (they name its checkpoint)
STEP1_KEYS = (
    "hidden_size", "inner_size", "n_layers", "n_heads", "hidden_dropout_prob", "attn_dropout_prob", "hidden_act",
    "layer_norm_eps", "initializer_range", "MAX_ITEM_LIST_LENGTH", "loss_type", "learner", "learning_rate",
    "weight_decay", "epochs", "stopping_step", "eval_step", "train_batch_size", "valid_metric", "seed",
    "reproducibility", "clip_grad_norm", "train_windows", "eval_args", "benchmark_filename",
)
# step-1 settings only when on (keys of runs without bucketing stay as they were)
BUCKETING_KEYS = ("length_bucketing", "bucket_pool_batches")


def step1_config(config):
    """A copy of ``config`` for the step-1 SASRec: ``step1_config`` overrides applied, model SASRec."""
    cfg = copy.deepcopy(config)
    for key, value in (config["step1_config"] or {}).items():
        cfg[key] = value
    cfg["model"] = "SASRec"
    cfg["loss_type"] = "CE"
    return cfg


def data_checksum(train_data, valid_data=None):
    """Identity of the training (and validation) samples: users, items and histories."""
    h = hashlib.sha256()
    for loader in (train_data, valid_data):
        if loader is None:
            continue
        ds = loader._dataset
        h.update("|".join(map(str, ds.field2id_token[ds.iid_field])).encode("utf-8"))
        inter = ds.inter_feat
        list_field = ds.iid_field + ds.config["LIST_SUFFIX"]
        for field in (ds.uid_field, ds.iid_field, list_field):
            if field in inter:
                h.update(np.ascontiguousarray(inter[field].numpy()).tobytes())
            elif field == list_field and getattr(ds, "lazy_sequences", False):
                # lazy histories, cut at full width in blocks: the same bytes as a materialised table
                for start in range(0, len(inter), 65536):
                    rows = ds.histories(inter[start:start + 65536], width=ds.max_item_list_len)
                    h.update(np.ascontiguousarray(rows[field].numpy()).tobytes())
    return h.hexdigest()


def step1_key(config, train_data, valid_data=None):
    cfg = step1_config(config)
    return {
        "dataset": config["dataset"],
        "data": data_checksum(train_data, valid_data),
        "settings": {k: jsonable(cfg[k]) for k in STEP1_KEYS + BUCKETING_KEYS * bool(cfg["length_bucketing"])
                     if k in cfg},
        "n_items": int(train_data._dataset.item_num),
    }


def _barrier(ddp):
    if ddp:
        import torch.distributed as dist

        dist.barrier()


def step1_path(config, key, folder=None):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return os.path.join(folder or config["checkpoint_dir"], f"SICSRec-step1-{config['dataset']}-{digest}.pth")


# ``share_dir``: a folder shared by the runs of one study (set by ``recbole_mm.study`` for its cells): a finished
# RecBole SASRec run (CE loss) publishes its best checkpoint there under the step-1 name its
# settings and data give; a SICSRec run whose step 1 has the same key loads it instead of training
# the same SASRec again. The key (data checksum + every step-1 setting, seed included) decides, so
# a published SASRec is only ever used where SICSRec would have trained exactly that model.
def _step1_share_dir(config):
    return os.path.join(config["share_dir"], "step1") if config["share_dir"] else None


def _history_of(trainer):
    history = getattr(trainer, "history", None) or {}
    return {k: jsonable(history[k]) for k in ("train_loss", "valid_score", "valid_result", "train_epoch_s", "valid_epoch_s")
            if k in history}


def publish_step1(config, trainer, train_data, valid_data, best_valid_score, best_valid_result):
    """After a SASRec run (CE loss) with a saved best checkpoint: write it, with its step-1 key,
    to ``<share_dir>/step1`` for the SICSRec runs of the same study; returns the path or None
    (no ``share_dir``, another model or loss, or already published)."""
    folder = _step1_share_dir(config)
    best = getattr(trainer, "saved_model_file", None)
    if not folder or get_spec(config["model"]).name != "SASRec" or config["loss_type"] != "CE" or not best \
            or not os.path.isfile(best):
        return None
    key = step1_key(config, train_data, valid_data)
    path = step1_path(config, key, folder)
    if os.path.isfile(path):
        return None  # the same key: the same run, published before
    ckpt = torch_load(best, map_location="cpu")
    ckpt["sicsrec_step1"] = {"key": jsonable(key), "best_valid_score": jsonable(best_valid_score),
                             "best_valid_result": jsonable(best_valid_result), "history": _history_of(trainer),
                             "published_by": "SASRec run"}
    os.makedirs(folder, exist_ok=True)
    torch_save_atomic(ckpt, path)
    getLogger().info(set_color("SICSRec step 1", "green") + f": this SASRec published as a step 1 for SICSRec -> {path}")
    return path


class SICSRecTrainer(MMTrainer):
    """Runs SICSRec's two steps: step 1 (ID SASRec; trained, or reused when its checkpoint
    exists) then step 2 (the SICSRec model, RecBole's training loop with early stopping)."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        state, info = self.prepare_step1(train_data, valid_data, verbose=verbose, show_progress=show_progress)
        self.model.load_id_encoder(state)
        # only the weights are kept for evaluate_step1 (not the checkpoint's optimizer state)
        self._step1_state = state["state_dict"] if isinstance(state.get("state_dict"), dict) else state
        self.step1_info = info
        self._history()["step1"] = jsonable(info)
        # step 2 starts from the same random state whether step 1 was trained or reused
        init_seed(self.config["seed"] + self.config["local_rank"], self.config["reproducibility"])
        self.logger.info(set_color("SICSRec step 2", "green") + ": frozen ID Transformer + adapters, content "
                         "encoder, decoder and fusion")
        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    @torch.no_grad()
    def evaluate_step1(self, eval_data, show_progress=False):
        """Test metrics of the step-1 SASRec on ``eval_data``: the ID-only baseline this run's
        step 2 started from, scored by the same evaluator (a paired SASRec number for free).
        Stored in the run record as ``history.step1.test_result``; None before ``fit``."""
        from recbole.model.sequential_recommender.sasrec import SASRec

        from recbole_mm.registry import get_trainer

        state = getattr(self, "_step1_state", None)
        if state is None:
            return None
        cfg = step1_config(self.config)
        model = SASRec(cfg, eval_data._dataset).to(self.device)
        model.load_state_dict(state)
        trainer = get_trainer(cfg["MODEL_TYPE"], "SASRec")(cfg, model)
        result = trainer.evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        self._history().setdefault("step1", {})["test_result"] = jsonable(result)
        self.logger.info(set_color("SICSRec step 1 (ID SASRec) test result", "yellow") + ": "
                         + format_metrics(result, self.config["metric_decimal_place"] or 4))
        return result

    def extra_test_results(self, test_data, show_progress=False):
        """The step-1 SASRec's test metrics (:meth:`evaluate_step1`), as ``{"step1": ...}``."""
        result = self.evaluate_step1(test_data, show_progress=show_progress)
        return {} if result is None else {"step1": result}

    def stage_summaries(self):
        info = self._history().get("step1")
        if not isinstance(info, dict):
            return []
        trained = info.get("history") if isinstance(info.get("history"), dict) else None
        return [{
            "name": "step1", "label": "step-1 SASRec", "model": "SASRec",
            "epochs": len(trained.get("train_loss") or []) if trained else None,
            "max_epochs": step1_config(self.config)["epochs"], "reused": bool(info.get("reused")),
            "description": "Each run's step-1 ID SASRec (same size and split; trained in that run, or the study's "
                           "SASRec cell of the same seed when it was the same run and was loaded instead) tested by "
                           "the same evaluator: a paired ID-only baseline per seed.",
            "test_result": info.get("test_result"),
        }]

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        model = self.model
        if hasattr(model, "content_spread"):
            was = model.training
            model.eval()
            spread = model.content_spread()
            model.train(was)
            self._history().setdefault("content_mean_cosine", []).append(spread)
            self.logger.info(f"SICSRec epoch {epoch_idx}: content vectors' mean pairwise cosine {spread:.3f} "
                             "(1 = collapsed)")
        return loss

    def prepare_step1(self, train_data, valid_data=None, verbose=True, show_progress=False):
        """(step-1 state_dict, info): loaded from ``pretrained_id_encoder`` or the deterministic
        checkpoint, else trained now and saved there atomically."""
        config = self.config
        given = config["pretrained_id_encoder"]
        if given:
            if not os.path.isfile(given):
                raise FileNotFoundError(f"pretrained_id_encoder {given} does not exist (leave it empty to train "
                                        "step 1 and save it under checkpoint_dir)")
            ckpt = torch_load(given, map_location=self.device)
            self.logger.info(set_color("SICSRec step 1", "green") + f": loaded from pretrained_id_encoder {given}")
            return ckpt, {"checkpoint": os.path.abspath(given), "reused": True, "source": "pretrained_id_encoder"}
        key = step1_key(config, train_data, valid_data)
        path = step1_path(config, key)
        share = _step1_share_dir(config)
        candidates = [(path, None)] + ([(step1_path(config, key, share), "shared")] if share else [])
        if config["step1_retrain"]:
            candidates = []
        for candidate, source in candidates:
            if not os.path.isfile(candidate):
                continue
            ckpt = torch_load(candidate, map_location=self.device)
            meta = ckpt.get("sicsrec_step1", {})
            if meta.get("key") != jsonable(key):
                self.logger.warning(f"SICSRec step 1: {candidate} was written for other settings; not used")
                continue
            what = f"the step 1 published by a {meta['published_by']}" if meta.get("published_by") else "step 1"
            self.logger.info(set_color("SICSRec step 1", "green") + f": reusing {what}, {candidate} (best valid "
                             f"{meta.get('best_valid_score')})")
            info = {"checkpoint": candidate, "reused": True, "best_valid_score": meta.get("best_valid_score"),
                    "best_valid_result": meta.get("best_valid_result")}
            if meta.get("history"):
                info["history"] = meta["history"]  # the epochs it was trained for, when it was trained
            if source:
                info["source"] = f"share_dir ({meta.get('published_by', 'a SICSRec run')})"
            return ckpt, info
        return self.train_step1(train_data, valid_data, key, path, verbose, show_progress)

    def train_step1(self, train_data, valid_data, key, path, verbose=True, show_progress=False):
        from recbole.model.sequential_recommender.sasrec import SASRec

        from recbole_mm.registry import get_trainer

        cfg = step1_config(self.config)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        generator_state = train_data.generator.get_state()
        batch_changed = cfg["train_batch_size"] != self.config["train_batch_size"]
        if batch_changed:
            train_data.update_config(cfg)
        self.logger.info(set_color("SICSRec step 1", "green") + f": training an ID SASRec -> {path}")
        init_seed(cfg["seed"] + cfg["local_rank"], cfg["reproducibility"])
        model = SASRec(cfg, train_data._dataset).to(self.device)
        trainer = get_trainer(cfg["MODEL_TYPE"], "SASRec")(cfg, model)
        # under DDP only local rank 0 writes checkpoints (RecBole's rule): one shared partial name
        ddp = not cfg["single_spec"]
        writer = not ddp or cfg["local_rank"] == 0
        partial = f"{path}.partial-ddp" if ddp else f"{path}.partial-{os.getpid()}"
        trainer.saved_model_file = partial
        try:
            best_score, best_result = trainer.fit(train_data, valid_data, verbose=verbose, saved=True,
                                                  show_progress=show_progress)
            _barrier(ddp)
            if writer:
                ckpt = torch_load(partial, map_location=self.device)
                ckpt["sicsrec_step1"] = {"key": jsonable(key), "best_valid_score": jsonable(best_score),
                                         "best_valid_result": jsonable(best_result),
                                         "history": _history_of(trainer)}
                torch_save_atomic(ckpt, path)
            _barrier(ddp)
            ckpt = torch_load(path, map_location=self.device)
        finally:
            if writer and os.path.exists(partial):
                os.remove(partial)
            if batch_changed:
                train_data.update_config(self.config)
            train_data.generator.set_state(generator_state)
        self.logger.info(set_color("SICSRec step 1", "green") + f": best valid {best_result} saved to {path}")
        info = {"checkpoint": path, "reused": False, "best_valid_score": best_score,
                "best_valid_result": best_result, "history": getattr(trainer, "history", None)}
        return ckpt, info
