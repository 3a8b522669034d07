"""SICSRec stage 1: content-modality semantic alignment, and the dataset that runs it on demand.

1. **Pairs** (:mod:`recbole_mm.model.sicsrec_pairs`): per user, the training-prefix item most
   similar to the user's last training item (``pair_miner: cooccurrence | llm``, or a
   ready-made ``pair_file``).
2. **Alignment fine-tuning**: a text encoder and/or an image encoder (any ``transformers``
   models; top ``k`` layers trainable) with trained projection heads, on the pairs, with
   in-batch InfoNCE losses ``t2t`` (target text vs similar item's text), ``i2i`` (same on
   images) and ``t2i`` (an item's text vs its own image), temperature ``sft_tau``.
   Text-only and image-only datasets use the losses their modality allows.
3. **Export**: every item of the dataset is encoded with the fine-tuned encoders and saved to
   the feature store under its own name (``stage1_text_feature`` / ``stage1_image_feature``,
   default ``text_sicsrec`` / ``image_sicsrec``), with a manifest whose key covers the pairs,
   the encoders and every ``sft_*`` setting: a later run with the same inputs reuses it.

``SICSRecDataset`` (the dataset class of :class:`~recbole_mm.model.sicsrec.SICSRec`) runs
these steps when SICSRec asks for a stage-1 feature that is missing or stale, so
``python run_recbole_mm.py --model=SICSRec --dataset=...`` needs no separate command. Stage 1
alone: ``python -m recbole_mm.model.sicsrec_stage1 --dataset=Bili_Food [--key=value ...]``.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import time

import numpy as np

from recbole_mm.data.extract import sha256_strings
import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_mm.data.dataset import MultiModalSequentialDataset
from recbole_mm.model.sicsrec_pairs import (
    LLMPairMiner,
    mine_cooccurrence,
    pair_query,
    queries_checksum,
    read_pair_manifest,
    read_pairs,
    user_sequences,
    write_pairs,
)
from recbole_mm.utils import dist_rank_world as _dist_info

logger = logging.getLogger(__name__)

STAGE1_VERSION = 1
MODALITIES = {"text": ["text"], "image": ["image"], "both": ["text", "image"]}
SFT_LOSSES = ("t2t", "i2i", "t2i")
PAIR_MINERS = ("cooccurrence", "llm")
TEXT_POOLINGS = ("mean", "cls", "pooler")
IMAGE_POOLINGS = ("pooler", "cls", "mean", "logits")

# every config key that changes the exported features (their values enter the manifest key)
SFT_KEYS = (
    "sft_text_encoder", "sft_image_encoder", "sft_text_trainable_layers", "sft_image_trainable_layers",
    "sft_text_pooling", "sft_text_export_pooling", "sft_image_pooling", "sft_export", "sft_max_length",
    "sft_proj_hidden", "sft_proj_dim", "sft_train_adapters", "sft_normalize", "sft_mask_self",
    "sft_mask_duplicates", "sft_tau", "sft_losses", "sft_optimizer", "sft_learning_rate", "sft_epochs",
    "sft_batch_size",
)


def _cfg(config, key, default=None):
    value = config[key] if key in config else None
    return default if value is None else value


def modalities(config):
    modality = _cfg(config, "content_modality", "text")
    if modality not in MODALITIES:
        raise ValueError(f"content_modality must be one of {tuple(MODALITIES)}, got {modality!r}")
    return MODALITIES[modality]


def base_feature_names(config):
    """modality -> feature-store name of the raw (not aligned) features."""
    return {m: _cfg(config, f"{m}_feature", m) for m in modalities(config)}


def sft_seed(config):
    """Seed of stage 1: ``sft_seed``, or the run's ``seed`` when ``sft_seed`` is ``~``."""
    value = _cfg(config, "sft_seed")
    return int(_cfg(config, "seed", 2020) if value is None else value)


def stage1_feature_names(config):
    """modality -> feature-store name of the stage-1 (aligned) features.

    With a fixed ``sft_seed`` (default) stage 1 is per-dataset preprocessing: one table per
    modality, shared by every run and seed. With ``sft_seed: ~`` each run seed fine-tunes its own
    and the names get a ``_seed<N>`` suffix, so parallel or successive seeds never overwrite (or
    rebuild) each other's tables.
    """
    suffix = f"_seed{sft_seed(config)}" if _cfg(config, "sft_seed") is None else ""
    return {m: _cfg(config, f"stage1_{m}_feature", f"{m}_sicsrec") + suffix for m in modalities(config)}


