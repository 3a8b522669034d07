"""Baselines a multimodal sequential-recommendation paper is expected to report.

* :class:`ContentSASRec`: SASRec without item IDs (MoRec-style, Yuan et al., "Where to Go Next
  for Recommender Systems? ID- vs. Modality-based Recommender Models Revisited", SIGIR 2023).
  An item is the projection of its frozen content features; that one vector is both the
  sequence input and the candidate vector every item is scored with. No ID embedding exists,
  so the model can rank items it has never seen interacted with, and it shows how far the
  features alone go.
* :class:`IDContentSASRec`: SASRec whose item vector is the ID embedding plus the projected
  content features, used for the sequence input and for scoring.

Both are RecBole ``SASRec`` s (same Transformer, positions, LayerNorm, dropout, CE/BPR loss,
initialisation); only the item vector differs. The CE loss can be ``softmax: sampled``
(:mod:`recbole_mm.model.softmax`). The feature tables are frozen embeddings held
by :class:`recbole_mm.model.layers.ContentProjector`, so no gradient ever reaches them and the
trainer never gives them to the optimizer. PAD (item 0) is always the zero vector.
Defaults: ``properties/model/ContentSASRec.yaml`` and ``IDContentSASRec.yaml``.

Items without content (no text, no or an unreadable image): ``missing_modality`` (``zero``, the
default, projects their zero feature row, so in ContentSASRec all of them are one and the same
vector and a user whose next item has no content can only be served by chance; ``learned``: one
trained vector per modality, which does not change that for ContentSASRec; ``id``: one trained
vector per item without content, the recommended setting for ContentSASRec). See
:class:`recbole_mm.model.layers.MissingContent`.
"""

import torch
import torch.nn as nn
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_mm.model.layers import (ContentProjector, ItemVectorSASRecMixin, dataset_missing_masks,
                                     missing_modality_setting, with_cold_items)
from recbole_mm.model.softmax import CatalogueSoftmax
from recbole_mm.registry import ModelSpec

_MODALITIES = ("text", "image", "both")


# the model protocol (recbole_mm.registry, docs/ADDING_A_MODEL.md); trim_safe: outputs unchanged when
# batches are cut to their longest history (tests/test_lazy.py)
MODEL_SPECS = (
    ModelSpec(name="ContentSASRec", model="recbole_mm.model.baselines:ContentSASRec", role="baseline",
              dataset="recbole_mm.data.dataset:MultiModalSequentialDataset", trim_safe=True,
              features="recbole_mm.model.baselines:ContentSASRec.required_features"),
    ModelSpec(name="IDContentSASRec", model="recbole_mm.model.baselines:IDContentSASRec", role="baseline",
              dataset="recbole_mm.data.dataset:MultiModalSequentialDataset", trim_safe=True,
              features="recbole_mm.model.baselines:IDContentSASRec.required_features"),
)


class _FeatureSASRec(ItemVectorSASRecMixin, SASRec):
    """SASRec whose item vectors come from :meth:`item_vectors` instead of ``item_embedding``."""

    use_id_embedding = True

    @staticmethod
    def required_features(config):
        modality = config["content_modality"]
        names = {"text": [config["text_feature"]], "image": [config["image_feature"]]}
        names["both"] = names["text"] + names["image"]
        if modality not in names:
            raise ValueError(f"content_modality must be one of {_MODALITIES}, got {modality!r}")
        return names[modality]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        name = type(self).__name__
        self.feature_names = self.required_features(config)
        features = getattr(dataset, "mm_features", None)
        if features is None:
            raise TypeError(
                f"{name} needs a MultiModalSequentialDataset (item features); got {type(dataset).__name__}"
            )
        missing = [n for n in self.feature_names if n not in features]
        if missing:
            raise KeyError(f"{name}: the dataset has no item features {missing}; known: {sorted(features)}")
        self.missing_modality = missing_modality_setting(config, name)
        self.content = ContentProjector(
            {n: features[n] for n in self.feature_names},
            self.hidden_size,
            dropout_prob=config["content_dropout_prob"],
            missing=(dataset_missing_masks(dataset, self.feature_names, name)
                     if self.missing_modality != "zero" else None),
            missing_modality=self.missing_modality,
        )
        for proj in self.content.proj.values():
            nn.init.xavier_normal_(proj.weight)
            nn.init.zeros_(proj.bias)
        if not self.use_id_embedding:
            # MoRec-style: no ID table at all (SASRec.__init__ created one)
            del self.item_embedding
        else:  # cold items (recbole_mm.data.cold): ID rows from their content features, plus their content
            self.item_embedding = with_cold_items(self.item_embedding, dataset, self.feature_names)
        self.softmax = CatalogueSoftmax(config, dataset, self.n_items, name)
        if self.content.missing is not None:
            # drawn like SASRec's embeddings, after every other weight (those stay as with zero)
            self.content.missing.reset_parameters(lambda w: w.normal_(0.0, self.initializer_range))
            self.content.match_missing_scale()  # at the projected content's scale

    # ------------------------------------------------------------------ item vectors
    def item_vectors(self, item_ids):
        """Item vectors (*item_ids.shape, hidden_size); PAD (id 0) is the zero vector."""
        vec = self.content(item_ids)
        if self.use_id_embedding:
            vec = vec + self.item_embedding(item_ids)
        return vec * (item_ids > 0).unsqueeze(-1).to(vec.dtype)

    def all_item_vectors(self):
        return self.item_vectors(torch.arange(self.n_items, device=self.position_embedding.weight.device))

    # sequence encoder: sequence_output / forward of ItemVectorSASRecMixin (SASRec over item_vectors)

    # ------------------------------------------------------------------ losses and scores
    def calculate_loss(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos_score = (seq_output * self.item_vectors(pos_items)).sum(-1)
            neg_score = (seq_output * self.item_vectors(neg_items)).sum(-1)
            return self.loss_fct(pos_score, neg_score)
        # full softmax (in chunks within ce_memory_mb) or softmax: sampled
        return self.softmax(seq_output, pos_items, self.item_vectors, all_items=self.all_item_vectors)

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.item_vectors(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.all_item_vectors().t()


class ContentSASRec(_FeatureSASRec):
    r"""Content-only SASRec (MoRec-style): item vector = projection of frozen item features, no IDs."""

    use_id_embedding = False


class IDContentSASRec(_FeatureSASRec):
    r"""ID + content SASRec: item vector = ID embedding + projection of frozen item features."""

    use_id_embedding = True
