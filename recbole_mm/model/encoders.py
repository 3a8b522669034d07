"""Moved to :mod:`recbole_mm.encoders` (kept so existing imports work)."""

from recbole_mm.encoders.cache import BoundedRowCache
from recbole_mm.encoders.text import FinetuneTextEncoder, load_text_encoder

__all__ = ["BoundedRowCache", "FinetuneTextEncoder", "load_text_encoder"]
