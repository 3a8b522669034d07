"""Moved to :mod:`recbole_mm.model.sicsrec.pairs` (kept so existing imports keep working)."""

from recbole_mm.model.sicsrec.pairs import (  # noqa: F401
    ANSWER_STATUSES,
    DEFAULT_INSTRUCTION,
    PAIR_HEADER,
    PAIR_TARGETS,
    _NONE_RE,
    _PREFIX_RE,
    LLMPairMiner,
    UserSequence,
    _atomic_json,
    _clean,
    _display_order,
    build_prompt,
    logger,
    mine_cooccurrence,
    pair_query,
    parse_answer,
    queries_checksum,
    read_pair_manifest,
    read_pairs,
    sha256_strings,
    training_as_built,
    user_sequences,
    write_pairs,
)

__all__ = [
    "UserSequence", "user_sequences", "pair_query", "mine_cooccurrence", "build_prompt", "parse_answer",
    "LLMPairMiner", "write_pairs", "read_pairs", "read_pair_manifest", "queries_checksum", "DEFAULT_INSTRUCTION",
]
