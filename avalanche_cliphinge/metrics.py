"""Epoch metrics that keep their running sums on the training device.

Avalanche's ``EpochAccuracy`` and ``EpochLoss`` turn every minibatch's result into a Python
float, which makes the host wait for the GPU at every step and stops it from queueing the
next step's kernels. ``DeviceEpochAccuracy`` and ``DeviceEpochLoss`` report the same values
under the same names (``Top1_Acc_Epoch/train_phase/train_stream/Task000``,
``Loss_Epoch/...``) but sum on the device and read back once per epoch, when they emit.
``CLIPHingeStrategy``'s step keeps those sums itself (``step.EpochRecord``, in either runner)
and the metrics do nothing per step (``metric_needs``); with another strategy (``Naive`` in a
comparison) they sum each step themselves.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from avalanche.evaluation import GenericPluginMetric, Metric, PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.evaluation.metrics import EpochTime
from torch import Tensor

from .step_state import Stage2Record

#: The callbacks of a training iteration.
TRAINING_ITERATION = ("before_training_iteration", "after_training_iteration")


def metric_needs(metric, callback: str, sums_kept: bool) -> bool:
    """Whether ``metric`` does any work in ``callback`` (an Avalanche callback name).

    ``False`` when the metric's class keeps Avalanche's empty callback, or for a training
    iteration when the metric says it needs no step (``needs_steps(sums_kept)`` is false,
    where ``sums_kept``: the strategy keeps an ``epoch_record``), or when ``GenericPluginMetric``'s
    iteration callback would skip it (its mode is the other phase, or it resets elsewhere).
    """
    implementation = getattr(type(metric), callback, None)
    if implementation is None or implementation is getattr(PluginMetric, callback, None):
        return False
    if (
        callback in TRAINING_ITERATION
        and hasattr(metric, "needs_steps")
        and not metric.needs_steps(sums_kept)
    ):
        return False
    if callback.endswith("_iteration") and implementation is getattr(
        GenericPluginMetric, callback, None
    ):
        phase = "train" if "training" in callback else "eval"
        if callback.startswith("before_"):
            return metric._mode == phase and metric._reset_at == "iteration"
        return metric._mode == phase
    return True


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

    @property
    def empty(self) -> bool:
        """Whether nothing was added since the last reset."""
        return self._sum is None

    def set(self, total: Optional[Tensor], weight: float) -> None:
        """Take a weighted sum made elsewhere: ``total`` (``None``: nothing was added)."""
        self._sum, self._weight = total, float(weight)


class _DeviceEpochMetric(GenericPluginMetric[float, DeviceMean]):
    """A training epoch metric over ``DeviceMean``, taken at the epoch's end from the
    strategy's ``epoch_record.sums[sum_name]``, or updated per step for a strategy without
    an epoch record."""

    sum_name = ""

    def __init__(self):
        super().__init__(DeviceMean(), reset_at="epoch", emit_at="epoch", mode="train")

    def needs_steps(self, sums_kept: bool) -> bool:
        """Per-step work: none when the strategy keeps an epoch record."""
        return not sums_kept

    def update(self, strategy) -> None:
        # a strategy's epoch record holds what the steps would add here
        if getattr(strategy, "epoch_record", None) is None:
            self.update_step(strategy)

    def update_step(self, strategy) -> None:
        """Add the step that just ran (a strategy without an epoch record)."""
        raise NotImplementedError

    def after_training_epoch(self, strategy):
        kept = getattr(strategy, "epoch_record", None)
        if kept is not None and kept.samples:
            self._metric.set(kept.sums.get(self.sum_name), kept.samples)
        return super().after_training_epoch(strategy)


class DeviceEpochAccuracy(_DeviceEpochMetric):
    """Training accuracy over an epoch (``Top1_Acc_Epoch``), without a per-step sync.

    Each step adds the fraction of minibatch samples whose highest score is their label,
    weighted by the minibatch size, as Avalanche's ``EpochAccuracy`` does.
    """

    sum_name = "accuracy"

    def update_step(self, strategy) -> None:
        n = len(strategy.mb_y)
        correct = (strategy.mb_output.argmax(1) == strategy.mb_y).sum()
        self._metric.update(correct.double() / n, n)

    def __str__(self):
        return "Top1_Acc_Epoch"


class DeviceEpochLoss(_DeviceEpochMetric):
    """Training loss over an epoch (``Loss_Epoch``), without a per-step sync.

    Each step's loss is weighted by its number of minibatch samples, as in Avalanche's
    ``EpochLoss``.
    """

    sum_name = "loss"

    def update_step(self, strategy) -> None:
        self._metric.update(strategy.loss.mean(), len(strategy.mb_y))

    def __str__(self):
        return "Loss_Epoch"


class DeviceEpochLossTerm(_DeviceEpochMetric):
    """One named term of the training loss over an epoch (``Loss_Epoch_<term>``).

    Reads ``strategy.step.loss_terms[term]`` (a scalar tensor written by the strategy or a
    plugin: ``cross_entropy``, ``text_hinge``, ``image_hinge``) after every iteration, weighted
    by the minibatch size, summed on the device. An epoch in which the term never appeared
    (no hinge pairs in the first task) emits nothing rather than a 0.
    """

    def __init__(self, term: str):
        super().__init__()
        self.term = self.sum_name = term

    def update_step(self, strategy) -> None:
        step = getattr(strategy, "step", None)
        value = getattr(step, "loss_terms", {}).get(self.term)
        if value is not None:
            self._metric.update(value.reshape(()), len(strategy.mb_y))

    def _package_result(self, strategy):
        if self._metric.empty:
            return None
        return super()._package_result(strategy)

    def __str__(self):
        return f"Loss_Epoch_{self.term}"


class StepFreeEpochTime(EpochTime):
    """Avalanche's ``EpochTime`` (``Time_Epoch``) without work in the steps: the clock is read
    when the epoch starts and when it ends (Avalanche's reads it after every iteration and
    reports the time to the last one; the difference is the epoch-end callbacks of the
    plugins before the evaluator)."""

    def needs_steps(self, sums_kept: bool) -> bool:
        """Per-step work: none."""
        return False

    def after_training_iteration(self, strategy):
        return None

    def after_training_epoch(self, strategy):
        self._time.update()
        return super().after_training_epoch(strategy)


class _LastValue(Metric[float]):
    """The last value given (``None`` before any)."""

    def __init__(self):
        self.value: Optional[float] = None

    def update(self, value: float) -> None:
        self.value = float(value)

    def result(self) -> Optional[float]:
        return self.value

    def reset(self) -> None:
        self.value = None


class EpochLearningRate(GenericPluginMetric[float, _LastValue]):
    """The optimizer's learning rate (first parameter group) in the epoch that ended
    (``LR_Epoch``); read once per epoch, no tensor involved."""

    def __init__(self):
        super().__init__(_LastValue(), reset_at="epoch", emit_at="epoch", mode="train")

    def needs_steps(self, sums_kept: bool) -> bool:
        """Per-step work: none (the rate is read once per epoch)."""
        return False

    def update(self, strategy) -> None:
        pass

    def after_training_epoch(self, strategy):
        groups = strategy.optimizer.param_groups if strategy.optimizer is not None else []
        if groups:
            self._metric.update(groups[0]["lr"])
        return super().after_training_epoch(strategy)

    def __str__(self):
        return "LR_Epoch"


class Stage2EpochLoss(PluginMetric[List[float]]):
    """Stage 2's training loss, one value per stage-2 epoch (``Loss_Stage2_Epoch``).

    Read from the first plugin of the strategy that keeps them (``step_state.Stage2Record``:
    ``SecondStagePlugin``) when the experience ends (that plugin runs before the evaluator);
    every value of one experience is emitted at the same x position (Avalanche's
    ``clock.train_iterations``), in epoch order.
    """

    def __init__(self):
        super().__init__()
        self._values: List[float] = []
        self._emitted: Optional[list] = None

    def result(self) -> List[float]:
        return list(self._values)

    def reset(self) -> None:
        self._values = []

    def after_training_exp(self, strategy):
        self.reset()
        plugin = next((p for p in strategy.plugins if isinstance(p, Stage2Record)), None)
        losses = None if plugin is None else plugin.stage2_losses
        # the plugin makes a new list per stage-2 run: a list already emitted is not new
        if not losses or losses is self._emitted:
            return None
        self._emitted = losses
        self._values = [float(v) for v in losses]
        name = get_metric_name(self, strategy, add_experience=False, add_task=True)
        x = strategy.clock.train_iterations
        return [MetricValue(self, name, value, x) for value in self._values]

    def __str__(self):
        return "Loss_Stage2_Epoch"


class SeenClassesStreamAccuracy(PluginMetric[float]):
    """Accuracy over the test samples of the classes trained so far
    (``Top1_Acc_Stream_SeenClasses``).

    Avalanche's ``Top1_Acc_Stream`` counts every test sample of the stream, including those
    of classes no experience has trained yet (always wrong in class-incremental learning):
    after the first of ten tasks it is at most 10%. This metric leaves those samples out, so
    after task t it is the accuracy on the classes of tasks 0..t. The seen classes are the
    model's ``seen_classes`` when it has them, else the classes of every training experience
    so far. Counted on the device, read back once per evaluation.
    """

    def __init__(self):
        super().__init__()
        self.seen: set = set()
        self._correct: Optional[Tensor] = None
        self._total: Optional[Tensor] = None
        self._mask: Optional[Tensor] = None

    def result(self) -> Optional[float]:
        if self._total is None:
            return None
        total = int(self._total)
        return float(self._correct) / total if total else 0.0

    def reset(self) -> None:
        self._correct = self._total = self._mask = None

    def before_training_exp(self, strategy):
        classes = getattr(strategy.experience, "classes_in_this_experience", None) or []
        self.seen.update(int(c) for c in classes)

    def before_eval(self, strategy):
        self.reset()
        seen = getattr(strategy.model, "seen_classes", None)
        seen = sorted(self.seen if seen is None else seen)
        size = max(seen, default=-1) + 1
        self._mask = torch.zeros(size + 1, dtype=torch.bool, device=strategy.device)
        if seen:
            self._mask[torch.tensor(seen, device=strategy.device)] = True
        self._correct = torch.zeros((), dtype=torch.long, device=strategy.device)
        self._total = torch.zeros((), dtype=torch.long, device=strategy.device)

    @torch.no_grad()
    def after_eval_iteration(self, strategy):
        y = strategy.mb_y
        keep = self._mask[y.clamp(max=self._mask.numel() - 1)]
        hit = strategy.mb_output.argmax(1) == y
        self._correct += (hit & keep).sum()
        self._total += keep.sum()

    def after_eval(self, strategy):
        value = self.result()
        if value is None:
            return None
        stream = strategy.experience.origin_stream.name
        name = f"{self}/eval_phase/{stream}_stream/Task000"
        return [MetricValue(self, name, value, strategy.clock.train_iterations)]

    def __str__(self):
        return "Top1_Acc_Stream_SeenClasses"
