"""Moved: SICSRec's stage 1 lives in the package :mod:`recbole_mm.model.sicsrec` (kept so existing
imports, pickled datasets and ``python -m recbole_mm.model.sicsrec_stage1 --dataset=NAME`` keep working).

``pairs`` (a dataset's pairs), ``image_tower``, ``alignment`` (fine-tuning, export, ``run_stage1``),
``dataset`` (``SICSRecDataset``), ``cli`` (``main``), ``settings`` (defaults, feature names).
"""

import sys

from recbole_mm.data.dataset import MultiModalSequentialDataset  # noqa: F401
from recbole_mm.features import sha256_strings  # noqa: F401
from recbole_mm.model.sicsrec._runtime import _all_gather_object, _barrier, _free_memory  # noqa: F401
from recbole_mm.model.sicsrec.alignment import (  # noqa: F401
    SFT_KEYS,
    SFT_LOSSES,
    STAGE1_VERSION,
    TEXT_POOLINGS,
    ProjectionHead,
    Stage1Aligner,
    _device,
    build_aligner,
    cross_infonce,
    export_features,
    logger,
    pair_infonce,
    run_stage1,
    stage1_inputs,
    train_alignment,
)
from recbole_mm.model.sicsrec.cli import main
from recbole_mm.model.sicsrec.dataset import SICSRecDataset  # noqa: F401
from recbole_mm.model.sicsrec.image_tower import (  # noqa: F401
    IMAGE_POOLINGS,
    ImageTower,
    _block_list,
    _file_sig,
    _image_paths,
    _open_rgb,
    frozen_modules,
    keep_frozen_in_eval,
)
from recbole_mm.model.sicsrec.pairs import (  # noqa: F401
    PAIR_MINERS,
    LLMPairMiner,
    _item_titles,
    _llm_pairs,
    _pairs_tensor,
    mine_cooccurrence,
    pair_query,
    queries_checksum,
    read_pair_manifest,
    read_pairs,
    stage1_pairs,
    user_sequences,
    write_pairs,
)
from recbole_mm.model.sicsrec.settings import (  # noqa: F401
    MODALITIES,
    base_feature_names,
    modalities,
    sft_seed,
    stage1_feature_names,
)
from recbole_mm.utils import dist_rank_world as _dist_info  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
