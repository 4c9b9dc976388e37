"""The declared state of a stage-1 training step: what the strategy, its plugins, the captured
runner and the metrics share, and nothing else.

``StepState`` is the state of one iteration and what plugins register for a task
(``PluginLoss``, ``ReplaySource``); ``ExperienceClasses`` the classes of the experience being trained;
``Stage2Record`` what a stage-2 plugin keeps for the metrics. The plugins' side of the
contract (what they read on the strategy) is ``plugins.contract.MethodStrategy``. This
module imports nothing of the package, so every layer above the model can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple, runtime_checkable

from torch import Tensor


@dataclass
class PluginLoss:
    """A loss term a plugin adds to every stage-1 step of a task (the hinge).

    Registered once per task, in ``before_training_exp``, as
    ``strategy.step.plugin_losses[key]``; both runners draw its inputs at each epoch's start
    (``step.draw_epoch_plan``) and add it in ``step.stage1_loss``.

    Attributes:
        weights: ``{name: weight}`` of the terms ``compute`` returns: the step adds
            ``weight * value`` to the loss and reports the unweighted value as
            ``loss_terms[name]`` (epoch metrics, the non-finite report).
        draw: ``draw(n_steps)`` -> tuple of tensors ``[n_steps, ...]`` on the training
            device: the random inputs of every step of the epoch, drawn at its start, step
            by step. Their shapes stay the same within a task.
        compute: ``compute(model, text_features [n_seen, dim], inputs, constants)`` ->
            ``{name: scalar}``, where ``inputs`` holds this step's row of each tensor of
            ``draw``; traced into the captured step's graph, so it reads nothing back to the
            host, makes no tensor from host data, and reads the task only from ``constants``
            (the same function serves every task of a run).
        constants: the task's tensors ``compute`` reads (indices, masks), or ``None`` items.
        reported: the names the epoch metrics report this task (default: every name of
            ``weights``; a term padded to the run's shape without content adds 0 and is not
            reported).
    """

    weights: Dict[str, float]
    draw: Callable[[int], Tuple[Tensor, ...]]
    compute: Callable[..., Dict[str, Tensor]]
    constants: Tuple[Optional[Tensor], ...] = ()
    reported: Optional[Set[str]] = None

    def reported_names(self) -> List[str]:
        """The names of ``weights`` the metrics report, in order."""
        return [n for n in self.weights if self.reported is None or n in self.reported]


#: ``replay_source(epoch, n_steps)`` -> ``(features [n_steps, k, dim], labels [n_steps, k],
#: sizes)``: the replayed rows of every step of an epoch, padded with zero rows labelled ``-1``
#: to one size ``k`` (``sizes``: the real rows of each step), or ``None`` (no replay).
ReplaySource = Callable[[int, int], Optional[Tuple[Tensor, Tensor, List[int]]]]


@dataclass
class StepState:
    """What one stage-1 training iteration shares between the strategy and its plugins.

    Its per-step fields are made empty at the start and at the end of every iteration, so no
    graph-attached tensor outlives its step and the model can be copied (LwF,
    ``copy.deepcopy``) between steps. What plugins register (``plugin_losses``,
    ``replay_source``) is made empty when an experience starts, registered in
    ``before_training_exp`` and kept for the experience (``next``).

    Attributes:
        replay_features: ``[k, dim]`` replayed old-class features of this minibatch.
        replay_labels: ``[k]`` their class ids.
        replay_scores: ``[k, n_outputs]`` their scores, computed with the minibatch's.
        text_features: ``[n_seen, dim]`` prompted text features of this step (in the graph).
        loss_terms: this step's unweighted loss terms by name (``cross_entropy``,
            ``text_hinge``...), for the epoch metrics and the non-finite-loss report.
        plugin_losses: the plugins' ``PluginLoss`` registrations of the task, by plugin key.
        replay_source: the replay plugin's ``ReplaySource``, or ``None``.
    """

    replay_features: Optional[Tensor] = None
    replay_labels: Optional[Tensor] = None
    replay_scores: Optional[Tensor] = None
    text_features: Optional[Tensor] = None
    loss_terms: Dict[str, Tensor] = field(default_factory=dict)
    plugin_losses: Dict[str, PluginLoss] = field(default_factory=dict)
    replay_source: Optional[ReplaySource] = None

    def next(self) -> "StepState":
        """An empty state for the next step, with this experience's registrations."""
        return StepState(plugin_losses=self.plugin_losses, replay_source=self.replay_source)


@dataclass
class ExperienceClasses:
    """The classes of the experience being trained, as the plugins need them.

    Attributes:
        present: class ids with samples in the experience, ascending.
        new: those learned for the first time (the task created for them is ``task``).
        returning: those learned in an earlier experience.
        old: classes learned earlier and absent from this experience (replay, hinge pairs).
        task: index of the task created for ``new``, or ``None`` when every class returns.
    """

    present: List[int] = field(default_factory=list)
    new: List[int] = field(default_factory=list)
    returning: List[int] = field(default_factory=list)
    old: List[int] = field(default_factory=list)
    task: Optional[int] = None


@runtime_checkable
class Stage2Record(Protocol):
    """A plugin that trains stage 2 and keeps its epochs' losses (``SecondStagePlugin``);
    ``metrics.Stage2EpochLoss`` reads them from the first such plugin of the strategy.

    Attributes:
        stage2_losses: the mean training loss of each stage-2 epoch of the latest run, in
            epoch order; a new list per run (a list already reported is not reported again).
    """

    stage2_losses: List[float]
