"""SICSRec stage 1: content-modality semantic alignment (the feature tables stage 2 reads).

1. **Pairs** (:mod:`recbole_mm.model.sicsrec.pairs`): per user, the training-prefix item most
   similar to the user's last training item (``pair_miner: cooccurrence | llm``, or a
   ready-made ``pair_file``).
2. **Alignment fine-tuning**: a text encoder and/or an image encoder (any ``transformers``
   models; top ``k`` layers trainable; the image tower is (any pooling but logits)
   :class:`~recbole_mm.model.sicsrec.image_tower.EncoderImageTower`, cached) with trained projection heads, on
   the pairs, with in-batch InfoNCE losses ``t2t`` (target text vs similar item's text), ``i2i``
   (same on images) and ``t2i`` (an item's text vs its own image), temperature ``sft_tau``.
   Text-only and image-only datasets use the losses their modality allows.
3. **Export**: every item of the dataset is encoded with the fine-tuned encoders and saved to
   the feature store under its own name (``stage1_text_feature`` / ``stage1_image_feature``,
   default ``text_sicsrec`` / ``image_sicsrec``), with a manifest whose key covers the pairs,
   the encoders and every ``sft_*`` setting: a later run with the same inputs reuses it.

:func:`run_stage1` does all three for a dataset. ``SICSRecDataset``
(:mod:`recbole_mm.model.sicsrec.dataset`, the dataset class of SICSRec) runs it when SICSRec asks
for a stage-1 feature that is missing or stale, so ``python run_recbole_mm.py --model=SICSRec
--dataset=...`` needs no separate command. Stage 1 alone (:mod:`recbole_mm.model.sicsrec.cli`):
``python -m recbole_mm.model.sicsrec_stage1 --dataset=Bili_Food [--key=value ...]``.

Stage 1 is not stage 2's *step 1* (the ID SASRec that SICSRec starts from,
:mod:`recbole_mm.model.sicsrec.id_pretraining`); docs/SICSRec.md, *Glossary*.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_mm.features.chunks import sha256_strings
from recbole_mm.model.sicsrec._runtime import _barrier, _free_memory
from recbole_mm.model.sicsrec.image_tower import _file_sig, _image_paths, make_image_tower
from recbole_mm.model.sicsrec.pairs import stage1_pairs
from recbole_mm.model.sicsrec.settings import base_feature_names, modalities, setting, sft_seed, stage1_feature_names
from recbole_mm.utils import dist_rank_world as _dist_info

logger = logging.getLogger(__name__)

STAGE1_VERSION = 1
SFT_LOSSES = ("t2t", "i2i", "t2i")
TEXT_POOLINGS = ("mean", "cls", "pooler")

# every config key that changes the exported features (their values enter the manifest key)
SFT_KEYS = (
    "sft_text_encoder", "sft_image_encoder", "sft_text_trainable_layers", "sft_image_trainable_layers",
    "sft_text_pooling", "sft_text_export_pooling", "sft_image_pooling", "sft_export", "sft_max_length",
    "sft_proj_hidden", "sft_proj_dim", "sft_train_adapters", "sft_normalize", "sft_mask_self",
    "sft_mask_duplicates", "sft_tau", "sft_losses", "sft_optimizer", "sft_learning_rate", "sft_epochs",
    "sft_batch_size",
)


# ============================================================================ encoders


class ProjectionHead(nn.Sequential):
    """``Linear(in, hidden) -> ReLU -> Linear(hidden, out)`` (the official 768->128->64 adapter)."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


# ============================================================================ losses


