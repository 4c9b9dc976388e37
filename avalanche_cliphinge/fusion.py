"""Logit fusion at inference: the CLIP logits plus the weighted stage-2 head logits."""

from __future__ import annotations

from torch import Tensor


def fuse_logits(clip_logits: Tensor, head_logits: Tensor, alpha: float) -> Tensor:
    """Inference scores ``clip_logits + alpha * head_logits``, both ``[batch, classes]``."""
    if clip_logits.shape != head_logits.shape:
        raise ValueError(
            f"logit shapes differ: clip {tuple(clip_logits.shape)} vs head "
            f"{tuple(head_logits.shape)}"
        )
    return clip_logits + alpha * head_logits
