"""The frozen CLIP backbone and the method's modules around it."""

from .backbone import TINY_MODEL, BackboneError, CLIPBackbone, load_clip
from .cliphinge_model import UNSEEN_SCORE, CLIPHingeModel
from .heads import ImageAdapter, TaskHead
from .lora import VisualLoRA
from .prompts import TaskPrompts, encode_token_embeddings, raw_text_features

__all__ = [
    "TINY_MODEL",
    "BackboneError",
    "CLIPBackbone",
    "load_clip",
    "UNSEEN_SCORE",
    "CLIPHingeModel",
    "ImageAdapter",
    "TaskHead",
    "VisualLoRA",
    "TaskPrompts",
    "encode_token_embeddings",
    "raw_text_features",
]
