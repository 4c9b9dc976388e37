"""The confusion matrix of an evaluation, counted on the device by an Avalanche plugin."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin


class ConfusionMatrixPlugin(SupervisedPlugin, supports_distributed=True):
    """Counts ``confusion[true class, predicted class]`` over each ``strategy.eval`` call.

    While ``enabled``, ``before_eval`` starts a zeroed ``[n_classes * n_classes]`` count on
    the strategy's device and ``after_eval_iteration`` adds the minibatch to it: the
    prediction is ``strategy.mb_output.argmax(1)``, the truth ``strategy.mb_y``, both class
    ids. One ``index_add_`` per minibatch and no read-back: the host never waits for the
    device (``torch.bincount`` would, for its output size). ``matrix`` reads the counts once,
    after the evaluation.

    ``mb_output`` may have fewer columns than ``n_classes`` (a head that grows with the
    classes seen so far); never more.

    Args:
        n_classes: classes of the whole stream (class ids ``0 .. n_classes - 1``).
        enabled: count from the next evaluation on; set the attribute to switch it (a run
            that wants only the final confusion enables it before its last evaluation).
    """

    def __init__(self, n_classes: int, enabled: bool = True):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.enabled = enabled
        self._counts: Optional[torch.Tensor] = None

    def before_eval(self, strategy, **kwargs):
        """Start a zeroed count for this evaluation (when enabled)."""
        if self.enabled:
            self._counts = torch.zeros(self.n_classes**2, dtype=torch.long, device=strategy.device)

    def after_eval_iteration(self, strategy, **kwargs):
        """Add the minibatch's (true, predicted) pairs to the count (when enabled)."""
        if not self.enabled:
            return
        scores = strategy.mb_output
        if scores.shape[1] > self.n_classes:
            raise ValueError(
                f"the model scores {scores.shape[1]} classes, the confusion "
                f"matrix has {self.n_classes}; pass the stream's class count"
            )
        index = strategy.mb_y.to(torch.long) * self.n_classes + scores.detach().argmax(1)
        if self._counts is None or self._counts.device != index.device:
            self._counts = torch.zeros(self.n_classes**2, dtype=torch.long, device=index.device)
        self._counts.index_add_(0, index, torch.ones_like(index))

    def matrix(self, class_order: Optional[Sequence[int]] = None) -> np.ndarray:
        """The counts of the last enabled evaluation, ``[n_classes, n_classes]`` int64,
        ``[true, predicted]`` by class id, or in ``class_order`` (rows and columns: the
        stream's classes task by task) when given. Zeros before any evaluation."""
        if self._counts is None:
            counts = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        else:
            counts = self._counts.view(self.n_classes, self.n_classes).cpu().numpy()
        return in_class_order(counts, class_order) if class_order is not None else counts


def in_class_order(confusion: np.ndarray, class_order: Sequence[int]) -> np.ndarray:
    """``[C, C]`` matrix indexed by class id -> rows and columns in ``class_order`` (a
    permutation of ``0 .. C-1``): entry ``[i, k]`` = ``confusion[order[i], order[k]]``."""
    order = np.asarray(class_order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(confusion.shape[0])):
        raise ValueError(f"class_order must be a permutation of 0..{confusion.shape[0] - 1}")
    return np.asarray(confusion)[np.ix_(order, order)]
