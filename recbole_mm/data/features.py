"""Moved: the feature store is :mod:`recbole_mm.features.store` and the alignment to RecBole's item
ids :mod:`recbole_mm.features.align` (this module is kept so existing imports keep working).

A test or a caller that replaces one of these names must do so in the module that uses it
(e.g. ``recbole_mm.features.align.save_npy_atomic``), not here.
"""

from recbole_mm.atomic import save_npy_atomic, write_json_atomic  # noqa: F401
from recbole_mm.features.align import (  # noqa: F401
    ALIGNED_FORMAT_VERSION,
    _alignment_plan,
    _feature_file,
    _feature_label,
    _gather,
    _open_aligned,
    align_to_dataset,
    aligned_table_key,
    aligned_table_path,
    shared_aligned_table,
)
from recbole_mm.features.store import (  # noqa: F401
    ALIGNED_INFIX,
    ALLOWED_DTYPES,
    FORMAT_VERSION,
    KEYS_DECIDED_BY_INPUTS,
    USER_TYPE,
    _FINITE_CHECK_ROWS,
    _SCAN_BLOCK_BYTES,
    FeatureMatrix,
    FeatureStatus,
    FeatureStore,
    _as_token_list,
    _block_rows,
    _check_finite,
    _check_matrix,
    _check_unique,
    _jsonable,
    _raise_nonfinite,
    _read_npy_header,
    _release_mapped,
    _scan,
    _short,
    atomic_save_npy,
    describe_changes,
    load_user_features,
    logger,
    matrix_sha256,
    read_tokens_file,
)
from recbole_mm.utils import dist_rank_world as _dist_rank_world  # noqa: F401

__all__ = [
    "FORMAT_VERSION",
    "FeatureMatrix",
    "FeatureStatus",
    "FeatureStore",
    "USER_TYPE",
    "describe_changes",
    "matrix_sha256",
    "align_to_dataset",
    "aligned_table_key",
    "aligned_table_path",
    "shared_aligned_table",
    "atomic_save_npy",
    "load_user_features",
    "read_tokens_file",
]
