"""SimpleCIL: a prototype per class on frozen CLIP image features, a cosine classifier."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .frozen_base import FrozenFeatureStrategy
from .frozen_model import ClassMeans, FrozenCLIPModel


class SimpleCILModel(FrozenCLIPModel):
    """Frozen CLIP + the cosine classifier over the class prototypes (``ClassMeans``).

    ``seen_scores(f) = logit_scale * cos(f, prototype_c)`` for the learned classes, in column
    order, ``[b, n_seen]``; the scale (CLIP's temperature) only sets the evaluation loss, the
    ranking is the cosine's.
    """

    def seen_scores(self, features: Tensor) -> Tensor:
        prototypes = F.normalize(self.gaussians.mean_of(self.class_of_column), dim=-1)
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ prototypes.T


class SimpleCIL(FrozenFeatureStrategy):
    """SimpleCIL (Zhou, Cai, Ye, Zhan, Liu: "Revisiting Class-Incremental Learning with
    Pre-Trained Models: Generalizability and Adaptivity are All You Need", IJCV 2024,
    arXiv 2303.07338) on a frozen CLIP image encoder, as an Avalanche strategy.

    Each class's prototype is the mean of its frozen image features (CLIP's projected image
    embedding, unnormalised, over the training items); a test image goes to the learned class
    whose prototype has the highest cosine similarity with its feature. Nothing trains
    (``trainable_parameters() == 0``, zero epochs): ``train(experience)`` encodes the
    experience once (through the feature cache) and adds or, for a class that comes back,
    updates its prototype. Kept: the prototype rule and the cosine classifier. Changed: the
    embedding is CLIP's image embedding (the paper's pre-trained ViT ``[CLS]`` feature) and
    the cosine is scaled by CLIP's temperature, which changes no prediction.

    Scores: ``[batch, n_outputs]`` by the stream's class ids, ``UNSEEN_SCORE`` for classes
    not learned yet. Arguments: ``FrozenFeatureStrategy``'s (``config``, ``class_names``,
    ``device``, Avalanche's names, ``feature_cache``, ``backbone``).
    """

    TRAINS = False

    def make_model(self, backbone, class_names) -> SimpleCILModel:
        return SimpleCILModel(
            backbone,
            class_names,
            ClassMeans(backbone.embed_dim),
            prompt_template=self.config.prompt_template,
            resize_on_device=self.config.resize_on_device,
        )
