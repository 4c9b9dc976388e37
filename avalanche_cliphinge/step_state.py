"""The declared state of a stage-1 training step: what the strategy, its plugins, the captured
runner and the metrics share, and nothing else.

``StepState`` is the state of one iteration and the loss terms plugins register for a task
(``StepTerm``); ``ExperienceClasses`` the classes of the experience being trained;
``Stage2Record`` what a stage-2 plugin keeps for the metrics. The plugins' side of the
contract (what they read on the strategy) is ``plugins.contract.MethodStrategy``. This
module imports nothing of the package, so every layer above the model can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor


@dataclass
class StepTerm:
    """Loss terms a plugin adds to every stage-1 step of a task, for the compiled step.

    Registered once per task, in ``before_training_exp``, as ``strategy.step.terms[key]``; the
    eager step ignores it and keeps calling the plugin's callbacks.

    Attributes:
        weights: ``{name: weight}`` of the terms ``compute`` returns: the step adds
            ``weight * value`` to the loss and reports the unweighted value as
            ``loss_terms[name]`` (epoch metrics, the non-finite report).
        draw: ``draw(n_steps)`` -> tuple of tensors ``[n_steps, ...]`` on the training
            device: the random inputs of every step of the epoch, drawn at its start, in the
            order the eager step draws them. Their shapes stay the same within a task.
        compute: ``compute(text_features [n_seen, dim], inputs)`` -> ``{name: scalar}``,
            where ``inputs`` holds this step's row of each tensor of ``draw``; traced into the
            step's graph, so it reads nothing back to the host and makes no tensor from host
            data.
    """

    weights: Dict[str, float]
    draw: Callable[[int], Tuple[Tensor, ...]]
    compute: Callable[[Tensor, Tuple[Tensor, ...]], Dict[str, Tensor]]


@dataclass
class StepState:
    """What one stage-1 training iteration shares between the strategy and its plugins.

    Its per-step fields are made empty at the start and at the end of every iteration, so no
    graph-attached tensor outlives its step and the model can be copied (LwF,
    ``copy.deepcopy``) between steps. What plugins register for the captured step
    (``compile_step``: ``terms``, ``replay_epoch``) is made empty when an experience starts,
    registered in ``before_training_exp`` and kept for the experience (``next``).

    Attributes:
        replay_features: ``[k, dim]`` replayed old-class features of this minibatch
            (written by ``GaussianReplayPlugin`` in ``before_forward``).
        replay_labels: ``[k]`` their class ids.
        replay_scores: ``[k, n_outputs]`` their scores, computed with the minibatch's.
        text_features: ``[n_seen, dim]`` prompted text features of this step (in the graph),
            shared with the loss terms of the plugins (the hinge).
        loss_terms: scalar loss terms by name, for the non-finite-loss report.
        terms: the plugins' ``StepTerm`` of the task, by plugin key.
        replay_epoch: ``replay_epoch(n_steps)`` -> ``(features [n_steps, k, dim], labels
            [n_steps, k])``: the replayed rows of every step of the epoch, padded with label
            ``-1`` rows (ignored) to one size ``k``, or ``None`` (no replay this epoch).
    """

    replay_features: Optional[Tensor] = None
    replay_labels: Optional[Tensor] = None
    replay_scores: Optional[Tensor] = None
    text_features: Optional[Tensor] = None
    loss_terms: Dict[str, Tensor] = field(default_factory=dict)
    terms: Dict[str, StepTerm] = field(default_factory=dict)
    replay_epoch: Optional[Callable[[int], Optional[Tuple[Tensor, Tensor]]]] = None

    def next(self) -> "StepState":
        """An empty state for the next step, with this experience's registrations."""
        return StepState(terms=self.terms, replay_epoch=self.replay_epoch)


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
