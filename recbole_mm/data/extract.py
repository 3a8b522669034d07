"""Moved: item feature extraction is the package :mod:`recbole_mm.features` (``extract``: the entry
points and the CLI; ``encoders``, ``chunks``, ``item_file``, ``text``, ``images``: the parts). This
module is kept so existing imports and ``python -m recbole_mm.data.extract`` keep working.

A test or a caller that replaces one of these names must do so in the module that uses it (e.g.
``recbole_mm.features.extract.encode_texts``, ``recbole_mm.features.chunks._save_chunk``), not here.
"""

import sys

from recbole_mm.atomic import atomic_open, write_json_atomic  # noqa: F401
from recbole_mm.data import image_encoders  # noqa: F401
from recbole_mm.data.atomic_file import read_atomic_file  # noqa: F401
from recbole_mm.data.images import (  # noqa: F401
    PROBLEMS as IMAGE_PROBLEMS,
    image_extensions,
    open_image,
    parse_background,
    problem_kind,
    readable_extensions,
    unsupported_extensions,
)
from recbole_mm.features.chunks import _Chunks, _progress, _save_chunk, sha256_strings  # noqa: F401
from recbole_mm.features.encoders import (  # noqa: F401
    DEFAULT_TEXT_ENCODER,
    _MODEL_CACHE,
    _MODEL_CACHE_SIZE,
    PoolingError,
    _cached,
    _load_image_encoder,
    _load_text_encoder,
    _pick_device,
    _pool,
    _prepare_model,
    clear_model_cache,
    default_text_encoder,
    encoder_fingerprint,
    resolve_encoder,
)
from recbole_mm.features.extract import (  # noqa: F401
    CONSUMER_SPEC_KEYS,
    ENCODE_ITEMS,
    IMAGE_SPEC_KEYS,
    TEXT_SPEC_KEYS,
    _dist_all_gather,
    _dist_same_as_rank0,
    _extract_features,
    build_parser,
    extract_features,
    items_to_encode,
    logger,
    main,
    spec_from_args,
)
from recbole_mm.features.images import (  # noqa: F401
    DEFAULT_IMAGE_CHUNK,
    DEFAULT_IMAGE_DIR,
    _MAX_PROBLEM_WARNINGS,
    _file_digest,
    _image_checksum,
    _probe_image_dim,
    encode_images,
    find_item_images,
    image_inputs,
)
from recbole_mm.features.item_file import _id_column, _item_tokens, _read_atomic_file  # noqa: F401
from recbole_mm.features.store import USER_TYPE, FeatureMatrix, FeatureStore  # noqa: F401
from recbole_mm.features.text import (  # noqa: F401
    DEFAULT_MISSING_VALUES,
    DEFAULT_TEXT_CHUNK,
    TEXT_FIELD_TYPES,
    _build_item_texts,
    _pad_batch,
    _template_fields,
    _text_model_inputs,
    encode_texts,
    normalize_missing_values,
    read_item_texts,
)
from recbole_mm.utils import dist_rank_world as _dist_rank_world  # noqa: F401

__all__ = [
    "default_text_encoder", "resolve_encoder", "encoder_fingerprint", "read_item_texts", "find_item_images",
    "normalize_missing_values", "DEFAULT_MISSING_VALUES",
    "encode_texts", "encode_images", "extract_features", "items_to_encode", "clear_model_cache", "build_parser",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
