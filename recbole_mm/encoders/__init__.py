"""Content encoders that sit in a model's graph (``content_mode: finetune``): text
(:mod:`.text`), images (:mod:`.image`), LoRA adapters (:mod:`.lora`) and the bounded per-item cache
they share (:mod:`.cache`). Frozen feature extraction lives in :mod:`recbole_mm.features`."""

from .cache import BoundedRowCache
from .image import FinetuneImageEncoder, load_image_finetune
from .text import FinetuneTextEncoder, load_text_encoder

__all__ = ["BoundedRowCache", "FinetuneTextEncoder", "load_text_encoder", "FinetuneImageEncoder",
           "load_image_finetune"]
