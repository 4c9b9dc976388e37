"""Minibatch order shared by the cached-feature and the image paths, and the one encoder pass.

Both paths draw the same index permutation from the same generator, so a run on cached
features and a run through the image encoder see identical minibatches.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .streams import StreamInputError


@torch.no_grad()
def encode_dataset(
    encode: Callable[[Tensor], Tensor],
    dataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    autocast: Callable[[], ContextManager] = nullcontext,
    desc: str = "features",
    progress: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Run ``encode`` (images ``[b, 3, H, W]`` -> ``[b, dim]``) over ``(image, label, ...)`` items.

    Returns ``(features [n, dim] float32, labels [n] long)``, both on ``device``. Nothing is
    read back per batch: while the device encodes one batch, the host already loads the next.
    ``autocast`` makes the context each batch is encoded in (bf16 on CUDA, for instance).

    Under torchrun every rank encodes its share of the batches (``distributed.deal_batches``:
    whole batches, as one process makes them) and gets every feature back in order, so all
    ranks hold exactly what one process would compute. Every rank must call it.

    Raises:
        ValueError: ``dataset`` is empty.
        StreamInputError: an item cannot be brought to CLIP's input (``ClipInput``); the
            message names ``desc``, the item's index and its class.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(
            f"{desc}: the experience has no samples; every experience needs "
            "data (check the stream's split)"
        )
    batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    mine = distributed.deal_batches(batches)
    loader = DataLoader(
        dataset,
        batch_sampler=mine,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    feats, labels = [], []
    try:
        for batch in tqdm(
            loader,
            desc=desc,
            leave=False,
            disable=len(loader) < 2 or not progress or not distributed.is_main(),
        ):
            with autocast():
                feats.append(encode(batch[0].to(device, non_blocking=True)).float())
            labels.append(torch.as_tensor(batch[1]).long())
    except StreamInputError as err:  # name the item: only the failing batch is read again
        raise _bad_item_error(dataset, mine[len(labels)], desc, err) from None
    sizes = [len(b) for b in batches]
    return (
        distributed.gather_batches(feats, sizes, device),
        distributed.gather_batches(labels, sizes, device),
    )


def _bad_item_error(dataset, batch: List[int], desc: str, err: Exception) -> StreamInputError:
    """``StreamInputError`` naming the first item of ``batch`` that ``ClipInput`` refuses."""
    targets = getattr(dataset, "targets", None)
    for index in batch:
        try:
            dataset[index]
        except StreamInputError as item_err:
            label = "" if targets is None else f" (class {int(targets[index])})"
            return StreamInputError(f"{desc}: item {index}{label}: {item_err}")
    first_line = (str(err).strip().splitlines() or [""])[0]
    return StreamInputError(f"{desc}: items {batch[0]}..{batch[-1]}: {first_line}")


class EpochBatchSampler:
    """Index lists of one pass over ``n`` samples: ``ceil(n / batch_size)`` batches.

    Args:
        n: number of samples.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a new permutation from ``generator`` at every pass.
        generator: CPU generator (seeded per task by the strategy).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def order(self) -> Tensor:
        """``[n]`` sample indices of the next pass (a new permutation each call when shuffling)."""
        return (
            torch.randperm(self.n, generator=self.generator)
            if self.shuffle
            else torch.arange(self.n)
        )

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order()
        for start in range(0, self.n, self.batch_size):
            yield order[start : start + self.batch_size].tolist()


class TensorBatchLoader:
    """Iterates ``(x, y, task_label)`` minibatches of in-memory tensors by slicing.

    Avoids the per-item indexing and collation of a ``DataLoader`` over a ``TensorDataset``.
    The tensors may live on the GPU: the pass's index order is copied there once per pass
    and sliced per minibatch, so a step never waits on a host-to-device copy.

    Args:
        features: ``[n, dim]`` features.
        labels: ``[n]`` class ids.
        sampler: an ``EpochBatchSampler`` over ``n``.
        task_labels: ``[n]`` task labels of the items (default: all 0).
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        sampler: EpochBatchSampler,
        task_labels: Optional[Tensor] = None,
    ):
        self.features, self.labels, self.sampler = features, labels, sampler
        self.task_labels = (
            torch.zeros_like(labels) if task_labels is None else task_labels.to(labels.device)
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        order = self.sampler.order().to(self.features.device, non_blocking=True)
        for start in range(0, self.sampler.n, self.sampler.batch_size):
            rows = order[start : start + self.sampler.batch_size]
            yield self.features[rows], self.labels[rows], self.task_labels[rows]
