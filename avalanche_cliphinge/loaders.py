"""Minibatch order shared by the cached-feature and the image paths.

Both paths draw the same index permutation from the same generator, so a run on cached
features and a run through the image encoder see identical minibatches.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch import Tensor


class EpochBatchSampler:
    """Index lists of one pass over ``n`` samples: ``ceil(n / batch_size)`` batches.

    Args:
        n: number of samples.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a new permutation from ``generator`` at every pass.
        generator: CPU generator (seeded per task by the strategy).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True,
                 generator: Optional[torch.Generator] = None):
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def order(self) -> Tensor:
        """``[n]`` sample indices of the next pass (a new permutation each call when shuffling)."""
        return (torch.randperm(self.n, generator=self.generator) if self.shuffle
                else torch.arange(self.n))

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order()
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size].tolist()


class TensorBatchLoader:
    """Iterates ``(x, y, task_label)`` minibatches of in-memory tensors by slicing.

    Avoids the per-item indexing and collation of a ``DataLoader`` over a ``TensorDataset``.
    The tensors may live on the GPU: the pass's index order is copied there once per pass
    and sliced per minibatch, so a step never waits on a host-to-device copy.

    Args:
        features: ``[n, dim]`` features.
        labels: ``[n]`` class ids.
        sampler: an ``EpochBatchSampler`` over ``n``.
    """

    def __init__(self, features: Tensor, labels: Tensor, sampler: EpochBatchSampler):
        self.features, self.labels, self.sampler = features, labels, sampler
        self._tasks = torch.zeros_like(labels)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        order = self.sampler.order().to(self.features.device, non_blocking=True)
        for start in range(0, self.sampler.n, self.sampler.batch_size):
            rows = order[start:start + self.sampler.batch_size]
            yield self.features[rows], self.labels[rows], self._tasks[rows]