def _barrier():
    import torch.distributed as dist

    if _dist_info()[1] > 1:
        dist.barrier()


def _all_gather_object(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out




# ============================================================================ pairs


def stage1_pairs(dataset, show_progress=False):
    """Positive pairs ``(target, similar)`` as internal item ids (LongTensor P x 2) and a report."""
    config = dataset.config
    id2token = dataset.field2id_token[dataset.iid_field]
    token2id = {str(t): i for i, t in enumerate(id2token)}
    data_dir, name = config["data_path"], dataset.dataset_name
    pair_file = _cfg(config, "pair_file")
    drop_self = bool(_cfg(config, "pair_drop_self", True))
    info = {}
    if pair_file:
        raw = read_pairs(pair_file)
        known = [(token2id.get(str(a)), token2id.get(str(b))) for a, b in raw]
        pairs = [(a, b) for a, b in known if a is not None and b is not None and a > 0 and b > 0]
        if drop_self:
            pairs = [(a, b) for a, b in pairs if a != b]
        info.update(source="file", path=os.path.abspath(pair_file), rows=len(raw), unknown_items=sum(
            1 for a, b in known if a is None or b is None), pairs=len(pairs))
        logger.info("SICSRec stage 1: %d pairs from %s (%d rows, %d with items unknown to the dataset)",
                    len(pairs), pair_file, len(raw), info["unknown_items"])
        return _pairs_tensor(pairs), info

    miner = _cfg(config, "pair_miner", "cooccurrence")
    if miner not in PAIR_MINERS:
        raise ValueError(f"pair_miner must be one of {PAIR_MINERS}, got {miner!r}")
    seqs = user_sequences(dataset)
    target_mode = _cfg(config, "pair_target", "train_last")
    max_cands = _cfg(config, "pair_max_candidates", 50)
    queries = []
    for s in seqs:
        q = pair_query(s, target_mode, drop_self, max_cands)
        if q is not None:
            queries.append((s.user, q[0], q[1]))
    info.update(source=miner, users=len(seqs), queries=len(queries), pair_target=target_mode)

    if miner == "cooccurrence":
        from recbole_mm.data.extract import extract_features, items_to_encode
        from recbole_mm.data.features import align_to_dataset

        feat = _cfg(config, "pair_feature") or base_feature_names(config).get(
            "text", base_feature_names(config).get("image"))
        spec = dataset.feature_spec(feat)
        fm = extract_features(data_dir, name, feat, spec, show_progress=show_progress,
                              items=items_to_encode(spec, id2token))
        table, missing, _ = align_to_dataset(fm, id2token)
        found, stats = mine_cooccurrence(queries, table, missing, _cfg(config, "pair_min_similarity"))
        pairs = [(t, s) for _, t, s, _ in found]
        info.update(stats, feature=feat)
        out = os.path.join(data_dir, f"{name}.sicsrec_pairs.cooccurrence.tsv")
        if _dist_info()[0] == 0:
            write_pairs(out, [(u, id2token[t], id2token[s], f"{sc:.4f}") for u, t, s, sc in found],
                        {"miner": "cooccurrence", "feature": feat, "stats": stats})
    else:
        pairs, llm_info = _llm_pairs(dataset, queries, id2token, token2id, show_progress)
        info.update(llm_info)
    if drop_self:
        pairs = [(a, b) for a, b in pairs if a != b]
    info["pairs"] = len(pairs)
    info["coverage"] = len(pairs) / max(1, len(seqs))
    logger.info("SICSRec stage 1: %s miner -> %d pairs for %d users (%.1f%%); %s", miner, len(pairs), len(seqs),
                100 * info["coverage"], {k: v for k, v in info.items() if k not in ("source",)})
    return _pairs_tensor(pairs), info


def _pairs_tensor(pairs):
    if not pairs:
        return torch.zeros((0, 2), dtype=torch.long)
    return torch.tensor(pairs, dtype=torch.long)


def _item_titles(dataset, id2token):
    """token -> text of the text feature's spec (what the LLM reads)."""
    from recbole_mm.data.extract import read_item_texts

    config = dataset.config
    feat = _cfg(config, "pair_title_feature") or _cfg(config, "text_feature", "text")
    spec = dataset.feature_spec(feat)
    item_file = os.path.join(config["data_path"], f"{dataset.dataset_name}.item")
    tokens, texts = read_item_texts(item_file, spec.get("fields"), spec.get("template"), spec.get("id_field"),
                                        missing_values=spec.get("missing_values"))
    return dict(zip(map(str, tokens), texts)), feat


def _llm_pairs(dataset, queries, id2token, token2id, show_progress):
    config = dataset.config
    model = _cfg(config, "pair_llm")
    if not model:
        raise ValueError("pair_miner: llm needs pair_llm: <hub name or local folder of a causal LM>")
    titles, title_feature = _item_titles(dataset, id2token)
    tq = [(u, str(id2token[t]), [str(id2token[c]) for c in cs]) for u, t, cs in queries]
    data_dir, name = config["data_path"], dataset.dataset_name
    out = os.path.join(data_dir, f"{name}.sicsrec_pairs.llm.tsv")
    settings = {
        "model": os.fspath(model), "aligned": bool(_cfg(config, "pair_prompt_aligned", True)),
        "max_new_tokens": int(_cfg(config, "pair_llm_max_new_tokens", 32)),
        "max_prompt_tokens": int(_cfg(config, "pair_llm_max_prompt_tokens", 4096)),
        "chat_template": _cfg(config, "pair_llm_chat_template", "auto"),
        "dtype": str(_cfg(config, "pair_llm_dtype", "auto")), "instruction": _cfg(config, "pair_llm_prompt"),
    }
    from recbole_mm.data.extract import encoder_fingerprint

    key = {"queries": queries_checksum(tq), "titles": sha256_strings(titles.get(c, "") for q in tq for c in [q[1]] + q[2]),
           "fingerprint": encoder_fingerprint(os.fspath(model)), **settings}
    manifest = read_pair_manifest(out)
    if manifest is not None and manifest.get("key") == key and os.path.isfile(out):
        pairs = [(token2id[a], token2id[b]) for a, b in read_pairs(out) if a in token2id and b in token2id]
        logger.info("SICSRec stage 1: reusing %d LLM pairs from %s", len(pairs), out)
        return pairs, {"llm": settings["model"], "reused": out, **manifest.get("stats", {})}
    miner = LLMPairMiner(
        model, batch_size=int(_cfg(config, "pair_llm_batch_size", 8)), max_new_tokens=settings["max_new_tokens"],
        max_prompt_tokens=settings["max_prompt_tokens"], chat_template=settings["chat_template"],
        dtype=settings["dtype"], device=config["device"], aligned=settings["aligned"],
        instruction=settings["instruction"], trust_remote_code=bool(_cfg(config, "pair_llm_trust_remote_code", False)))
    # under torch.distributed every rank asks the LLM about the users r::world, rank 0 writes
    rank, world = _dist_info()
    chunk_dir = os.path.join(data_dir, f".{name}.sicsrec_pairs.llm.chunks")
    if world > 1:
        chunk_dir += f".shard{rank}of{world}"
    records, stats = miner.mine(tq[rank::world], titles, chunk_dir=chunk_dir,
                                chunk_size=int(_cfg(config, "pair_llm_chunk_size", 256)), show_progress=show_progress)
    if world > 1:
        shards = _all_gather_object((records, stats))
        merged = [None] * len(tq)
        for r, (recs, _) in enumerate(shards):
            merged[r::world] = recs
        records = merged
        stats = {k: sum(st[k] for _, st in shards) for k in stats}
    found = [(u, t, s) for u, t, s, status, _ in records if s is not None]
    if rank == 0:
        write_pairs(out, [(u, t, s, "") for u, t, s in found],
                    {"key": key, "stats": stats, "title_feature": title_feature})
        write_pairs(out[:-4] + ".answers.tsv", [(u, t, s or "", f"{st}: {ans!r}") for u, t, s, st, ans in records])
    shutil.rmtree(chunk_dir, ignore_errors=True)
    _barrier()
    del miner
    _free_memory()
    n = max(1, stats["queries"])
    logger.info("SICSRec stage 1 LLM answers: %d ok, %d by title, %d none (-1), %d illegal of %d (%.1f%% usable)",
                stats["ok"], stats["title"], stats["none"], stats["illegal"], stats["queries"],
                100 * (stats["ok"] + stats["title"]) / n)
    return [(token2id[t], token2id[s]) for _, t, s in found], {"llm": settings["model"], **stats}


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================ encoders


class ProjectionHead(nn.Sequential):
    """``Linear(in, hidden) -> ReLU -> Linear(hidden, out)`` (the official 768->128->64 adapter)."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def _block_list(model):
    """The main stack of repeated blocks (the ``nn.ModuleList`` holding most parameters)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            key = (size, -len(name))
            if best is None or key > best[0]:
                best = (key, name, module)
    return (best[1], best[2]) if best else (None, None)


def _open_rgb(path, background=None):
    """The item image as RGB (transparency composited onto ``background``, default white), or None."""
    from recbole_mm.data.images import open_image, parse_background

    if path is None or not os.path.isfile(path):
        return None
    img, reason = open_image(path, parse_background(background))
    if img is None:  # corrupt / unsupported format: the item has no image
        logger.warning("SICSRec stage 1: cannot read image %s (%s); the item is treated as image-less", path, reason)
    return img


def frozen_modules(model):
    """The largest submodules of ``model`` (``model`` itself included) that have parameters and
    none requiring grad: the frozen parts, whose BatchNorm statistics (and dropout) must not
    change while the rest trains."""
    out, inside = [], []  # named_modules is pre-order: a frozen module's descendants follow it
    for name, module in model.named_modules():
        if inside and name.startswith(inside[-1]):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
            if not name:
                break  # the whole model is frozen
            inside.append(f"{name}.")
    return out


def keep_frozen_in_eval(model):
    """Put the frozen parts of ``model`` (see :func:`frozen_modules`) in eval mode, so a training
    forward leaves their BatchNorm running mean / var untouched; returns them."""
    parts = frozen_modules(model)
    for module in parts:
        module.eval()
    return parts


class ImageTower(nn.Module):
    """A ``transformers`` vision model with its top ``k`` blocks trainable, per item id.

    ``paths[i]`` is item ``i``'s image file (None: no image); transparent images are composited
    onto ``background`` ([R, G, B], default white). ``pooling``: ``pooler``
    (``pooler_output`` when the model has one, else CLS / spatial mean), ``cls``, ``mean`` or
    ``logits`` (an image-classification model's class logits, as the official Swin export).
    Everything before the block stack (embeddings, a CNN's stem) and the lower blocks are frozen;
    with ``k > 0`` the top ``k`` blocks and every parameter after the block stack (final norm,
    pooler, classifier) train. Frozen parts stay in eval mode when the tower is put in train mode
    (a frozen BatchNorm's running statistics never move).
    """

    def __init__(self, name_or_path, paths, trainable_layers=1, pooling="pooler", cache_items=4096,
                 background=None):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

        from recbole_mm.data.images import parse_background

        if pooling not in IMAGE_POOLINGS:
            raise ValueError(f"sft_image_pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
        path = os.fspath(name_or_path)
        try:
            self.processor = AutoImageProcessor.from_pretrained(path)
            loader = AutoModelForImageClassification if pooling == "logits" else AutoModel
            model = loader.from_pretrained(path)
        except OSError as e:
            raise OSError(f"cannot load image encoder {path!r}: {e}") from e
        if pooling != "logits" and hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
            model = model.vision_model  # CLIP-like composite
        self.model = model
        self.pooling = pooling
        self.paths = list(paths)
        self.background = parse_background(background, "image_background")
        self.valid = torch.tensor([p is not None for p in self.paths], dtype=torch.bool)
        self.cache_items = int(cache_items)
        self._cache = {}
        name, blocks = _block_list(model)
        n_blocks = len(blocks) if blocks is not None else 0
        if trainable_layers < 0 or trainable_layers > max(n_blocks, 0) and blocks is not None:
            raise ValueError(f"sft_image_trainable_layers must be in [0, {n_blocks}], got {trainable_layers}")
        for p in model.parameters():
            p.requires_grad = False
        if trainable_layers > 0:
            block_params = {id(p) for p in blocks.parameters()} if blocks is not None else set()
            seen_blocks = False  # parameters registered before the block stack (embeddings, stem) stay frozen
            for pname, p in model.named_parameters():
                if id(p) in block_params:
                    seen_blocks = True
                elif seen_blocks and "embeddings" not in pname:
                    p.requires_grad = True
            if blocks is not None:
                for block in list(blocks)[n_blocks - trainable_layers:]:
                    for p in block.parameters():
                        p.requires_grad = True
            else:
                for p in model.parameters():
                    p.requires_grad = True
        self.trainable_layers = trainable_layers
        self.block_path = name

    @property
    def out_dim(self):
        with torch.no_grad():
            modes = [(m, m.training) for m in self.model.modules()]  # restored as they were (frozen parts in eval)
            self.model.eval()
            from PIL import Image

            dim = self._encode_images([Image.new("RGB", (32, 32), (127, 127, 127))]).shape[1]
            for m, was in modes:
                m.training = was
        return int(dim)

    def train(self, mode=True):
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.model)
        return self

    def _pixels(self, rows):
        device = next(self.model.parameters()).device
        out, ok = [], []
        for r in rows:
            r = int(r)
            if r in self._cache:
                px = self._cache[r]
            else:
                img = _open_rgb(self.paths[r], self.background) if self.valid[r] else None
                if img is None:
                    self.valid[r] = False
                    px = None
                else:
                    px = self.processor(images=[img], return_tensors="pt")["pixel_values"][0]
                    if len(self._cache) < self.cache_items:
                        self._cache[r] = px
            ok.append(px is not None)
            if px is not None:
                out.append(px)
        pixels = torch.stack(out).to(device) if out else None
        return pixels, torch.tensor(ok, dtype=torch.bool)

    def _pool(self, output):
        if self.pooling == "logits":
            return output.logits.float()
        mode = self.pooling
        pooled = getattr(output, "pooler_output", None)
        if mode == "pooler" and pooled is not None:
            return pooled.float().flatten(1)
        hidden = output.last_hidden_state.float()
        if hidden.dim() == 4:  # feature maps
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if mode in ("cls", "pooler") else hidden.mean(dim=1)

    def _encode_images(self, images):
        device = next(self.model.parameters()).device
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        return self._pool(self.model(pixel_values=pixels))

    def forward(self, item_ids):
        """``item_ids`` (N,) -> (vectors (N, dim), ok (N,) bool); items without image get zeros."""
        flat = item_ids.reshape(-1).cpu()
        uniq, inverse = torch.unique(flat, return_inverse=True)
        pixels, ok = self._pixels(uniq.tolist())
        if pixels is None:
            dim = self.out_dim
            device = next(self.model.parameters()).device
            return torch.zeros(len(flat), dim, device=device), torch.zeros(len(flat), dtype=torch.bool)
        feats = self._pool(self.model(pixel_values=pixels))
        full = feats.new_zeros(len(uniq), feats.shape[1])
        full[ok.to(feats.device)] = feats
        return full[inverse.to(feats.device)], ok[inverse]


def _image_paths(dataset, feature):
    """Per internal item id, the image file of the item (None: no image)."""
    from recbole_mm.data.extract import find_item_images

    spec = dataset.feature_spec(feature)
    data_dir = dataset.config["data_path"]
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    image_dir = spec.get("image_dir")
    if image_dir is not None and not os.path.isabs(image_dir):
        image_dir = os.path.join(data_dir, image_dir)
    field = spec.get("image_field")
    if field:
        from recbole_mm.data.atomic_file import read_atomic_file

        df, _ = read_atomic_file(os.path.join(data_dir, f"{dataset.dataset_name}.item"))
        id_col = spec.get("id_field") or dataset.iid_field
        base = image_dir or data_dir
        by_token = {}
        for tok, v in zip(df[id_col], df[field].str.strip()):
            by_token[str(tok)] = None if not v else (v if os.path.isabs(v) else os.path.join(base, v))
        paths = [by_token.get(t) for t in tokens]
    else:
        paths = find_item_images(image_dir or os.path.join(data_dir, "images"), tokens)
    paths[0] = None
    return [p if p is not None and os.path.isfile(p) else None for p in paths]


def _file_sig(paths):
    parts = []
    for p in paths:
        if p is None:
            parts.append("")
        else:
            st = os.stat(p)
            parts.append(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_strings(parts)


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
    from recbole_mm.data.extract import encoder_fingerprint, read_item_texts, resolve_encoder

    config = dataset.config
    base = base_feature_names(config)
    inputs = {}
    if "text" in mods:
        spec = dataset.feature_spec(base["text"])
        enc_name = _cfg(config, "sft_text_encoder") or spec.get("encoder") or "default"
        pooling = _cfg(config, "sft_text_pooling") or spec.get("pooling") or "mean"
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
        enc_name = _cfg(config, "sft_image_encoder") or spec.get("encoder")
        if not enc_name:
            raise ValueError("SICSRec stage 1 with images needs sft_image_encoder (or an encoder in the "
                             f"'{base['image']}' feature spec): a hub name or a local vision model folder")
        from recbole_mm.data.images import parse_background

        background = parse_background(spec.get("image_background"), f"feature {base['image']!r}: image_background")
        paths = _image_paths(dataset, base["image"])
        inputs["image"] = {
            "encoder": enc_name, "paths": paths, "feature": base["image"], "background": background,
            "valid": torch.tensor([p is not None for p in paths], dtype=torch.bool),
            "key": {"encoder": str(enc_name), "fingerprint": encoder_fingerprint(os.fspath(enc_name)),
                    "images": _file_sig(paths), "feature": base["image"], "image_background": list(background)},
        }
    return inputs


def build_aligner(dataset, inputs):
    """The :class:`Stage1Aligner` for the modalities in ``inputs`` (see :func:`stage1_inputs`)."""
    from recbole_mm.model.encoders import FinetuneTextEncoder, load_text_encoder

    config = dataset.config
    text = image = None
    if "text" in inputs:
        encoder, tokenizer = load_text_encoder(inputs["text"]["encoder"])
        ids, mask = dataset.text_inputs(inputs["text"]["feature"], tokenizer, int(_cfg(config, "sft_max_length", 64)))
        width = max(1, int(mask.sum(1).max()))  # drop columns that are padding for every item
        ids, mask = ids[:, :width].contiguous(), mask[:, :width].contiguous()
        text = FinetuneTextEncoder(encoder, ids, mask, trainable_layers=int(_cfg(config, "sft_text_trainable_layers", 1)),
                                   pooling=inputs["text"]["pooling"], unique_items=True,
                                   cache_lower=bool(_cfg(config, "sft_cache_lower", True)),
                                   cache_mb=config["sft_cache_mb"] if "sft_cache_mb" in config else 2048,
                                   cache_dtype=_cfg(config, "sft_cache_dtype", "float32") or "float32")
    if "image" in inputs:
        image = ImageTower(inputs["image"]["encoder"], inputs["image"]["paths"],
                           int(_cfg(config, "sft_image_trainable_layers", 1)),
                           _cfg(config, "sft_image_pooling", "pooler"), background=inputs["image"].get("background"))
    return Stage1Aligner(text, image, int(_cfg(config, "sft_proj_hidden", 128)), int(_cfg(config, "sft_proj_dim", 64)))


def train_alignment(aligner, pairs, valid, config, device, show_progress=False):
    """Fine-tune ``aligner`` on ``pairs`` (P x 2 internal ids); returns the per-epoch loss history."""
    from tqdm.auto import tqdm

    losses_on = [x for x in (_cfg(config, "sft_losses", list(SFT_LOSSES)) or []) if x]
    bad = [x for x in losses_on if x not in SFT_LOSSES]
    if bad:
        raise ValueError(f"sft_losses must be a subset of {SFT_LOSSES}, got {bad}")
    has_text, has_image = aligner.text is not None, aligner.image is not None
    active = [x for x in losses_on if (x == "t2t" and has_text) or (x == "i2i" and has_image)
              or (x == "t2i" and has_text and has_image)]
    tau = float(_cfg(config, "sft_tau", 0.05))
    norm = bool(_cfg(config, "sft_normalize", True))
    mask_self = bool(_cfg(config, "sft_mask_self", True))
    mask_dup = bool(_cfg(config, "sft_mask_duplicates", True))
    epochs = int(_cfg(config, "sft_epochs", 10))
    batch_size = int(_cfg(config, "sft_batch_size", 128))
    history = []
    if len(pairs) < 2 or not active or epochs <= 0:
        logger.warning("SICSRec stage 1: nothing to fine-tune (%d pairs, losses %s): exporting the encoders as "
                       "they are", len(pairs), active)
        return history
    params = aligner.encoder_parameters()
    if bool(_cfg(config, "sft_train_adapters", True)):
        params += aligner.head_parameters()
    else:
        for p in aligner.head_parameters():
            p.requires_grad = False
    if not params:
        logger.warning("SICSRec stage 1: no trainable parameter (0 trainable layers and untrained heads)")
        return history
    opt_name = str(_cfg(config, "sft_optimizer", "adam")).lower()
    lr = float(_cfg(config, "sft_learning_rate", 1e-4))
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
    use_proj = _cfg(config, "sft_export", "encoder")
    if use_proj not in ("encoder", "projection"):
        raise ValueError(f"sft_export must be 'encoder' or 'projection', got {use_proj!r}")
    rows = torch.arange(1, n_items)
    if aligner.text is not None:
        pooling = aligner.text.pooling
        export_pooling = _cfg(config, "sft_text_export_pooling") or pooling
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
    dev = _cfg(config, "sft_device")
    if dev:
        return torch.device(dev)
    return config["device"] if "device" in config and config["device"] is not None else torch.device("cpu")


def run_stage1(dataset, show_progress=None):
    """Produce (or reuse) the stage-1 features of ``dataset``; returns name -> FeatureMatrix."""
    from recbole_mm.data.features import FeatureStore

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
        "sft": dict({k: _cfg(config, k) for k in SFT_KEYS}, sft_seed=sft_seed(config),
                    # a float16 lower-layer cache changes the features slightly (float32: exact, as before)
                    **({"sft_cache_dtype": "float16"} if _cfg(config, "sft_cache_dtype") == "float16" else {})),
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
    mats = export_features(aligner, len(id2token), config, device, int(_cfg(config, "sft_export_batch_size", 256)))
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


class SICSRecDataset(MultiModalSequentialDataset):
    """Multimodal sequential dataset that builds SICSRec's stage-1 features when they are missing.

    Every other feature is loaded as in :class:`MultiModalSequentialDataset`.
    """

    def _load_feature(self, name):
        if not _cfg(self.config, "stage1", True) or name not in stage1_feature_names(self.config).values():
            return super()._load_feature(name)
        from recbole_mm.data.features import align_to_dataset

        if getattr(self, "_stage1_features", None) is None:
            from recbole_mm.data.features import FeatureStore

            # one lock for all stage-1 tables: they are built together
            with FeatureStore(self.config["data_path"], self.dataset_name).build_lock("sicsrec_stage1"):
                self._stage1_features = run_stage1(self)
        fm = self._stage1_features[name]
        table, missing, stats = align_to_dataset(fm, self.field2id_token[self.iid_field])
        self.mm_features[name] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        self.mm_missing[name] = torch.from_numpy(np.asarray(missing, dtype=bool))
        self.mm_stats[name] = stats
        if len(self.mm_features) == len(stage1_feature_names(self.config)):
            self._stage1_features = None  # release the memory maps


def main(argv=None):
    """``python -m recbole_mm.model.sicsrec_stage1 --dataset=NAME [--config_files=...] [--key=value ...]``"""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.model.sicsrec_stage1",
                                     description="Run SICSRec stage 1 (pairs, alignment, export) for a dataset.")
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--config_files", default=None)
    args, _ = parser.parse_known_args(argv)

    import recbole_mm  # noqa: F401
    from recbole.utils import init_logger
    from recbole_mm.config import MMConfig

    overrides = [a for a in argv if a.startswith("--") and "=" in a and not a.startswith(("--dataset", "--config_files"))]
    saved = sys.argv
    sys.argv = [saved[0]] + overrides
    try:
        config = MMConfig(model="SICSRec", dataset=args.dataset,
                          config_file_list=args.config_files.split() if args.config_files else None,
                          config_dict={"stage1": True})
    finally:
        sys.argv = saved
    init_logger(config)
    dataset = SICSRecDataset(config)
    for name in stage1_feature_names(config).values():
        print(f"{name}: {tuple(dataset.mm_features[name].shape)} aligned; stats {dataset.mm_stats[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
