"""SICSRec (Zhou, Pan, Ming, Frontiers of Computer Science 2025): the package, one module per job.

Stage 1 (content alignment; builds the item feature tables):

* ``pairs``: per-user sequences and queries, the ``cooccurrence`` and LLM pair miners, pair files,
  and :func:`stage1_pairs` (a dataset's pairs from its ``pair_*`` settings);
* ``image_tower``: the fine-tuned vision model over item ids, and each item's image file;
* ``alignment``: the alignment fine-tuning (losses, projection heads, ``sft_*``), the export to the
  feature store, and :func:`run_stage1` (all of stage 1 for a dataset, reused when up to date);
* ``dataset``: :class:`SICSRecDataset`, which runs stage 1 when SICSRec asks for its tables;
* ``cli``: stage 1 alone, ``python -m recbole_mm.model.sicsrec_stage1 --dataset=NAME``.

Stage 2 (the recommender):

* ``model``: :class:`SICSRec` and its ``MODEL_SPECS`` entry (recbole_mm.registry);
* ``id_pretraining``: step 1, the ID SASRec stage 2 starts from (its config, checkpoint name and key,
  publishing a study's SASRec run as step 1);
* ``trainer``: :class:`SICSRecTrainer`, step 1 then step 2.

``settings`` holds the YAML defaults (``properties/model/SICSRec.yaml``) for calls with a partial
config, and the feature names a config reads. "Stage 1" and "step 1" are different things:
docs/SICSRec.md, *Glossary*.

Importing this package loads none of its modules: the names below are imported when first used
(``from recbole_mm.model.sicsrec import SICSRec``), so ``recbole_mm.model.sicsrec.pairs`` and the old
module ``recbole_mm.model.sicsrec_pairs`` stay light, and a checkpoint that pickled
``recbole_mm.model.sicsrec.SICSRec`` (the module this package replaces) still loads.
"""

from recbole_mm.utils import lazy_exports

# name -> module of this package that defines it: every name of the former recbole_mm/model/sicsrec.py,
# and the entry points of each part
_EXPORTS = {
    # stage 2: the model
    "SICSRec": "model", "MODEL_SPECS": "model", "ID_ENCODER_PREFIXES": "model", "_CHOICES": "model",
    "_ADAPTER_POSITIONS": "model", "_REQUIRED": "model",
    # stage 2: step 1, the ID SASRec
    "STEP1_KEYS": "id_pretraining", "BUCKETING_KEYS": "id_pretraining", "step1_config": "id_pretraining",
    "data_checksum": "id_pretraining", "step1_key": "id_pretraining", "step1_path": "id_pretraining",
    "publish_step1": "id_pretraining", "_barrier": "id_pretraining", "_step1_share_dir": "id_pretraining",
    "_history_of": "id_pretraining",
    # stage 2: the trainer
    "SICSRecTrainer": "trainer",
    # stage 1
    "SICSRecDataset": "dataset", "run_stage1": "alignment", "stage1_pairs": "pairs", "LLMPairMiner": "pairs",
    # settings
    "base_feature_names": "settings", "modalities": "settings", "stage1_feature_names": "settings",
    "sft_seed": "settings",
}

__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
