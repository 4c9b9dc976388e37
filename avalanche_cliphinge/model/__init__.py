"""The frozen CLIP backbone, the method's modules around it, the factory (``build_model``)
and the saved-model file."""

from .backbone import TINY_MODEL, BackboneError, CLIPBackbone, load_clip
from .cliphinge_model import UNSEEN_SCORE, CLIPHingeModel, build_model
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
    "build_model",
    "ImageAdapter",
    "TaskHead",
    "VisualLoRA",
    "TaskPrompts",
    "encode_token_embeddings",
    "raw_text_features",
]