def pair_infonce(a, p, ids_a, ids_p, tau, normalize=True, mask_self=True, mask_duplicates=True):
    """In-batch InfoNCE of anchors ``a`` against their positives ``p`` (the official L_t2t / L_i2i).

    Logits ``[a p^T ; a a^T] / tau`` (B x 2B), label = the diagonal of the first block.
    ``mask_self`` removes ``a_i . a_i`` from the denominator; ``mask_duplicates`` removes
    negatives that are the same item as the anchor's positive or as the anchor itself.
    """
    if normalize:
        a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    b = a.size(0)
    eye = torch.eye(b, dtype=torch.bool, device=a.device)
    ap = a @ p.t() / tau
    aa = a @ a.t() / tau
    if mask_duplicates:
        dup_ap = (ids_p[None, :] == ids_p[:, None]) | (ids_p[None, :] == ids_a[:, None])
        dup_aa = (ids_a[None, :] == ids_p[:, None]) | (ids_a[None, :] == ids_a[:, None])
        ap = ap.masked_fill(dup_ap & ~eye, float("-inf"))
        aa = aa.masked_fill(dup_aa & ~eye, float("-inf"))
    if mask_self:
        aa = aa.masked_fill(eye, float("-inf"))
    logits = torch.cat([ap, aa], dim=1)
    return F.cross_entropy(logits, torch.arange(b, device=a.device))


def cross_infonce(u, v, ids, tau, normalize=True, mask_duplicates=True):
    """Symmetric InfoNCE between each item's text ``u`` and its own image ``v`` (L_t2i)."""
    if normalize:
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    s = u @ v.t() / tau
    if mask_duplicates:
        eye = torch.eye(s.size(0), dtype=torch.bool, device=s.device)
        s = s.masked_fill((ids[None, :] == ids[:, None]) & ~eye, float("-inf"))
    target = torch.arange(s.size(0), device=s.device)
    return F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)


# ============================================================================ aligner


class Stage1Aligner(nn.Module):
    """Text tower and/or image tower, each with a projection head, over internal item ids."""

    def __init__(self, text=None, image=None, proj_hidden=128, proj_dim=64):
        super().__init__()
        self.text = text
        self.image = image
        self.text_head = ProjectionHead(text.out_dim, proj_hidden, proj_dim) if text is not None else None
        self.image_head = ProjectionHead(image.out_dim, proj_hidden, proj_dim) if image is not None else None

    def encoder_parameters(self):
        return [p for m in (self.text, self.image) if m is not None for p in m.parameters() if p.requires_grad]

    def head_parameters(self):
        return [p for m in (self.text_head, self.image_head) if m is not None for p in m.parameters()]


def stage1_inputs(dataset, mods):
    """What the stage-1 encoders read, without loading them: per modality the encoder name, the
    per-item inputs (texts / image paths, aligned to internal ids), a ``valid`` mask and the
    manifest-key part."""
    from recbole_mm.features.encoders import encoder_fingerprint, resolve_encoder
    from recbole_mm.features.text import read_item_texts

    config = dataset.config
    base = base_feature_names(config)
    inputs = {}
    if "text" in mods:
        spec = dataset.feature_spec(base["text"])
        enc_name = setting(config, "sft_text_encoder") or spec.get("encoder") or "default"
        pooling = setting(config, "sft_text_pooling") or spec.get("pooling") or "mean"
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"sft_text_pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
        item_file = os.path.join(config["data_path"], f"{dataset.dataset_name}.item")
        tokens, texts = read_item_texts(item_file, spec.get("fields"), spec.get("template"), spec.get("id_field"),
                                        missing_values=spec.get("missing_values"))
        by_token = dict(zip(map(str, tokens), texts))
        aligned = [by_token.get(str(t), "") if i > 0 else "" for i, t in
                   enumerate(dataset.field2id_token[dataset.iid_field])]
        inputs["text"] = {
            "encoder": enc_name, "pooling": pooling, "feature": base["text"],
            "valid": torch.tensor([bool(t) for t in aligned], dtype=torch.bool),
            "key": {"encoder": str(enc_name), "fingerprint": encoder_fingerprint(resolve_encoder(enc_name)),
                    "pooling": pooling, "texts": sha256_strings(aligned), "feature": base["text"]},
        }
    if "image" in mods:
        spec = dataset.feature_spec(base["image"])
        enc_name = setting(config, "sft_image_encoder") or spec.get("encoder")
        if not enc_name:
            raise ValueError("SICSRec stage 1 with images needs sft_image_encoder (or an encoder in the "
                             f"'{base['image']}' feature spec): a hub name or a local vision model folder")
        from recbole_mm.data import image_encoders
        from recbole_mm.data.images import parse_background

        background = parse_background(spec.get("image_background"), f"feature {base['image']!r}: image_background")
        paths = _image_paths(dataset, base["image"])
        inputs["image"] = {
            "encoder": enc_name, "paths": paths, "feature": base["image"], "background": background,
            "valid": torch.tensor([p is not None for p in paths], dtype=torch.bool),
            "key": {"encoder": image_encoders.describe(enc_name),
                    # the tower (recbole_mm.encoders.image since 2026-12-04; ImageTower before, and for logits)
                    **({} if setting(config, "sft_image_pooling") == "logits" else {"tower": "encoders.image"}),
                    "fingerprint": image_encoders.fingerprint(enc_name, encoder_fingerprint),
                    "images": _file_sig(paths), "feature": base["image"], "image_background": list(background)},
        }
    return inputs


