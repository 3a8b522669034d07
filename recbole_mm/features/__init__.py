"""Frozen item features: extracted once per dataset with a pretrained encoder, stored next to the
dataset, aligned to RecBole's item ids. One module per job:

* ``store``: :class:`FeatureMatrix` and :class:`FeatureStore` -- ``<dataset>.<name>.npy`` + its
  manifest (checksums, atomic writes, build lock, freshness), user-imported matrices
  (:func:`load_user_features`, :meth:`FeatureStore.import_matrix`);
* ``align``: a feature matrix in RecBole's internal item-id order (:func:`align_to_dataset`), and the
  aligned table shared on disk by the processes that use it (:func:`shared_aligned_table`);
* ``encoders``: which model an encoder name means (:func:`resolve_encoder`, the bundled default),
  its fingerprint, the device, the loaded-model cache, pooling;
* ``chunks``: resumable encoding (finished chunks reused), :func:`sha256_strings`;
* ``item_file``: the ``.item`` file's id column and item tokens;
* ``text``: item texts (fields, templates, missing values: :func:`read_item_texts`) and
  :func:`encode_texts`;
* ``images``: each item's image file (:func:`find_item_images`, :func:`image_inputs`),
  :func:`encode_images`, the image checksum;
* ``extract``: :func:`extract_features` (cache-aware, locked, DDP-sharded), :func:`items_to_encode`
  and the CLI (``python -m recbole_mm.data.extract``).

The layer is "data": nothing here imports the in-graph encoders (:mod:`recbole_mm.encoders`),
models, trainers or the runner. ``recbole_mm.data.extract`` and ``recbole_mm.data.features`` are
the former modules, kept re-exporting their names.

Importing this package loads none of its modules: the names below are imported when first used
(``from recbole_mm.features import FeatureStore`` loads ``store`` alone), and ``torch`` /
``transformers`` only when something is encoded.
"""

from recbole_mm.utils import lazy_exports

# module of this package -> the public names it defines
_MODULES = {
    "store": ["FORMAT_VERSION", "KEYS_DECIDED_BY_INPUTS", "ALLOWED_DTYPES", "USER_TYPE", "ALIGNED_INFIX",
              "FeatureMatrix", "FeatureStatus", "FeatureStore", "matrix_sha256", "describe_changes",
              "atomic_save_npy", "read_tokens_file", "load_user_features"],
    "align": ["ALIGNED_FORMAT_VERSION", "align_to_dataset", "aligned_table_key", "aligned_table_path",
              "shared_aligned_table"],
    "encoders": ["DEFAULT_TEXT_ENCODER", "default_text_encoder", "resolve_encoder", "encoder_fingerprint",
                 "clear_model_cache", "PoolingError"],
    "chunks": ["sha256_strings"],
    "text": ["TEXT_FIELD_TYPES", "DEFAULT_TEXT_CHUNK", "DEFAULT_MISSING_VALUES", "read_item_texts",
             "normalize_missing_values", "encode_texts"],
    "images": ["DEFAULT_IMAGE_DIR", "DEFAULT_IMAGE_CHUNK", "find_item_images", "image_inputs", "encode_images"],
    "extract": ["TEXT_SPEC_KEYS", "IMAGE_SPEC_KEYS", "CONSUMER_SPEC_KEYS", "ENCODE_ITEMS", "extract_features",
                "items_to_encode", "build_parser", "spec_from_args", "main"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
