"""The frozen image side every CLIP model of the package shares (a mixin)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class FrozenImageEncoding:
    """``run_image_encoder`` and ``frozen_features`` over ``self.clip`` (an open_clip model)
    and ``self.preprocess`` (``DevicePreprocess`` with ``resize_on_device``, else ``None``)."""

    clip: nn.Module
    preprocess: Optional[nn.Module]

    def run_image_encoder(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> ``[batch, dim]`` unnormalised frozen image features (float32).

        Gradients flow only when a LoRA adapter is active and grad mode is on (stage 2).
        With ``resize_on_device`` the images are first resized and normalised here.
        """
        if self.preprocess is not None:
            images = self.preprocess(images)
        return self.clip.encode_image(images).float()

    def frozen_features(self, x: Tensor) -> Tensor:
        """Frozen features of images ``[b, 3, H, W]``; features ``[b, dim]`` pass through."""
        if x.ndim == 2:
            return x.float()
        with torch.no_grad():
            return self.run_image_encoder(x)