def sft_lora(config):
    """``sft_peft: lora``: the LoRA settings (``sft_lora_*``) for both encoders, else None."""
    peft = setting(config, "sft_peft", keep_none=True)
    if peft is None:
        return None
    if peft != "lora":
        raise ValueError(f"sft_peft must be ~ (tune the top layers themselves) or lora, got {peft!r}")
    return {"r": int(setting(config, "sft_lora_r")), "alpha": float(setting(config, "sft_lora_alpha")),
            "dropout": float(setting(config, "sft_lora_dropout")),
            "target": setting(config, "sft_lora_target", keep_none=True)}


def build_aligner(dataset, inputs):
    """The :class:`Stage1Aligner` for the modalities in ``inputs`` (see :func:`stage1_inputs`)."""
    from recbole_mm.encoders.text import FinetuneTextEncoder, load_text_encoder

    config = dataset.config
    lora = sft_lora(config)
    text = image = None
    if "text" in inputs:
        encoder, tokenizer = load_text_encoder(inputs["text"]["encoder"])
        ids, mask = dataset.text_inputs(inputs["text"]["feature"], tokenizer, int(setting(config, "sft_max_length")))
        width = max(1, int(mask.sum(1).max()))  # drop columns that are padding for every item
        ids, mask = ids[:, :width].contiguous(), mask[:, :width].contiguous()
        text = FinetuneTextEncoder(encoder, ids, mask, trainable_layers=int(setting(config, "sft_text_trainable_layers")),
                                   pooling=inputs["text"]["pooling"], unique_items=True,
                                   cache_lower=bool(setting(config, "sft_cache_lower")),
                                   cache_mb=setting(config, "sft_cache_mb", keep_none=True),
                                   cache_dtype=setting(config, "sft_cache_dtype"), lora=lora)
    if "image" in inputs:
        image = make_image_tower(inputs["image"]["encoder"], inputs["image"]["paths"],
                                 int(setting(config, "sft_image_trainable_layers")),
                                 setting(config, "sft_image_pooling"), background=inputs["image"].get("background"),
                                 cache_mb=setting(config, "sft_cache_mb", keep_none=True),
                                 cache_dtype=setting(config, "sft_cache_dtype"), lora=lora)
    return Stage1Aligner(text, image, int(setting(config, "sft_proj_hidden")), int(setting(config, "sft_proj_dim")))


