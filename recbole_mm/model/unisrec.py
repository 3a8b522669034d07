"""UniSRec: item and sequence representations from item text, trained on one dataset (the paper's
fine-tuning setting, from scratch: no cross-domain pre-training).

Reference: Y. Hou, S. Mu, W. X. Zhao, Y. Li, B. Ding, J.-R. Wen. "Towards Universal Sequence
Representation Learning for Recommender Systems", KDD 2022 (arXiv 2206.05941). Written from the
paper; specification and the map to the YAML switches: ``docs/UniSRec.md``.

* An item is its frozen text embedding ``x`` (``mm_features[text_feature]``, the paper's BERT CLS
  vector) passed through the **MoE-enhanced adaptor** (:class:`MoEAdaptor`): ``n_exps`` parametric
  whitening experts ``x~_k = (Dropout(x) - b_k) W_k`` mixed by a softmax gate
  ``g = softmax(x W_g + N(0, 1) * softplus(x W_n))`` (the noise only in training, ``adaptor_noise``),
  ``v = sum_k g_k x~_k``.
* A SASRec Transformer (RecBole's own :class:`~recbole.model.sequential_recommender.sasrec.SASRec`:
  position embeddings, LayerNorm, dropout, causal + key-padding mask) over the item vectors; the
  sequence vector ``s`` is its output at the last valid position.
* ``train_stage``: ``inductive_ft`` (items are ``v`` alone; no ID table exists, so items never seen
  in training are scored from their text) or ``transductive_ft`` (``v`` + an item-ID embedding,
  the ID table under the plugin's cold-item rule, :func:`~recbole_mm.model.layers.with_cold_items`).
* Scores ``cos(s, v_i) / temperature``; training CE over the catalogue through
  :class:`~recbole_mm.model.softmax.CatalogueSoftmax` (full or ``softmax: sampled``; cold items out).
* ``seq_contrast_weight > 0`` adds the pre-training's sequence-sequence contrastive loss: two views
  of each history with items dropped (``item_drop_ratio``), in-batch InfoNCE at ``temperature``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_mm.model.layers import (ItemVectorSASRecMixin, MissingContent, contrastive_scale, dataset_missing_masks,
                                     gather_rows, keep_out_of_checkpoints, missing_modality_setting, with_cold_items)
from recbole_mm.model.softmax import CatalogueSoftmax
from recbole_mm.registry import ModelSpec

TRAIN_STAGES = ("inductive_ft", "transductive_ft")

# the model protocol (recbole_mm.registry, docs/ADDING_A_MODEL.md); trim_safe: outputs unchanged when
# batches are cut to their longest history (positions from the left, padding masked; the item-drop
# draws of the contrastive views do not depend on the batch width either; tests/test_lazy.py)
MODEL_SPECS = (
    ModelSpec(name="UniSRec", model="recbole_mm.model.unisrec:UniSRec", role="proposed", trim_safe=True,
              dataset="recbole_mm.data.dataset:MultiModalSequentialDataset",
              features="recbole_mm.model.unisrec:UniSRec.required_features"),
)


class MoEAdaptor(nn.Module):
    r"""UniSRec's MoE-enhanced adaptor: ``n_exps`` parametric-whitening experts mixed by a softmax gate.

    Expert ``k``: ``x~_k = (Dropout(x) - b_k) W_k`` (``whitening_bias[k]`` of the feature dim,
    ``expert_weight[k]`` feature_dim x hidden_size). Gate: ``g = softmax(x W_g + eps * softplus(x W_n))``
    with ``eps ~ N(0, 1)`` in training when ``noisy_gating`` (no noise in eval; no ``noise_weight``
    at all without noisy gating). Output ``sum_k g_k x~_k``. The gate reads the undropped ``x``.
    """

    def __init__(self, input_dim, hidden_size, n_exps, dropout_prob, noisy_gating):
        super().__init__()
        self.input_dim, self.hidden_size, self.n_exps = int(input_dim), int(hidden_size), int(n_exps)
        self.whitening_bias = nn.Parameter(torch.zeros(self.n_exps, self.input_dim))
        self.expert_weight = nn.Parameter(torch.zeros(self.n_exps, self.input_dim, self.hidden_size))
        self.gate_weight = nn.Parameter(torch.zeros(self.input_dim, self.n_exps))
        self.noise_weight = nn.Parameter(torch.zeros(self.input_dim, self.n_exps)) if noisy_gating else None
        self.dropout = nn.Dropout(dropout_prob)

    def reset_parameters(self, std):
        """Experts' W_k ~ N(0, std); whitening biases, gate and noise weights zero (an even gate at start)."""
        with torch.no_grad():
            self.expert_weight.normal_(0.0, std)
            self.whitening_bias.zero_()
            self.gate_weight.zero_()
            if self.noise_weight is not None:
                self.noise_weight.zero_()

    def gates(self, x):
        """Gate weights (N, n_exps) of features ``x`` (N, input_dim); rows sum to 1."""
        logits = x @ self.gate_weight
        if self.noise_weight is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(x @ self.noise_weight)
        return torch.softmax(logits, dim=-1)

    def experts(self, x):
        """Whitened expert outputs (N, n_exps, hidden_size): ``(Dropout(x) - b_k) W_k``."""
        x = self.dropout(x)
        shift = torch.einsum("kd,kdh->kh", self.whitening_bias, self.expert_weight)
        return torch.einsum("nd,kdh->nkh", x, self.expert_weight) - shift

    def forward(self, x):
        """``x`` (..., input_dim) -> (..., hidden_size)."""
        shape = x.shape[:-1]
        x = x.reshape(-1, self.input_dim)
        out = torch.einsum("nk,nkh->nh", self.gates(x), self.experts(x))
        return out.reshape(*shape, self.hidden_size)


