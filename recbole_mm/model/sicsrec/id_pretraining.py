"""SICSRec step 1: the ID-only SASRec that stage 2 starts from (ID pre-training), named and shared.

:class:`~recbole_mm.model.sicsrec.trainer.SICSRecTrainer` trains step 1 (RecBole's own ``SASRec``, CE
loss, :func:`step1_config`) once and saves it as ``<checkpoint_dir>/SICSRec-step1-<dataset>-<hash>.pth``
(:func:`step1_path`), the hash being :func:`step1_key`: a checksum of the training and validation
samples and every setting of :data:`STEP1_KEYS`. A later run with the same key reuses the file; in a
study, a finished SASRec run with the same key publishes its checkpoint under that name into
``<share_dir>/step1`` (:func:`publish_step1`, SICSRec's ``publishers`` entry in its ``MODEL_SPECS``).

Step 1 is part of stage 2. It is not stage 1 (the content alignment that builds the feature tables,
:mod:`recbole_mm.model.sicsrec.alignment`); docs/SICSRec.md, *Glossary*.
"""

import copy
import hashlib
import json
import os
from logging import getLogger

import numpy as np
from recbole.utils import set_color

from recbole_mm.atomic import torch_save_atomic
from recbole_mm.compat import torch_load
from recbole_mm.registry import get_spec
from recbole_mm.utils import jsonable


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
