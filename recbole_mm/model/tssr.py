"""TSSR: two-stream sequential recommendation from collaborative signals and semantic relatedness.

Reference: M. Cheng, H. Zhang, Q. Liu, F. Yuan, Z. Li, Z. Huang, E. Chen, J. Zhou, L. Li.
"Empowering Sequential Recommender Systems from Mixture of Collaborative Signals and Semantic
Relatedness", DASFAA 2024 (arXiv 2403.07623).

An ID stream and a content stream (item text and/or image features), each a Transformer,
fused by causal cross-attention in both directions and an element-wise gate; trained with
next-item cross-entropy plus a user-level (L_u) and an item-level (L_i) contrastive loss.
Deviations from the released code are named switches in ``properties/model/TSSR.yaml``; the
defaults are the corrected behaviour (see ``docs/TSSR.md``).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_mm.model.layers import (
    AttentionStack,
    ContentProjector,
    ElementwiseGate,
    ItemIDEmbedding,
    MissingContent,
    causal_padding_mask,
    checkpointed_sum,
    cold_rows,
    contrastive_scale,
    dataset_missing_masks,
    gather_rows,
    id_table,
    missing_modality_setting,
    set_activation_checkpointing,
    xavier_init,
)
from recbole_mm.model.softmax import CatalogueSoftmax
from recbole_mm.registry import ModelSpec

_CHOICES = {
    "content_modality": ("text", "image", "both"),
    "content_mode": ("frozen", "finetune"),
    "ce_positions": ("all", "last"),
    "lu_pooling": ("masked", "all"),
    "li_similarity": ("dot", "cos"),
    "contrast_negatives": ("global", "local"),
    "classifier": ("linear", "id", "id_content"),
}


# the model protocol (recbole_mm.registry, docs/ADDING_A_MODEL.md); trim_safe: outputs unchanged when
# batches are cut to their longest history (tests/test_lazy.py)
MODEL_SPECS = (
    ModelSpec(name="TSSR", model="recbole_mm.model.tssr:TSSR", role="proposed", trim_safe=True,
              dataset="recbole_mm.data.dataset:MultiModalSequentialDataset",
              features="recbole_mm.model.tssr:TSSR.required_features"),
)


class TSSR(SequentialRecommender):
    r"""TSSR as a RecBole sequential recommender (frozen features or end-to-end text encoder)."""


    @staticmethod
    def required_features(config):
        modality = config["content_modality"]
        names = {"text": [config["text_feature"]], "image": [config["image_feature"]]}
        names["both"] = names["text"] + names["image"]
        if modality not in names:
            raise ValueError(f"content_modality must be one of {_CHOICES['content_modality']}, got {modality!r}")
        return names[modality]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        missing = [k for k in ("hidden_size", "n_heads", "inner_size", "n_layers", "n_cross_layers",
                               "lambda_u", "lambda_i", "tau_u", "tau_i") if config[k] is None]
        if missing:
            raise ValueError(f"TSSR: missing config keys {missing} (defaults live in properties/model/TSSR.yaml)")
        for key, allowed in _CHOICES.items():
            if config[key] not in allowed:
                raise ValueError(f"TSSR: {key} must be one of {allowed}, got {config[key]!r}")

        # hyper-parameters
        self.hidden_size = config["hidden_size"]
        self.n_heads = config["n_heads"]
        self.inner_size = config["inner_size"]
        self.n_layers = config["n_layers"]
        self.n_cross_layers = config["n_cross_layers"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.input_dropout_prob = config["input_dropout_prob"]
        self.hidden_act = config["hidden_act"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.rezero = config["rezero"]
        self.rezero_init = config["rezero_init"]
        self.lambda_u = config["lambda_u"]
        self.lambda_i = config["lambda_i"]
        self.tau_u = config["tau_u"]
        self.tau_i = config["tau_i"]
        self.ce_positions = config["ce_positions"]
        self.contrastive_memory_mb = config["contrastive_memory_mb"]
        self.lu_pooling = config["lu_pooling"]
        self.li_mask_duplicates = config["li_mask_duplicates"]
        self.li_similarity = config["li_similarity"]
        self.contrast_negatives = config["contrast_negatives"]
        self.share_position_embedding = config["share_position_embedding"]
        self.content_mode = config["content_mode"]
        self.init_bias = config["init_bias"]
        self.classifier_kind = config["classifier"]
        if self.classifier_kind == "id_content" and self.content_mode == "finetune":
            raise ValueError(
                "TSSR: classifier: id_content needs every item's content vector at every step, which "
                "content_mode: finetune would re-encode each batch; use classifier: id or linear with finetune"
            )
        self.encoder_learning_rate = config["encoder_learning_rate"] or config["learning_rate"]
        self.USER_ID = config["USER_ID_FIELD"]
        self.feature_names = self.required_features(config)
        self.missing_modality = missing_modality_setting(config, "TSSR")
        masks = (dataset_missing_masks(dataset, self.feature_names, "TSSR")
                 if self.missing_modality != "zero" else None)

        # layers
        d = self.hidden_size
        self.item_embedding = nn.Embedding(self.n_items, d, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, d)
        self.content_position_embedding = (
            self.position_embedding if self.share_position_embedding else nn.Embedding(self.max_seq_length, d)
        )
        self.input_dropout = nn.Dropout(self.input_dropout_prob)
        if self.content_mode == "frozen":
            self.content = ContentProjector({n: dataset.mm_features[n] for n in self.feature_names}, d,
                                            missing=masks, missing_modality=self.missing_modality)
        else:
            self.content = self._build_finetune_content(config, dataset, masks)
        block = dict(
            hidden_size=d, n_heads=self.n_heads, inner_size=self.inner_size,
            hidden_dropout_prob=self.hidden_dropout_prob, attn_dropout_prob=self.attn_dropout_prob,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
            rezero=self.rezero, rezero_init=self.rezero_init,
        )
        self.id_encoder = AttentionStack(self.n_layers, **block)
        self.content_encoder = AttentionStack(self.n_layers, **block)
        self.cross_id = AttentionStack(self.n_cross_layers, **block)
        self.cross_content = AttentionStack(self.n_cross_layers, **block)
        self.gate = ElementwiseGate(d)
        # linear: TSSR's own output layer (released code); id / id_content: scores are dot products
        # with the item's ID embedding (SASRec's tied output) / ID embedding + projected content
        self.classifier = nn.Linear(d, self.n_items) if self.classifier_kind == "linear" else None
        self.softmax = CatalogueSoftmax(config, dataset, self.n_items, "TSSR")
        set_activation_checkpointing(self, config["activation_checkpointing"])

        self._init_weights()
        # cold items (recbole_mm.data.cold): their ID rows, and their rows of the linear classifier,
        # come from their content features (layers.ColdRows; one rule shared by both tables)
        rule = cold_rows(dataset, self.feature_names)
        self.item_embedding = ItemIDEmbedding(self.item_embedding, rule) if rule is not None else self.item_embedding
        self.classifier_cold = rule if self.classifier is not None else None

    def _build_finetune_content(self, config, dataset, masks=None):
        """The modality's encoders in the graph (recbole_mm.encoders): text, image or both."""
        from recbole_mm.encoders.lora import lora_settings

        peft = config["encoder_peft"]
        if peft not in (None, "lora", "side"):
            raise ValueError(f"encoder_peft must be ~ (tune the top layers themselves), lora or side, got {peft!r}")
        lora = lora_settings(config) if peft == "lora" else None
        shared = dict(unique_items=config["encoder_unique_items"], cache_lower=config["encoder_cache_lower"],
                      cache_mb=config["encoder_cache_mb"], cache_dtype=config["encoder_cache_dtype"],
                      lora=lora)
        if peft == "side":  # a frozen backbone: the side adapter caches its states (encoders.side)
            shared.update(cache_lower=False, cache_mb=0)
        encoders = {}
        for name in self.feature_names:
            spec = dataset.feature_spec(name)
            if spec.get("type") == "image":
                encoders[name] = self._finetune_image_encoder(config, dataset, name, spec, masks, shared,
                                                              side=peft == "side")
            else:
                from recbole_mm.encoders.text import FinetuneTextEncoder, load_text_encoder

                encoder, tokenizer = load_text_encoder(config["content_encoder"] or spec.get("encoder") or "default")
                ids, mask = dataset.text_inputs(name, tokenizer, config["encoder_max_length"])
                encoders[name] = FinetuneTextEncoder(
                    encoder, ids, mask, trainable_layers=0 if peft == "side" else config["encoder_trainable_layers"],
                    pooling=config["encoder_pooling"] or spec.get("pooling", "mean"), **shared)
            if peft == "side":
                from recbole_mm.encoders.side import SideAdapterEncoder

                encoders[name] = SideAdapterEncoder(
                    encoders[name], bottleneck=config["side_bottleneck"], cache_mb=config["encoder_cache_mb"],
                    cache_dtype=config["encoder_cache_dtype"], unique_items=config["encoder_unique_items"])
        missing = (MissingContent({n: masks[n] for n in encoders}, self.hidden_size, self.missing_modality)
                   if masks else None)
        return _FinetuneContent(encoders, self.hidden_size, missing)

    @staticmethod
    def _finetune_image_encoder(config, dataset, name, spec, masks, shared, side=False):
        from recbole_mm.data.images import parse_background
        from recbole_mm.encoders.image import load_image_finetune

        available = ~dataset.mm_missing[name]  # readable images, as the image feature's extraction found them
        return load_image_finetune(
            config["image_encoder"] or spec.get("encoder"), dataset.image_paths(name), available,
            background=parse_background(spec.get("image_background"), f"mm_features.{name}.image_background"),
            pooling=config["image_pooling"] or spec.get("pooling") or "pooler",
            trainable_layers=0 if side else config["image_trainable_layers"],
            cache_pixels=config["image_cache_pixels"] and not side,  # side: each image read once, for its taps
            pixel_cache_mb=config["image_pixel_cache_mb"], **shared)

    def _init_weights(self):
        # TSSR's init (xavier-normal Linear, constant bias, uniform ID embeddings); a pretrained
        # encoder in finetune mode and the frozen feature tables keep their weights.
        skip = {id(m) for m in self.content.encoder_modules()} if self.content_mode == "finetune" else set()
        for module in self.modules():
            if id(module) not in skip:
                xavier_init(module, bias_value=self.init_bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        if self.content.missing is not None:
            # missing-content vectors: drawn like the ID embeddings, after every other weight (so
            # those are the same as with missing_modality: zero under one seed)
            bound = math.sqrt(1.0 / self.n_items)
            self.content.missing.reset_parameters(lambda w: nn.init.uniform_(w, -bound, bound))
            if isinstance(self.content, ContentProjector):
                self.content.match_missing_scale()  # at the projected content's scale

    def optimizer_param_groups(self):
        """Trainable parameters; a finetuned encoder gets ``encoder_learning_rate``."""
        if self.content_mode != "finetune":
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]
        enc_params = self.content.encoder_parameters()
        enc = {id(p) for p in enc_params}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in enc]
        groups = [{"params": rest}]
        if enc_params:
            groups.append({"params": enc_params, "lr": self.encoder_learning_rate})
        return groups

    # ------------------------------------------------------------------ forward
    def item_content(self, item_ids):
        """Projected content vectors C[x] (before positions), shape (*item_ids.shape, d)."""
        return self.content(item_ids)

    def forward(self, item_seq, item_seq_len, query_positions=None):
        """Fused output ``e`` and the intermediates the losses use.

        With ``query_positions`` (B,), the cross-attention stacks and the gate run only for that
        position of each sequence (``e`` is then (B, 1, d)): the unimodal encoders still see the
        whole prefix, and position t's fused output depends only on the unimodal outputs at
        positions <= t, so this equals the full forward at those positions at a fraction of the
        cost (scoring and ``ce_positions: last`` need nothing else).
        """
        positions = torch.arange(item_seq.size(1), device=item_seq.device)
        e_id = self.item_embedding(item_seq)
        c = self.item_content(item_seq)
        z_id = self.input_dropout(e_id + self.position_embedding(positions)[None])
        z_c = self.input_dropout(c + self.content_position_embedding(positions)[None])
        mask = causal_padding_mask(item_seq)
        h_id = self.id_encoder(z_id, mask)
        h_c = self.content_encoder(z_c, mask)
        if query_positions is None:
            q_id, q_c, q_mask = h_id, h_c, mask
        else:
            rows = torch.arange(item_seq.size(0), device=item_seq.device)
            q_id = h_id[rows, query_positions].unsqueeze(1)
            q_c = h_c[rows, query_positions].unsqueeze(1)
            q_mask = mask[rows, :, query_positions].unsqueeze(2)  # (B, 1, 1, L)
        x = self.cross_id(q_id, q_mask, key_value=h_c)
        y = self.cross_content(q_c, q_mask, key_value=h_id)
        return {"e": self.gate(x, y), "h_id": h_id, "h_c": h_c}

    # ------------------------------------------------------------------ losses
    @staticmethod
    def position_labels(item_seq, item_seq_len, target):
        """Next-item label at every position: item_seq[t+1] for t < len-1, ``target`` at len-1, else 0."""
        length = item_seq.size(1)
        labels = torch.zeros_like(item_seq)
        labels[:, :-1] = item_seq[:, 1:]
        pos = torch.arange(length, device=item_seq.device)[None]
        labels = torch.where(pos < (item_seq_len - 1)[:, None], labels, torch.zeros_like(labels))
        labels[torch.arange(item_seq.size(0), device=item_seq.device), item_seq_len - 1] = target
        return labels

    def output_item_matrix(self):
        """(n_items, d) item vectors the tied classifiers score against."""
        if self.classifier_kind == "id_content":
            return self.output_item_vectors(torch.arange(self.n_items, device=self.item_embedding.weight.device))
        return id_table(self.item_embedding)

    def output_item_vectors(self, ids):
        """Rows ``ids`` of the classifier's item vectors (linear: its weight rows)."""
        if self.classifier is not None:
            weight = self.classifier.weight
            if self.classifier_cold is not None:
                return self.classifier_cold.rows(weight, ids, weight[ids])
            return weight[ids]
        w = self.item_embedding(ids)
        if self.classifier_kind == "id_content":
            # PAD's row stays zero (its ID embedding is the zero padding row), as in ``id``
            w = w + self.item_content(ids) * (ids > 0).unsqueeze(-1).to(w.dtype)
        return w

    def logits(self, e):
        """Scores over all items (column 0 is padding) for fused states ``e`` (..., d)."""
        if self.classifier is not None:
            if self.classifier_cold is not None:
                rule = self.classifier_cold
                return F.linear(e, rule(self.classifier.weight), rule(self.classifier.bias))
            return self.classifier(e)
        return e @ self.output_item_matrix().t()

    def _ce_loss(self, e, labels):
        """Next-item CE at every valid position of ``e`` (..., d) with ``labels`` (...; 0 = none):
        the full softmax in chunks of positions whose logits fit ``ce_memory_mb``
        (:func:`~recbole_mm.model.layers.chunked_cross_entropy`), or ``softmax: sampled``
        (:class:`~recbole_mm.model.softmax.CatalogueSoftmax`)."""
        valid = labels > 0
        if self.classifier is not None:
            bias, weight, rule = self.classifier.bias, self.classifier.weight, self.classifier_cold
            if rule is None:
                return self.softmax(e[valid], labels[valid], self.output_item_vectors, lambda ids: bias[ids],
                                    all_items=lambda: weight)
            # cold items: the mean warm row and bias, for the rows the softmax asks for (the whole
            # table only for the full softmax)
            return self.softmax(e[valid], labels[valid], self.output_item_vectors,
                                lambda ids: rule.rows(bias, ids, bias[ids]), all_items=lambda: rule(weight))
        return self.softmax(e[valid], labels[valid], self.output_item_vectors, all_items=self.output_item_matrix)

    def _global(self):
        return self.contrast_negatives == "global"

    def _user_loss(self, h_id, h_c, item_seq, users):
        """L_u: symmetric InfoNCE between pooled content and pooled ID sequence outputs.

        This rank's rows against the columns of every rank (``contrast_negatives: global``, under
        DDP; :func:`~recbole_mm.model.layers.gather_rows`): each rank computes its own rows, and
        DDP's averaged gradient is that of the loss over the whole global batch."""
        if self.lu_pooling == "masked":
            m = (item_seq > 0).unsqueeze(-1).to(h_id.dtype)
            p_id = (h_id * m).sum(1) / m.sum(1).clamp_min(1.0)
            p_c = (h_c * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            p_id, p_c = h_id.mean(1), h_c.mean(1)
        p_id, p_c = F.normalize(p_id, dim=-1), F.normalize(p_c, dim=-1)
        if self._global():
            (cols_id, offset), (cols_c, _), (users_all, _) = (
                gather_rows(p_id, differentiable=True), gather_rows(p_c, differentiable=True), gather_rows(users))
        else:
            cols_id, cols_c, users_all, offset = p_id, p_c, users, 0
        n = cols_id.size(0)
        if n < 2:
            return (p_id.sum() + p_c.sum()) * 0.0
        rows = torch.arange(p_id.size(0), device=p_id.device)
        target = rows + offset
        # several windows of one user in a batch are not negatives of each other
        same_user = users[:, None] == users_all[None, :]
        same_user[rows, target] = False
        content_rows = (p_c @ cols_id.t() / self.tau_u).masked_fill(same_user, float("-inf"))
        id_rows = (p_id @ cols_c.t() / self.tau_u).masked_fill(same_user, float("-inf"))
        total = F.cross_entropy(content_rows, target, reduction="sum") + \
            F.cross_entropy(id_rows, target, reduction="sum")
        return total * contrastive_scale(n)

    def _item_direction(self, anchors, candidates, labels, labels_all, offset):
        """One L_i direction: this rank's anchors (b, L, d) vs the next items' vectors of the whole
        (global) batch (N, L, d), per position; ``labels_all`` (N, L), this rank's rows from ``offset``.

        The (L, b, N) similarities go in blocks of positions that fit ``contrastive_memory_mb``
        (each recomputed in backward); the loss is the mean over every valid (position, row) of
        the global batch (:func:`~recbole_mm.model.layers.contrastive_scale`)."""
        if self.li_similarity == "cos":
            anchors, candidates = F.normalize(anchors, dim=-1), F.normalize(candidates, dim=-1)
        a = anchors.transpose(0, 1)  # (L, b, d)
        c = candidates.transpose(0, 1)  # (L, N, d)
        lab, lab_all = labels.t(), labels_all.t()
        global_rows = int((lab_all > 0).sum())
        if not global_rows or not bool((lab > 0).any()):
            return (a.sum() + c.sum()) * 0.0
        length, batch, columns = lab.size(0), lab.size(1), lab_all.size(1)
        block = length if not self.contrastive_memory_mb else \
            max(1, int(self.contrastive_memory_mb * 2 ** 20 // (3 * 4 * batch * columns)))
        if block >= length:
            total = self._item_direction_sum(a, c, lab, lab_all, offset)
        else:
            total = checkpointed_sum(self._item_direction_sum, block, (a, c, lab, lab_all), (offset,))
        return total * contrastive_scale(global_rows)

    def _item_direction_sum(self, a, c, lab, lab_all, offset):
        """Summed InfoNCE of positions ``a`` (P, b, d) against ``c`` (P, N, d); labels ``lab`` (P, b)
        and ``lab_all`` (P, N); row i's own column is ``offset + i``."""
        logits = torch.bmm(a, c.transpose(1, 2)) / self.tau_i  # (P, b, N)
        invalid_col = (lab_all == 0)[:, None, :].expand_as(logits)
        batch = lab.size(1)
        own = torch.zeros(batch, lab_all.size(1), dtype=torch.bool, device=lab.device)
        own[torch.arange(batch, device=lab.device), offset + torch.arange(batch, device=lab.device)] = True
        if self.li_mask_duplicates:
            dup = lab[:, :, None] == lab_all[:, None, :]
            invalid_col = invalid_col | (dup & ~own[None])
        logits = logits.masked_fill(invalid_col, float("-inf"))
        rows = lab > 0
        if not rows.any():  # (every column masked: the logits are -inf, and -inf * 0 is NaN)
            return (a.sum() + c.sum()) * 0.0
        target = (offset + torch.arange(batch, device=lab.device))[None].expand_as(lab)
        return F.cross_entropy(logits[rows], target[rows], reduction="sum")

    def _item_loss(self, h_id, h_c, labels):
        """L_i: content state -> next item's ID embedding, ID state -> next item's content vector;
        the candidates are the next items of the whole (global) batch, computed on this rank from
        the gathered labels."""
        labels_all, offset = gather_rows(labels) if self._global() else (labels, 0)
        next_id = self.item_embedding(labels_all)
        next_c = self.item_content(labels_all)
        return self._item_direction(h_c, next_id, labels, labels_all, offset) + \
            self._item_direction(h_id, next_c, labels, labels_all, offset)

    @property
    def loss_names(self):
        """Names of ``calculate_loss``'s terms, in its order (the epoch log shows them); the
        contrastive terms are already weighted by lambda_u / lambda_i."""
        return ("ce",) + (("user_cl",) if self.lambda_u > 0 else ()) + (("item_cl",) if self.lambda_i > 0 else ())

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]
        labels = self.position_labels(item_seq, item_seq_len, target)
        if self.ce_positions == "last":
            out = self.forward(item_seq, item_seq_len, query_positions=item_seq_len - 1)
            losses = [self._ce_loss(out["e"][:, 0], target)]
        else:
            out = self.forward(item_seq, item_seq_len)
            losses = [self._ce_loss(out["e"], labels)]
        if self.lambda_u > 0:
            users = interaction[self.USER_ID] if self.USER_ID in interaction else torch.arange(
                item_seq.size(0), device=item_seq.device)
            losses.append(self.lambda_u * self._user_loss(out["h_id"], out["h_c"], item_seq, users))
        if self.lambda_i > 0:
            losses.append(self.lambda_i * self._item_loss(out["h_id"], out["h_c"], labels))
        return tuple(losses)

    # ------------------------------------------------------------------ scoring
    def _last_state(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        return self.forward(item_seq, item_seq_len, query_positions=item_seq_len - 1)["e"][:, 0]

    def predict(self, interaction):
        scores = self.logits(self._last_state(interaction))
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def full_sort_predict(self, interaction):
        return self.logits(self._last_state(interaction))


class _FinetuneContent(nn.Module):
    """Content encoders in the graph (text and / or image, partly trainable), each projected to
    ``hidden_size`` and summed (as the frozen :class:`ContentProjector` sums its features): C[x] for
    any id tensor. ``missing`` (a :class:`~recbole_mm.model.layers.MissingContent` or None) replaces
    the projection of a modality an item lacks (``missing_modality``)."""

    def __init__(self, encoders, hidden_size, missing=None):
        super().__init__()
        self.names = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.proj = nn.ModuleDict({n: nn.Linear(e.out_dim, hidden_size) for n, e in encoders.items()})
        self.missing = missing

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written when finetune was text only: content.text.* / content.proj.{weight,bias}
        name = self.names[0]
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.startswith("text."):
                state_dict[f"{prefix}encoders.{name}.{rest[len('text.'):]}"] = state_dict.pop(key)
            elif rest in ("proj.weight", "proj.bias"):
                state_dict[f"{prefix}proj.{name}.{rest[len('proj.'):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def text(self):  # the text encoder (older code and tests read content.text)
        return next(getattr(e, "base", e) for e in self.encoders.values() if hasattr(getattr(e, "base", e), "input_ids"))

    def encoder_modules(self):
        """Modules that keep their own initialisation: the pretrained encoders (and a side adapter's
        network, whose output layer starts at zero)."""
        return [m for e in self.encoders.values()
                for m in (e.owned_modules() if hasattr(e, "owned_modules") else e.encoder.modules())]

    def encoder_parameters(self):
        return [p for e in self.encoders.values() for p in e.encoder_parameters()]

    def forward(self, item_ids):
        out = None
        for name, encoder in self.encoders.items():
            z = self.proj[name](encoder(item_ids))
            if self.missing is not None:
                z = self.missing.replace(name, item_ids, z)
            out = z if out is None else out + z
        return out