class UniSRec(ItemVectorSASRecMixin, SASRec):
    r"""UniSRec fine-tuned on one dataset (``train_stage``: ``inductive_ft`` | ``transductive_ft``)."""

    @staticmethod
    def required_features(config):
        return [config["text_feature"]]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # SASRec: Transformer, positions, LayerNorm, dropout (and an ID table)

        # hyper-parameters (defaults: properties/model/UniSRec.yaml)
        self.text_feature = self.required_features(config)[0]
        self.n_exps = config["n_exps"]
        self.adaptor_dropout_prob = config["adaptor_dropout_prob"]
        self.adaptor_noise = config["adaptor_noise"]
        self.temperature = config["temperature"]
        self.train_stage = config["train_stage"]
        self.seq_contrast_weight = config["seq_contrast_weight"]
        self.item_drop_ratio = config["item_drop_ratio"]
        self.missing_modality = missing_modality_setting(config, "UniSRec")

        if self.loss_type != "CE":
            raise ValueError(f"UniSRec: loss_type must be CE (softmax over cos / temperature), got {self.loss_type!r}")
        if self.train_stage not in TRAIN_STAGES:
            raise ValueError(f"UniSRec: train_stage must be one of {TRAIN_STAGES}, got {self.train_stage!r}")
        if isinstance(self.n_exps, bool) or not isinstance(self.n_exps, int) or self.n_exps < 1:
            raise ValueError(f"UniSRec: n_exps must be an integer >= 1, got {self.n_exps!r}")
        if not 0.0 <= float(self.adaptor_dropout_prob) < 1.0:
            raise ValueError(f"UniSRec: adaptor_dropout_prob must be in [0, 1), got {self.adaptor_dropout_prob!r}")
        if not isinstance(self.adaptor_noise, bool):
            raise ValueError(f"UniSRec: adaptor_noise must be True or False, got {self.adaptor_noise!r}")
        if not float(self.temperature) > 0.0:
            raise ValueError(f"UniSRec: temperature must be > 0, got {self.temperature!r}")
        if not float(self.seq_contrast_weight) >= 0.0:
            raise ValueError(f"UniSRec: seq_contrast_weight must be >= 0, got {self.seq_contrast_weight!r}")
        if not 0.0 <= float(self.item_drop_ratio) < 1.0:
            raise ValueError(f"UniSRec: item_drop_ratio must be in [0, 1), got {self.item_drop_ratio!r}")
        self.temperature = float(self.temperature)
        self.seq_contrast_weight = float(self.seq_contrast_weight)
        self.item_drop_ratio = float(self.item_drop_ratio)

        features = getattr(dataset, "mm_features", None)
        if features is None:
            raise TypeError(f"UniSRec needs a MultiModalSequentialDataset (item text features); "
                            f"got {type(dataset).__name__}")
        if self.text_feature not in features:
            raise KeyError(f"UniSRec: the dataset has no item features {self.text_feature!r}; known: {sorted(features)}")

        # layers: the frozen text table (kept out of checkpoints), the MoE adaptor, the ID table
        table = torch.as_tensor(features[self.text_feature])
        self.plm_embedding = keep_out_of_checkpoints(
            nn.Embedding.from_pretrained(table.float(), freeze=True, padding_idx=0))
        self.moe_adaptor = MoEAdaptor(table.shape[1], self.hidden_size, self.n_exps,
                                      self.adaptor_dropout_prob, self.adaptor_noise)
        if self.train_stage == "inductive_ft":
            del self.item_embedding  # text only: no ID table at all (SASRec.__init__ created one)
        else:  # cold items (recbole_mm.data.cold): ID rows from their text, never trained
            self.item_embedding = with_cold_items(self.item_embedding, dataset, [self.text_feature])
        self.missing = None
        if self.missing_modality != "zero":
            masks = dataset_missing_masks(dataset, [self.text_feature], "UniSRec")
            self.missing = MissingContent(masks, self.hidden_size, self.missing_modality)
        self.softmax = CatalogueSoftmax(config, dataset, self.n_items, "UniSRec")

        # initialisation: SASRec's for its layers (done), the adaptor's here
        self.moe_adaptor.reset_parameters(self.initializer_range)
        if self.missing is not None:
            self.missing.reset_parameters(lambda w: w.normal_(0.0, self.initializer_range))

    # ------------------------------------------------------------------ item vectors
    def _vectors(self, ids):
        """Item vectors of the 1-D ``ids``; PAD (id 0) is the zero vector."""
        vec = self.moe_adaptor(self.plm_embedding(ids))
        if self.missing is not None:
            vec = self.missing.replace(self.text_feature, ids, vec)
        if self.train_stage == "transductive_ft":
            vec = vec + self.item_embedding(ids)
        return vec * (ids > 0).unsqueeze(-1).to(vec.dtype)

    def item_vectors(self, item_ids):
        """Item vectors (*item_ids.shape, hidden_size), each distinct item through the adaptor once."""
        unique, inverse = torch.unique(item_ids.reshape(-1), return_inverse=True)
        return self._vectors(unique)[inverse].view(*item_ids.shape, self.hidden_size)

    def all_item_vectors(self):
        return self._vectors(torch.arange(self.n_items, device=self.position_embedding.weight.device))

    # sequence encoder: sequence_output / forward of ItemVectorSASRecMixin (SASRec over item_vectors)

    # ------------------------------------------------------------------ augmentation and losses
    def item_drop(self, item_seq, item_seq_len):
        """A view of each history with every item dropped with probability ``item_drop_ratio`` (at least
        one kept: the last), the kept items moved left in order; returns ``(seq, lengths)``.

        The draws are one (B, MAX_ITEM_LIST_LENGTH) block whatever the batch width, so a trimmed batch
        gets the same views as its padded version under the same random state."""
        batch, width = item_seq.shape
        draw = torch.rand(batch, max(width, self.max_seq_length), device=item_seq.device)[:, :width]
        positions = torch.arange(width, device=item_seq.device)[None]
        valid = positions < item_seq_len[:, None]
        keep = valid & (draw >= self.item_drop_ratio)
        last = positions == (item_seq_len - 1)[:, None]
        keep = keep | (last & ~keep.any(dim=1, keepdim=True))
        lengths = keep.sum(dim=1)
        order = torch.sort((~keep).long(), dim=1, stable=True).indices  # kept positions first, in order
        seq = item_seq.gather(1, order) * (positions < lengths[:, None]).to(item_seq.dtype)
        return seq, lengths

    def seq_contrast_loss(self, item_seq, item_seq_len):
        """Sequence-sequence InfoNCE: view 1 of history j against view 2 of every history of the batch
        (of every DDP rank), positive its own; cosine similarities / ``temperature``."""
        a = F.normalize(self.forward(*self.item_drop(item_seq, item_seq_len)), dim=-1)
        b = F.normalize(self.forward(*self.item_drop(item_seq, item_seq_len)), dim=-1)
        b_all, offset = gather_rows(b, differentiable=True)
        logits = a @ b_all.t() / self.temperature
        labels = torch.arange(a.size(0), device=a.device) + offset
        return F.cross_entropy(logits, labels, reduction="sum") * contrastive_scale(b_all.size(0))

    def _normalised_rows(self, ids):
        return F.normalize(self.item_vectors(ids), dim=-1)

    def _normalised_table(self):
        return F.normalize(self.all_item_vectors(), dim=-1)

    @property
    def loss_names(self):
        """Names of ``calculate_loss``'s terms, in its order (the contrastive term already weighted)."""
        return ("ce",) + (("seq_contrast",) if self.seq_contrast_weight > 0 else ())

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]
        s = F.normalize(self.forward(item_seq, item_seq_len), dim=-1)
        # logits cos(s, v_i) / temperature: full softmax (in chunks within ce_memory_mb) or softmax: sampled
        ce = self.softmax(s / self.temperature, target, self._normalised_rows, all_items=self._normalised_table)
        if self.seq_contrast_weight <= 0:
            return ce
        return ce, self.seq_contrast_weight * self.seq_contrast_loss(item_seq, item_seq_len)

    # ------------------------------------------------------------------ scores
    def predict(self, interaction):
        s = F.normalize(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]), dim=-1)
        return (s * self._normalised_rows(interaction[self.ITEM_ID])).sum(-1) / self.temperature

    def full_sort_predict(self, interaction):
        s = F.normalize(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]), dim=-1)
        return s @ self._normalised_table().t() / self.temperature
