"""Gaussian replay: old classes come back as features sampled from their class Gaussians."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor

from ..seeding import Draw, generator as seeded
from .contract import check_strategy


class GaussianReplayPlugin(SupervisedPlugin, supports_distributed=True):
    """Replays sampled features of every old class in the stage-1 cross-entropy.

    The class Gaussians (mean and positive-definite covariance of the frozen image features)
    live on the model (``model.gaussians``); the strategy fits the new classes' at the start
    of each experience. The plugin registers its ``epoch_rows`` as the strategy's
    ``step.replay_source`` once per experience; at the start of every epoch the strategy
    draws from it ``samples_per_old_class`` features per old class, shuffled and split into
    as many chunks as the epoch has minibatches (sizes differ by at most one); each minibatch
    gets its chunk (``strategy.step.replay_features [k, dim]``, ``replay_labels [k]``),
    which the strategy scores without the image encoder and adds to the cross-entropy, in
    either runner (``step.draw_epoch_plan``).

    With ``classes_per_step = k > 0`` the volume follows RAPF's released code instead: every
    minibatch replays ``k`` old classes with ``samples_per_old_class`` features each, the
    classes taken in turn from a list of the old classes shuffled once per epoch (batch b
    gets list positions ``b*k .. b*k + k - 1``, modulo its length), so each epoch visits every
    old class when ``k * batches >= old classes``. All draws of an epoch are made at its start.

    Args:
        samples_per_old_class: features drawn per old class per epoch, or with
            ``classes_per_step`` per replayed class per minibatch (0 disables replay).
        classes_per_step: ``k`` of the per-minibatch volume (0: the per-epoch volume).
        seed: base seed of the per-(task, epoch) generators.
    """

    #: What it reads and writes on its strategy (see ``contract.MethodStrategy``).
    STRATEGY_NEEDS = (
        "model",
        "device",
        "current_task",
        "experience_classes",
        "step",
    )

    def __init__(self, samples_per_old_class: int = 20, seed: int = 0, classes_per_step: int = 0):
        super().__init__()
        self.samples_per_old_class = samples_per_old_class
        self.classes_per_step = classes_per_step
        self.seed = seed

    def before_training(self, strategy, **kwargs):
        check_strategy(self, strategy, self.STRATEGY_NEEDS)

    def before_training_exp(self, strategy, **kwargs):
        strategy.step.replay_source = lambda epoch, n_steps: self.epoch_rows(
            strategy, epoch, n_steps
        )

    def chunks(self, strategy, epoch: int, n_steps: int) -> Optional[List[Tuple[Tensor, Tensor]]]:
        """Epoch ``epoch``'s replay split over ``n_steps`` minibatches: ``(features [k_i, dim],
        labels [k_i])`` per step (sizes differ by one at most), or ``None`` (no old class)."""
        model = strategy.model
        old = strategy.experience_classes.old  # learned before, absent from this experience
        if not old or self.samples_per_old_class == 0:
            return None
        generator = seeded(self.seed, Draw.REPLAY, strategy.current_task, epoch)
        n_chunks = max(n_steps, 1)
        if self.classes_per_step > 0:
            cycle = torch.randperm(len(old), generator=generator)
            picks = cycle[torch.arange(n_chunks * self.classes_per_step) % len(old)]
            rows = model.gaussians.index_of([old[i] for i in picks.tolist()])
            # grouped by pick, so chunk b holds exactly the k classes of minibatch b
            feats, labels = model.gaussians.sample_rows(rows, self.samples_per_old_class, generator)
        else:
            feats, labels = model.gaussians.sample(old, self.samples_per_old_class, generator)
            order = torch.randperm(labels.numel(), generator=generator).to(labels.device)
            feats, labels = feats[order], labels[order]
        feats, labels = feats.to(strategy.device), labels.to(strategy.device)
        return list(zip(torch.tensor_split(feats, n_chunks), torch.tensor_split(labels, n_chunks)))

    def epoch_rows(
        self, strategy, epoch: int, n_steps: int
    ) -> Optional[Tuple[Tensor, Tensor, List[int]]]:
        """The strategy's ``ReplaySource``: epoch ``epoch``'s ``chunks`` as one padded block
        per step.

        Returns ``(features [n_steps, k, dim], labels [n_steps, k], sizes)``: block ``i``
        holds chunk ``i`` (``sizes[i]`` rows), then zero features labelled ``-1`` up to the
        largest chunk's size ``k``, so a captured step keeps one shape; ``None`` when nothing
        is replayed this epoch.
        """
        chunks = self.chunks(strategy, epoch, n_steps)
        if chunks is None:
            return None
        sizes = torch.tensor([len(labels) for _, labels in chunks])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        slots = torch.arange(int(sizes.max()))
        valid = slots[None, :] < sizes[:, None]
        index = torch.where(valid, starts[:, None] + slots[None, :], 0)
        feats, labels = (torch.cat(part) for part in zip(*chunks))
        index, valid = index.to(labels.device), valid.to(labels.device)
        return (
            torch.where(valid[..., None], feats[index], 0.0),
            torch.where(valid, labels[index], -1),
            sizes.tolist(),
        )