def train_alignment(aligner, pairs, valid, config, device, show_progress=False):
    """Fine-tune ``aligner`` on ``pairs`` (P x 2 internal ids); returns the per-epoch loss history."""
    from tqdm.auto import tqdm

    losses_on = [x for x in (setting(config, "sft_losses") or []) if x]
    bad = [x for x in losses_on if x not in SFT_LOSSES]
    if bad:
        raise ValueError(f"sft_losses must be a subset of {SFT_LOSSES}, got {bad}")
    has_text, has_image = aligner.text is not None, aligner.image is not None
    active = [x for x in losses_on if (x == "t2t" and has_text) or (x == "i2i" and has_image)
              or (x == "t2i" and has_text and has_image)]
    tau = float(setting(config, "sft_tau"))
    norm = bool(setting(config, "sft_normalize"))
    mask_self = bool(setting(config, "sft_mask_self"))
    mask_dup = bool(setting(config, "sft_mask_duplicates"))
    epochs = int(setting(config, "sft_epochs"))
    batch_size = int(setting(config, "sft_batch_size"))
    history = []
    if len(pairs) < 2 or not active or epochs <= 0:
        logger.warning("SICSRec stage 1: nothing to fine-tune (%d pairs, losses %s): exporting the encoders as "
                       "they are", len(pairs), active)
        return history
    params = aligner.encoder_parameters()
    if bool(setting(config, "sft_train_adapters")):
        params += aligner.head_parameters()
    else:
        for p in aligner.head_parameters():
            p.requires_grad = False
    if not params:
        logger.warning("SICSRec stage 1: no trainable parameter (0 trainable layers and untrained heads)")
        return history
    opt_name = str(setting(config, "sft_optimizer")).lower()
    lr = float(setting(config, "sft_learning_rate"))
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if opt_name not in optimizers:
        raise ValueError(f"sft_optimizer must be one of {sorted(optimizers)}, got {opt_name!r}")
    optimizer = optimizers[opt_name](params, lr=lr)
    gen = torch.Generator().manual_seed(sft_seed(config))
    aligner.train()
    n = len(pairs)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        sums = {x: 0.0 for x in active}
        steps = 0
        batches = range(0, n, batch_size)
        for b in tqdm(batches, desc=f"SICSRec stage-1 SFT {epoch + 1}/{epochs}", disable=not show_progress,
                      dynamic_ncols=True):
            rows = pairs[perm[b:b + batch_size]]
            a, p = rows[:, 0], rows[:, 1]
            terms = {}
            u = v = None
            if has_text:
                keep = valid["text"][a] & valid["text"][p]
                z = aligner.text_head(aligner.text(torch.cat([a, p]).to(device)))
                u = (z[: len(a)], z[len(a):], keep.to(device))
                if "t2t" in active and int(keep.sum()) >= 2:
                    k = keep.to(device)
                    terms["t2t"] = pair_infonce(u[0][k], u[1][k], a.to(device)[k], p.to(device)[k], tau, norm,
                                                mask_self, mask_dup)
            if has_image:
                feats, ok = aligner.image(torch.cat([a, p]))
                ok = ok.to(device)
                z = aligner.image_head(feats)
                keep = ok[: len(a)] & ok[len(a):]
                v = (z[: len(a)], z[len(a):], ok[: len(a)])
                if "i2i" in active and int(keep.sum()) >= 2:
                    terms["i2i"] = pair_infonce(v[0][keep], v[1][keep], a.to(device)[keep], p.to(device)[keep], tau,
                                                norm, mask_self, mask_dup)
            if "t2i" in active and u is not None and v is not None:
                keep = (valid["text"][a].to(device)) & v[2]
                if int(keep.sum()) >= 2:
                    terms["t2i"] = cross_infonce(u[0][keep], v[0][keep], a.to(device)[keep], tau, norm, mask_dup)
            if not terms:
                continue
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for x, val in terms.items():
                sums[x] += float(val.detach())
            steps += 1
        row = {x: sums[x] / max(1, steps) for x in active}
        history.append(row)
        logger.info("SICSRec stage-1 SFT epoch %d/%d: %s", epoch + 1, epochs,
                    ", ".join(f"L_{x} {v:.4f}" for x, v in row.items()))
    aligner.eval()
    return history


@torch.no_grad()
def export_features(aligner, n_items, config, device, batch_size=256):
    """modality -> float32 (n_items - 1, dim) matrix for internal ids 1..n-1 (PAD excluded)."""
    aligner.eval()
    out = {}
    use_proj = setting(config, "sft_export")
    if use_proj not in ("encoder", "projection"):
        raise ValueError(f"sft_export must be 'encoder' or 'projection', got {use_proj!r}")
    rows = torch.arange(1, n_items)
    if aligner.text is not None:
        pooling = aligner.text.pooling
        export_pooling = setting(config, "sft_text_export_pooling") or pooling
        if export_pooling not in TEXT_POOLINGS:
            raise ValueError(f"sft_text_export_pooling must be one of {TEXT_POOLINGS}, got {export_pooling!r}")
        aligner.text.pooling = export_pooling
        parts = []
        for b in range(0, len(rows), batch_size):
            z = aligner.text(rows[b:b + batch_size].to(device))
            if use_proj == "projection":
                z = aligner.text_head(z)
            parts.append(z.float().cpu())
        aligner.text.pooling = pooling
        out["text"] = torch.cat(parts).numpy() if parts else np.zeros((0, 1), np.float32)
    if aligner.image is not None:
        parts = []
        for b in range(0, len(rows), batch_size):
            z, ok = aligner.image(rows[b:b + batch_size])
            if use_proj == "projection":
                z = aligner.image_head(z) * ok.to(z.device)[:, None]
            parts.append(z.float().cpu())
        out["image"] = torch.cat(parts).numpy() if parts else np.zeros((0, 1), np.float32)
    return out


