"""Loading the frozen open_clip backbone.

Every model, the tiny offline one included, goes through ``open_clip.create_model_and_transforms``.
The tiny architecture ``cliphinge-tiny`` (32-px images, 2 blocks of width 64, 64-d embedding) is
registered through open_clip's own model-config mechanism when this module is imported.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
from torch import nn

TINY_MODEL = "cliphinge-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
if TINY_MODEL not in open_clip.list_models():
    open_clip.add_model_config(_CONFIG_DIR)


class BackboneError(RuntimeError):
    """The requested CLIP model or its weights could not be loaded."""


@dataclass
class CLIPBackbone:
    """A frozen open_clip CLIP model with its transforms and tokenizer.

    Attributes:
        model: the open_clip ``CLIP`` module, every parameter with ``requires_grad=False``.
        train_transform: open_clip's training preprocess (random resized crop).
        eval_transform: open_clip's eval preprocess (resize, centre crop, normalise); the
            method uses it for training too unless augmentation is asked for.
        tokenizer: callable ``list[str] -> LongTensor [n, context_length]``.
        model_name: open_clip architecture name.
        pretrained: the tag, the checkpoint path, or ``None`` for random weights.
        weights_sha256: first 16 hex digits of the checkpoint's SHA-256 (``None`` unless a
            local file was loaded), written into results so numbers name their weights.
    """

    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_name: str
    pretrained: Optional[str]
    weights_sha256: Optional[str]

    @property
    def image_size(self) -> int:
        """Side of the square input image in pixels."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text embedding."""
        return int(self.model.text_projection.shape[1])


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """First 16 hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_clip(model_name: str = "ViT-B-16", pretrained: Optional[str] = "openai",
              device: str | torch.device = "cpu") -> CLIPBackbone:
    """Create a frozen open_clip model.

    Args:
        model_name: an open_clip architecture (``ViT-B-16``, ``cliphinge-tiny``, ...).
        pretrained: an open_clip pretrained tag (``openai``; downloads when online), a path to a
            local checkpoint file (a state dict as open_clip saves it), or ``None``/``"none"``
            for random weights.
        device: where to put the model.

    Returns:
        ``CLIPBackbone`` with the model in eval mode and every parameter frozen.

    Raises:
        BackboneError: unknown architecture, missing file, or a tag whose weights cannot be
            fetched (offline); the message says how to pass a local file instead.
    """
    if model_name not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model '{model_name}'; choose one of "
                            f"open_clip.list_models() (e.g. ViT-B-16, or {TINY_MODEL} offline)")
    tag = None if pretrained in (None, "", "none", "None") else str(pretrained)
    sha = None
    looks_like_file = tag is not None and (
        Path(tag).is_file() or os.sep in tag
        or tag.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")))
    if looks_like_file:
        if not Path(tag).is_file():
            raise BackboneError(f"pretrained checkpoint file '{tag}' does not exist; pass an "
                                "existing file or an open_clip tag such as 'openai'")
        sha = file_sha256(tag)
    elif tag is not None and tag not in open_clip.list_pretrained_tags_by_model(model_name):
        raise BackboneError(
            f"'{tag}' is neither a file nor a pretrained tag of {model_name} (tags: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        # huggingface_hub reads the variable once at import: honour it when set later too
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=device)
    except Exception as err:  # torch.load raises UnpicklingError, IndexError... on a bad file
        if sha is not None:
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise BackboneError(f"could not load checkpoint '{tag}' into {model_name} "
                                f"({type(err).__name__}: {first})") from None
        if not isinstance(err, RuntimeError):
            raise
        raise BackboneError(
            f"could not fetch the '{tag}' weights of {model_name} (offline?). Download them on a "
            f"machine with internet and pass the file: --pretrained /path/to/{model_name}.pt "
            f"(or pretrained=\"/path/...\" in the config)") from None
    if tag is None:
        logging.getLogger(__name__).info("%s uses random weights (pretrained=None)", model_name)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return CLIPBackbone(model=model, train_transform=train_tf, eval_transform=eval_tf,
                        tokenizer=open_clip.get_tokenizer(model_name), model_name=model_name,
                        pretrained=tag, weights_sha256=sha)
