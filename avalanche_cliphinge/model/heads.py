"""Stage-2 per-task linear heads and the optional stage-1 image adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskHead(nn.Module):
    """Linear classifier over one task's classes on normalised image features.

    ``logits = logit_scale * (normalize(features) @ weight.T + bias)``; ``weight`` starts as the
    task's prompted text features, so an untrained head equals CLIP's cosine logits scaled by
    ``logit_scale``.

    Args:
        text_features: ``[n_classes, dim]`` normalised prompted text features of the task.
        logit_scale: multiplier of the head's logits (``second_stage_logit_scale``).
    """

    def __init__(self, text_features: Tensor, logit_scale: float):
        super().__init__()
        n_classes, dim = text_features.shape
        self.linear = nn.Linear(dim, n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(text_features.detach().float())
            self.linear.bias.zero_()
        self.logit_scale = float(logit_scale)

    def forward(self, features: Tensor) -> Tensor:
        """``[batch, dim]`` image features -> ``[batch, n_classes]`` float32 logits.

        Runs in float32 under any autocast: fused with CLIP's logits near 30, a bf16 head
        would move scores by whole bf16 steps.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.logit_scale * self.linear(F.normalize(features.float(), dim=-1))


class ImageAdapter(nn.Module):
    """Residual linear map ``f + W f`` on image features, ``W`` starting at zero (identity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, features: Tensor) -> Tensor:
        """``[batch, dim]`` -> ``[batch, dim]``."""
        return features + self.linear(features)