# ============================================================================ orchestration


def _device(config):
    dev = setting(config, "sft_device")
    if dev:
        return torch.device(dev)
    return config["device"] if "device" in config and config["device"] is not None else torch.device("cpu")


def run_stage1(dataset, show_progress=None):
    """Produce (or reuse) the stage-1 features of ``dataset``; returns name -> FeatureMatrix."""
    from recbole_mm.features.store import FeatureStore

    config = dataset.config
    show_progress = bool(config["show_progress"]) if show_progress is None else show_progress
    mods = modalities(config)
    names = stage1_feature_names(config)
    store = FeatureStore(config["data_path"], dataset.dataset_name)
    t0 = time.perf_counter()
    pairs, pair_info = stage1_pairs(dataset, show_progress)
    id2token = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    inputs = stage1_inputs(dataset, mods)
    key = {
        "type": "sicsrec_stage1", "stage1_version": STAGE1_VERSION, "modalities": mods,
        "dataset_tokens": sha256_strings(id2token),
        "pairs_checksum": sha256_strings(f"{id2token[a]}|{id2token[b]}" for a, b in pairs.tolist()),
        "sft": dict({k: setting(config, k, keep_none=True) for k in SFT_KEYS}, sft_seed=sft_seed(config),
                    # a float16 lower-layer cache changes the features slightly (float32: exact, as before)
                    **({"sft_cache_dtype": "float16"} if setting(config, "sft_cache_dtype") == "float16" else {}),
                    # LoRA instead of tuning the top layers (absent: the key of tables built before it existed)
                    **({"sft_lora": sft_lora(config)} if sft_lora(config) is not None else {})),
        "encoders": {m: inputs[m]["key"] for m in mods},
    }
    fresh = all(store.is_fresh(names[m], key) for m in mods)
    rank, world = _dist_info()
    if not fresh and rank != 0:  # under torch.distributed rank 0 fine-tunes and saves, the others load
        _barrier()
        fresh = all(store.is_fresh(names[m], key) for m in mods)
        if not fresh:
            raise RuntimeError("SICSRec stage 1: rank 0 did not produce the stage-1 features (see its log)")
    if fresh:
        out = {names[m]: store.load(names[m]) for m in mods}
        logger.info("SICSRec stage 1: features %s are up to date: reused", sorted(out))
        return out
    device = _device(config)
    torch.manual_seed(sft_seed(config))
    aligner = build_aligner(dataset, inputs).to(device)
    valid = {m: inputs[m]["valid"] for m in mods}
    t1 = time.perf_counter()
    history = train_alignment(aligner, pairs, valid, config, device, show_progress)
    t2 = time.perf_counter()
    mats = export_features(aligner, len(id2token), config, device, int(setting(config, "sft_export_batch_size")))
    t3 = time.perf_counter()
    out = {}
    for m in mods:
        miss = ~valid[m][1:].numpy()
        if m == "image":
            miss = miss | ~aligner.image.valid[1:].numpy()  # unreadable files found while encoding
        manifest = dict(key, modality=m, pairs=pair_info, sft_history=history,
                        timings_s={"pairs_and_setup": round(t1 - t0, 3), "sft": round(t2 - t1, 3),
                                   "export": round(t3 - t2, 3)})
        out[names[m]] = store.save(names[m], id2token[1:], mats[m], miss, manifest)
    logger.info("SICSRec stage 1 done in %.1fs (SFT %.1fs, export %.1fs): %s", t3 - t0, t2 - t1, t3 - t2,
                {n: tuple(fm.matrix.shape) for n, fm in out.items()})
    del aligner
    _free_memory()
    if world > 1:
        _barrier()
    return out
