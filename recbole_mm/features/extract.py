"""Item feature extraction, cached in a FeatureStore: the entry points.

* :func:`extract_features` -- cache-aware: hashes the inputs, reuses ``<dataset>.<name>.npy`` when
  its manifest matches, otherwise extracts (resumable chunks) and saves atomically; processes
  sharing a dataset folder take turns on a file lock, DDP ranks each encode a shard;
* :func:`items_to_encode` -- the items a dataset asks for (``encode_items``);
* a CLI: ``python -m recbole_mm.data.extract --dataset_dir dataset/ml-100k --dataset ml-100k
  --name text --type text --fields movie_title class``.

The inputs come from :mod:`.text` and :mod:`.images`, the models from :mod:`.encoders`, the files
from :mod:`.store`. ``torch`` and ``transformers`` are imported lazily, so reading a cached feature
never pays their import cost.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

import numpy as np

from recbole_mm.data import image_encoders
from recbole_mm.data.images import parse_background
from recbole_mm.utils import dist_rank_world as _dist_rank_world

from .chunks import sha256_strings
from .encoders import DEFAULT_TEXT_ENCODER, encoder_fingerprint, resolve_encoder
from .images import DEFAULT_IMAGE_CHUNK, _image_checksum, encode_images, image_inputs
from .store import USER_TYPE, FeatureMatrix, FeatureStore
from .text import DEFAULT_TEXT_CHUNK, _build_item_texts, encode_texts, normalize_missing_values

logger = logging.getLogger(__name__)

TEXT_SPEC_KEYS = {"type", "fields", "template", "encoder", "pooling", "max_length", "batch_size",
                  "normalize", "dtype", "id_field", "chunk_size", "fp16", "missing_values"}
# read by the dataset/model side, not by extraction: the expected feature dim, and which items a
# dataset has encoded (``encode_items``: ``used``, the items it keeps, or ``all`` rows of the .item)
CONSUMER_SPEC_KEYS = {"dim", "encode_items"}
ENCODE_ITEMS = ("used", "all")
IMAGE_SPEC_KEYS = {"type", "image_dir", "image_field", "encoder", "pooling", "batch_size", "dtype",
                   "id_field", "chunk_size", "fp16", "image_background"}


# ============================================================================ cache-aware entry point


def _dist_all_gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _dist_same_as_rank0(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def extract_features(dataset_dir, dataset_name: str, name: str, spec: dict, show_progress: bool = True,
                     device=None, force: bool = False, items=None) -> FeatureMatrix:
    """Extract (or reuse) feature ``name``; see :func:`_extract_features`. Processes sharing the
    dataset folder (a parallel study's cells) take turns on a per-feature file lock, so the
    feature is built once and the others reuse it."""
    with FeatureStore(os.fspath(dataset_dir), dataset_name).build_lock(name):
        return _extract_features(dataset_dir, dataset_name, name, spec, show_progress=show_progress,
                                 device=device, force=force, items=items)


def items_to_encode(spec: dict, id2token):
    """The ``items`` a dataset passes to :func:`extract_features` for a feature ``spec``: the raw
    tokens it uses (``id2token[1:]``, ``id2token`` being ``dataset.field2id_token[item_field]``)
    under ``encode_items: used`` (the default), None (every row of the item file) under ``all``."""
    mode = (spec or {}).get("encode_items") or "used"
    if mode not in ENCODE_ITEMS:
        raise ValueError(f"feature spec: encode_items must be one of {ENCODE_ITEMS}, got {mode!r}")
    if mode == "all":
        return None
    return [str(t) for t in list(id2token)[1:]]


def _extract_features(dataset_dir, dataset_name: str, name: str, spec: dict, show_progress: bool = True,
                      device=None, force: bool = False, items=None) -> FeatureMatrix:
    """Extract (or reuse) the feature ``name`` of a RecBole dataset; returns it memory-mapped.

    ``spec`` keys -- text: ``type="text"``, ``fields``, ``template``, ``encoder`` ("default"),
    ``pooling`` ("mean"), ``max_length`` (128), ``batch_size`` (64), ``normalize`` (False),
    ``missing_values`` (field values read as missing, default nan/none/null/n/a/na/empty);
    image: ``type="image"``, ``encoder`` (required), ``image_dir`` (default ``images``, relative
    to ``dataset_dir``) or ``image_field`` (a column of the .item file holding paths),
    ``pooling`` ("pooler"), ``batch_size`` (32), ``image_background`` ([R, G, B] transparent
    images are composited onto, default white); both: ``dtype`` (float32|float16),
    ``id_field``, ``chunk_size``, ``fp16`` (None = on CUDA only).  ``dim`` (the dimension a model
    expects, checked by :func:`align_to_dataset`) and ``encode_items`` (``used``/``all``, turned
    into ``items`` by :func:`items_to_encode`) are accepted and ignored here; other unknown keys
    are ignored with a warning.

    ``items`` (raw item tokens, e.g. those a dataset uses): only these rows of the item file are
    encoded and stored (a token the file lacks is skipped: the dataset counts it absent); None
    encodes every row.

    The inputs are hashed; if ``<dataset>.<name>.json`` matches, the cached matrix is returned.
    A cached feature holding rows for more items than requested (with the same inputs) is reused;
    one lacking some requested items is re-extracted for them and the items it held, with a warning.
    Otherwise the encoding runs in resumable chunks under ``<dataset_dir>/.<dataset>.<name>.chunks/``
    (removed after success) and the result is saved atomically; a feature built from other
    inputs/settings is rebuilt with a warning naming what changed.

    A feature imported by the user (:meth:`FeatureStore.import_matrix`, manifest ``type: user``)
    is used as is, whatever the spec, and never overwritten (``force`` refuses).  A matrix that
    disagrees with its manifest (shape, dtype, checksum) raises ValueError.  An unwritable
    dataset folder is fine while the feature is up to date; a build there fails before encoding.
    """
    t0 = time.perf_counter()
    dataset_dir = os.fspath(dataset_dir)
    spec = dict(spec or {})
    ftype = spec.get("type", "text")
    allowed = TEXT_SPEC_KEYS if ftype == "text" else IMAGE_SPEC_KEYS if ftype == "image" else None
    if allowed is None:
        raise ValueError(f"feature {name!r}: unknown type {ftype!r}; use 'text' or 'image'")
    unknown = sorted(set(spec) - allowed - CONSUMER_SPEC_KEYS)
    if unknown:  # a warning, not an error: model/dataset code may keep its own keys in the spec
        logger.warning("feature %r: spec key(s) %s are not extraction options for type %r and are ignored "
                       "(extraction options: %s)", name, unknown, ftype, sorted(allowed))
    store = FeatureStore(dataset_dir, dataset_name)
    item_file = os.path.join(dataset_dir, f"{dataset_name}.item")
    out_dtype = np.dtype(spec.get("dtype", "float32"))
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"feature {name!r}: dtype must be float32 or float16, got {out_dtype}")
    chunk_dir = store.chunk_dir(name)
    npy_path, manifest_path = store.paths(name)

    existing = store.read_manifest(name)
    if existing is not None and existing.get("type") == USER_TYPE:
        # a feature the user brought: used as is (verified against its manifest), never rebuilt
        if force:
            raise ValueError(
                f"feature {name!r} of {dataset_name} ({npy_path}) was imported by the user (source "
                f"{existing.get('source')!r}); force=True does not overwrite it. To extract it instead, "
                f"delete {npy_path} and {manifest_path} (or FeatureStore.delete({name!r})) first.")
        fm = store.load(name)
        logger.info("feature %r of %s is user-supplied (source %r, %d items x %d, %d missing): using %s as is; "
                    "its extraction spec is ignored", name, dataset_name, existing.get("source"), len(fm.tokens),
                    fm.dim, int(fm.missing.sum()), npy_path)
        return fm

    if ftype == "text":
        encoder = spec.get("encoder") or DEFAULT_TEXT_ENCODER
        missing_values = normalize_missing_values(spec.get("missing_values"))
        all_tokens, all_texts, fields, template, marker_counts = _build_item_texts(
            item_file, spec.get("fields"), spec.get("template"), spec.get("id_field"), missing_values)
        base_key = {
            "type": "text", "encoder": str(encoder), "encoder_fingerprint": encoder_fingerprint(resolve_encoder(encoder)),
            "fields": fields, "template": template, "missing_values": missing_values,
            "pooling": spec.get("pooling", "mean"),
            "max_length": int(spec.get("max_length", 128)), "normalize": bool(spec.get("normalize", False)),
            "dtype": str(out_dtype),
        }

        def input_checksum(rows):
            return sha256_strings(x for i in rows for x in (all_tokens[i], all_texts[i]))
    else:
        encoder = spec.get("encoder")
        if not encoder:
            raise ValueError(f"feature {name!r}: spec['encoder'] is required for image features "
                             "(a hub name such as 'google/vit-base-patch16-224-in21k' or a local folder)")
        background = parse_background(spec.get("image_background"), f"feature {name!r}: image_background")
        all_tokens, all_paths, source = image_inputs(dataset_dir, dataset_name, spec, item_file)
        base_key = {
            "type": "image", "encoder": image_encoders.describe(encoder),
            "encoder_fingerprint": image_encoders.fingerprint(encoder, encoder_fingerprint),
            "pooling": spec.get("pooling", "pooler"), "dtype": str(out_dtype),
            "image_background": list(background), **source,
        }
        hashed = {}  # image files are read to be hashed: once per selection

        def input_checksum(rows):
            sel = tuple(rows)
            if sel not in hashed:
                hashed[sel] = _image_checksum([all_tokens[i] for i in sel], [all_paths[i] for i in sel])
            return hashed[sel]

    # The rows to encode: every row of the item file, or (``items``) those of the requested items.
    # ``input_checksum`` covers the rows a feature holds (its manifest ``tokens``), so a feature
    # holding more items than requested, with the same inputs, is up to date.
    n_file = len(all_tokens)
    if items is None:
        want = list(range(n_file))
    else:
        requested = {str(t) for t in items}
        want = [i for i, t in enumerate(all_tokens) if t in requested]

    # Under torch.distributed (DDP training) every rank encodes the items r::world_size, the
    # shards are gathered once, rank 0 saves the feature and the others load it.
    rank, world = _dist_rank_world()
    sharded = world > 1
    status = None
    held_rows = None
    if not force:
        held = existing.get("tokens") if existing is not None else None
        if isinstance(held, list):  # a held item gone from the file changes the checksum: stale
            pos = {t: i for i, t in enumerate(all_tokens)}
            held_rows = [pos[t] for t in map(str, held) if t in pos]
        # shape/dtype vs manifest checked here; the data checksum by load (fresh) or verify (stale)
        status = store.freshness(
            name, dict(base_key, input_checksum=input_checksum(want if held_rows is None else held_rows)),
            verify_checksum=False, items=[all_tokens[i] for i in want])
    fresh = status is not None and status.fresh
    if sharded:
        fresh = _dist_same_as_rank0(fresh)  # every rank takes the same branch
    if fresh:
        fm = store.load(name)
        logger.info("feature %r of %s is up to date (%d items x %d, %d missing): reused %s in %.2fs",
                    name, dataset_name, len(fm.tokens), fm.dim, int(fm.missing.sum()), store.paths(name)[0],
                    time.perf_counter() - t0)
        return fm

    build_rows = want
    if status is not None and status.state == "stale":
        store.verify(name)  # never overwrite a matrix replaced by hand (checksum mismatch)
        logger.warning("feature %r of %s is out of date (%s): re-extracting %s", name, dataset_name,
                       status.describe(), npy_path)
    elif status is not None and status.state == "incomplete":
        store.verify(name)
        build_rows = sorted(set(want) | set(held_rows or []))  # extended: the items it held stay in it
        logger.warning("feature %r of %s lacks items this run needs (%s): re-extracting %s for %d items "
                       "(the %d requested and the %d others it held)", name, dataset_name, status.note,
                       npy_path, len(build_rows), len(want), len(build_rows) - len(want))
    elif status is not None and status.note:
        logger.warning("feature %r of %s: %s; extracting it", name, dataset_name, status.note)
    elif force and store.exists(name):
        logger.info("feature %r of %s: force=True, re-extracting %s", name, dataset_name, npy_path)
    if items is not None:
        logger.info("feature %r of %s: encoding %s of %s items (%s not used by the dataset; encode_items: all "
                    "encodes them)", name, dataset_name, f"{len(build_rows):,}", f"{n_file:,}",
                    f"{n_file - len(build_rows):,}")
    tokens = [all_tokens[i] for i in build_rows]
    if ftype == "text":
        texts = [all_texts[i] for i in build_rows]
        present = np.array([bool(t) for t in texts], dtype=bool)
    else:
        paths = [all_paths[i] for i in build_rows]
    key = dict(base_key, input_checksum=input_checksum(build_rows))
    store.check_writable(name)  # before encoding: a read-only dataset folder fails now, clearly
    logger.info("extracting feature %r of %s (%s, encoder %s, %d items%s)", name, dataset_name, ftype, encoder,
                len(tokens), f", sharded over {world} processes" if sharded else "")
    extra = {"items_in_file": n_file}
    shard_dir = f"{chunk_dir}.shard{rank}of{world}" if sharded else chunk_dir
    if ftype == "text":
        idx = np.flatnonzero(present)
        mine = idx[rank::world] if sharded else idx
        emb = encode_texts([texts[i] for i in mine], encoder=encoder, pooling=key["pooling"],
                           batch_size=int(spec.get("batch_size", 64)), max_length=key["max_length"],
                           device=device, fp16=spec.get("fp16"), normalize=key["normalize"],
                           show_progress=show_progress, chunk_dir=shard_dir,
                           chunk_size=int(spec.get("chunk_size", DEFAULT_TEXT_CHUNK)))
        if sharded:
            shards = _dist_all_gather((mine, emb))
            shutil.rmtree(shard_dir, ignore_errors=True)
            dim = max(e.shape[1] for _, e in shards)
            idx = np.concatenate([m for m, _ in shards]).astype(np.int64)
            emb = np.concatenate([e if e.shape[1] == dim else np.zeros((len(m), dim), np.float32)
                                  for m, e in shards], axis=0)
        if emb.shape[1] == 0:  # nothing to encode: learn the dim from one dummy text
            emb = np.zeros((0, encode_texts(["x"], encoder=encoder, device=device, show_progress=False).shape[1]),
                           dtype=np.float32)
        matrix = np.zeros((len(tokens), emb.shape[1]), dtype=np.float32)
        matrix[idx] = emb
        missing = ~present
        extra["n_empty_text"] = int(missing.sum())
        extra["missing_value_counts"] = marker_counts
    else:
        sel = np.arange(len(paths))[rank::world] if sharded else np.arange(len(paths))
        matrix, missing, problems = encode_images(
            [paths[i] for i in sel], encoder, batch_size=int(spec.get("batch_size", 32)), device=device,
            fp16=spec.get("fp16"), pooling=key["pooling"], show_progress=show_progress, chunk_dir=shard_dir,
            chunk_size=int(spec.get("chunk_size", DEFAULT_IMAGE_CHUNK)), labels=[tokens[i] for i in sel],
            background=background)
        if sharded:
            shards = _dist_all_gather((sel, matrix, missing, problems))
            shutil.rmtree(shard_dir, ignore_errors=True)
            dim = max(m.shape[1] for _, m, _, _ in shards)
            matrix = np.zeros((len(paths), dim), dtype=np.float32)
            missing = np.zeros(len(paths), dtype=bool)
            problems = {reason: [] for reason in problems}
            for rows, part, miss, probs in shards:
                if part.shape[1] == dim:
                    matrix[rows] = part
                missing[rows] = miss
                for reason, local in probs.items():
                    problems.setdefault(reason, []).extend(int(rows[j]) for j in local)
            problems = {reason: sorted(v) for reason, v in problems.items()}
        extra["problems"] = {reason: [tokens[i] for i in rows] for reason, rows in problems.items()}
        extra["problem_counts"] = {reason: len(rows) for reason, rows in problems.items()}

    elapsed = time.perf_counter() - t0
    manifest = dict(key)
    manifest.update(extra)
    manifest.update(
        encoder_path=resolve_encoder(encoder) if ftype == "text" else image_encoders.describe(encoder),
        item_file=os.path.basename(item_file), batch_size=int(spec.get("batch_size", 64 if ftype == "text" else 32)),
        extraction_seconds=round(elapsed, 3),
    )
    if sharded and rank != 0:
        import torch.distributed as dist

        dist.barrier()  # rank 0 saves
        if store.is_fresh(name, key):
            return store.load(name)
        # this node does not see rank 0's data folder: save the same feature here
        return store.save(name, tokens, matrix.astype(out_dtype, copy=False), missing, manifest)
    fm = store.save(name, tokens, matrix.astype(out_dtype, copy=False), missing, manifest)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    if sharded:
        import torch.distributed as dist

        dist.barrier()
    n_missing = int(np.asarray(missing).sum())
    logger.info("feature %r of %s: %d items x %d, coverage %.1f%% (%d missing%s) in %.1fs (%.0f items/s) -> %s",
                name, dataset_name, len(tokens), fm.dim, 100.0 * (1 - n_missing / max(1, len(tokens))), n_missing,
                "" if ftype == "text" else f": {extra['problem_counts']}", elapsed,
                len(tokens) / max(elapsed, 1e-9), store.paths(name)[0])
    return fm


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recbole_mm.data.extract",
        description="Extract item text/image features of a RecBole dataset into "
                    "<dataset_dir>/<dataset>.<name>.npy + .json (reused when up to date).")
    p.add_argument("--dataset_dir", required=True, help="folder holding <dataset>.item (e.g. dataset/ml-100k)")
    p.add_argument("--dataset", required=True, help="dataset name (file prefix), e.g. ml-100k")
    p.add_argument("--name", required=True, help="feature name, e.g. text or image")
    p.add_argument("--type", choices=("text", "image"), default="text")
    p.add_argument("--encoder", default=None,
                   help="hub name or local folder; text default: bundled all-MiniLM-L6-v2; required for images")
    p.add_argument("--pooling", choices=("mean", "cls", "pooler"), default=None,
                   help="default: mean for text, pooler for images")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "float16"), default=None)
    p.add_argument("--id_field", default=None, help="item id column (default item_id)")
    p.add_argument("--chunk_size", type=int, default=None, help="items per resumable chunk")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                   help="half precision (default: on CUDA only)")
    p.add_argument("--force", action="store_true",
                   help="re-extract even if the cached feature is up to date (never overwrites a user-imported one)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    t = p.add_argument_group("text")
    t.add_argument("--fields", nargs="+", default=None, help="columns of the .item file to use")
    t.add_argument("--template", default=None, help='e.g. "{movie_title} ({release_year}). Genres: {class}"')
    t.add_argument("--max_length", type=int, default=None)
    t.add_argument("--normalize", action="store_true", help="L2-normalise the text embeddings")
    t.add_argument("--missing_values", nargs="*", default=None,
                   help="field values read as missing (case-insensitive; default: nan none null n/a na, "
                        "and empty); pass the flag alone for empty fields only")
    i = p.add_argument_group("image")
    i.add_argument("--image_dir", default=None, help="folder of <item_token>.<ext> files (default: images/)")
    i.add_argument("--image_field", default=None, help="column of the .item file holding image paths")
    i.add_argument("--image_background", type=int, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="colour transparent images are composited onto (default: 255 255 255, white)")
    return p


def spec_from_args(args) -> dict:
    spec = {"type": args.type}
    common = ("encoder", "pooling", "batch_size", "dtype", "id_field", "chunk_size", "fp16")
    per_type = (("fields", "template", "max_length", "missing_values") if args.type == "text"
                else ("image_dir", "image_field", "image_background"))
    for k in common + per_type:
        v = getattr(args, k)
        if v is not None:
            spec[k] = v
    if args.type == "text" and args.normalize:
        spec["normalize"] = True
    return spec


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fm = extract_features(args.dataset_dir, args.dataset, args.name, spec_from_args(args),
                          show_progress=not args.no_progress, device=args.device, force=args.force)
    npy, man = FeatureStore(args.dataset_dir, args.dataset).paths(args.name)
    print(f"{npy}: {len(fm.tokens)} items x {fm.dim} ({fm.matrix.dtype}), {int(fm.missing.sum())} missing; "
          f"manifest {man}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
