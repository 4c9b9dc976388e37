"""The hinge loss on hard pairs, as a pure function of features."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_loss(
    old_image_feats: Tensor,
    old_text_feat: Tensor,
    new_text_feat: Tensor,
    margin: float,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Mean of ``max(0, cos(f, new_text) - cos(f, old_text) + margin)`` over samples.

    Keeps features of an old class closer to their own text than to a similar new class's.

    Args:
        old_image_feats: ``[n, dim]`` image features of the old class, or ``[pairs, n, dim]``
            for several hard pairs at once (normalised here).
        old_text_feat: ``[dim]`` (or ``[pairs, dim]``) text feature of the old class.
        new_text_feat: ``[dim]`` (or ``[pairs, dim]``) text feature of the new class.
        margin: the required gap in cosine similarity.
        valid: ``[pairs]`` which pairs count (a list padded to a fixed size): the loss is
            then the mean over the valid pairs of each pair's mean, 0 without any.

    Returns:
        Scalar tensor: the mean over every sample (and pair); differentiable in all inputs.
    """
    feats = F.normalize(old_image_feats, dim=-1)
    pos = torch.einsum("...nd,...d->...n", feats, F.normalize(old_text_feat, dim=-1))
    neg = torch.einsum("...nd,...d->...n", feats, F.normalize(new_text_feat, dim=-1))
    gaps = torch.clamp(neg - pos + margin, min=0)
    if valid is None:
        return gaps.mean()
    per_pair = gaps.mean(-1) * valid
    return per_pair.sum() / valid.sum().clamp(min=1)
