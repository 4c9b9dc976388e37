"""Gaussian replay: old classes come back as features sampled from their class Gaussians."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor


class GaussianReplayPlugin(SupervisedPlugin):
    """Replays sampled features of every old class in the stage-1 cross-entropy.

    The class Gaussians (mean and positive-definite covariance of the frozen image features)
    live on the model (``model.gaussians``); the strategy fits the new classes' at the start
    of each experience. At the start of every epoch this plugin draws
    ``samples_per_old_class`` features per old class, shuffles them and splits them into as
    many chunks as the epoch has minibatches (sizes differ by at most one); each minibatch
    gets its chunk as ``strategy.replay_features [k, dim]`` / ``strategy.replay_labels [k]``,
    which the strategy scores without the image encoder and adds to the cross-entropy.

    Args:
        samples_per_old_class: features drawn per old class per epoch (0 disables replay).
        seed: base seed of the per-(task, epoch) generators.
    """

    def __init__(self, samples_per_old_class: int = 20, seed: int = 0):
        super().__init__()
        self.samples_per_old_class = samples_per_old_class
        self.seed = seed
        self.chunks: Optional[List[Tuple[Tensor, Tensor]]] = None

    def before_training_epoch(self, strategy, **kwargs):
        model = strategy.model
        old = [c for t in range(model.n_tasks - 1) for c in model.task_classes[t]]
        self.chunks = None
        if not old or self.samples_per_old_class == 0:
            return
        generator = torch.Generator().manual_seed(
            self.seed * 7919 + strategy.current_task * 1009 + strategy.clock.train_exp_epochs)
        feats, labels = model.gaussians.sample(old, self.samples_per_old_class, generator)
        order = torch.randperm(labels.numel(), generator=generator).to(labels.device)
        feats, labels = feats[order].to(strategy.device), labels[order].to(strategy.device)
        # contiguous views: a step takes its chunk without indexing or copying
        n_chunks = max(len(strategy.dataloader), 1)
        self.chunks = list(zip(torch.tensor_split(feats, n_chunks),
                               torch.tensor_split(labels, n_chunks)))

    def before_forward(self, strategy, **kwargs):
        if self.chunks is None:
            return
        chunk = self.chunks[strategy.clock.train_epoch_iterations % len(self.chunks)]
        strategy.replay_features, strategy.replay_labels = chunk

    def after_training_epoch(self, strategy, **kwargs):
        self.chunks = None
