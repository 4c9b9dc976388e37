"""Epoch metrics that keep their running sums on the training device.

Avalanche's ``EpochAccuracy`` and ``EpochLoss`` turn every minibatch's result into a Python
float, which makes the host wait for the GPU at every step and stops it from queueing the
next step's kernels. ``DeviceEpochAccuracy`` and ``DeviceEpochLoss`` report the same values
under the same names (``Top1_Acc_Epoch/train_phase/train_stream/Task000``,
``Loss_Epoch/...``) but sum on the device and read back once per epoch, when they emit.
"""
from __future__ import annotations

from typing import Optional

import torch
from avalanche.evaluation import GenericPluginMetric, Metric
from torch import Tensor


class DeviceMean(Metric[float]):
    """Weighted mean of scalar tensors, summed in float64 where they live.

    ``update`` never reads a value back; ``result`` does (one host sync). It performs the
    float64 operations of Avalanche's ``Mean`` (which sums Python floats) in the same order,
    so both give the same value.
    """

    def __init__(self):
        self._sum: Optional[Tensor] = None
        self._weight = 0.0

    @torch.no_grad()
    def update(self, value: Tensor, weight: float) -> None:
        """Add ``value`` (a scalar tensor) with ``weight`` (a Python number)."""
        term = value.detach().double() * float(weight)
        self._sum = term if self._sum is None else self._sum + term
        self._weight += float(weight)

    def result(self) -> float:
        """The weighted mean so far (0.0 before any update)."""
        if self._sum is None or self._weight == 0.0:
            return 0.0
        return float(self._sum) / self._weight

    def reset(self) -> None:
        self._sum = None
        self._weight = 0.0


class DeviceEpochAccuracy(GenericPluginMetric[float, DeviceMean]):
    """Training accuracy over an epoch (``Top1_Acc_Epoch``), without a per-step sync.

    Each step adds the fraction of minibatch samples whose highest score is their label,
    weighted by the minibatch size, as Avalanche's ``EpochAccuracy`` does.
    """

    def __init__(self):
        super().__init__(DeviceMean(), reset_at="epoch", emit_at="epoch", mode="train")

    def update(self, strategy) -> None:
        n = len(strategy.mb_y)
        correct = (strategy.mb_output.argmax(1) == strategy.mb_y).sum()
        self._metric.update(correct.double() / n, n)

    def __str__(self):
        return "Top1_Acc_Epoch"


class DeviceEpochLoss(GenericPluginMetric[float, DeviceMean]):
    """Training loss over an epoch (``Loss_Epoch``), without a per-step sync.

    Each step's loss is weighted by its number of minibatch samples, as in Avalanche's
    ``EpochLoss``.
    """

    def __init__(self):
        super().__init__(DeviceMean(), reset_at="epoch", emit_at="epoch", mode="train")

    def update(self, strategy) -> None:
        self._metric.update(strategy.loss.mean(), len(strategy.mb_y))

    def __str__(self):
        return "Loss_Epoch"
