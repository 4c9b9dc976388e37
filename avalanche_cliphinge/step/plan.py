"""An epoch's random inputs, drawn once at its start for both runners.

What the plugins registered for the experience (``step_state.StepState``: the replay source
and the loss terms) is drawn here for every step of the epoch, in the order an eager step
would draw it; the eager runner reads the row of its iteration, the captured runner copies
the whole plan into its buffers and reads a row per step by a device counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..step_state import PluginLoss, StepState


class StepRow(NamedTuple):
    """One step's row of an ``EpochPlan``.

    Attributes:
        replay_features: ``[k, dim]`` replayed old-class features, or ``None``.
        replay_targets: ``[k]`` their score columns (``ignore_index`` on padding rows).
        replay_labels: ``[k]`` their class ids (``-1`` on padding rows).
        terms: ``(loss term, its inputs of this step, its constants)`` per registered
            ``PluginLoss``.
    """

    replay_features: Optional[Tensor]
    replay_targets: Optional[Tensor]
    replay_labels: Optional[Tensor]
    terms: Tuple[Tuple[PluginLoss, Tuple[Tensor, ...], Tuple[Optional[Tensor], ...]], ...]


@dataclass
class EpochPlan:
    """The random inputs of every step of one stage-1 epoch.

    Attributes:
        n_steps: the epoch's steps (its loader's length).
        replay_features: ``[n_steps, k, dim]`` float32 replayed features, padded with zero
            rows to the largest step's ``k``, or ``None`` (no replay this epoch).
        replay_labels: ``[n_steps, k]`` their class ids, ``-1`` on padding rows.
        replay_targets: ``[n_steps, k]`` their score columns, ``ignore_index`` on padding.
        replay_sizes: the real replayed rows of each step.
        terms: ``(loss term, inputs [n_steps, ...] of each step)`` per registered term.
    """

    n_steps: int
    replay_features: Optional[Tensor] = None
    replay_labels: Optional[Tensor] = None
    replay_targets: Optional[Tensor] = None
    replay_sizes: List[int] = field(default_factory=list)
    terms: List[Tuple[PluginLoss, Tuple[Tensor, ...]]] = field(default_factory=list)

    def row(self, step: int) -> StepRow:
        """Step ``step``'s row (modulo ``n_steps``), the replay without its padding rows."""
        i = step % max(self.n_steps, 1)
        terms = tuple(
            (term, tuple(t[i] for t in inputs), term.constants) for term, inputs in self.terms
        )
        if self.replay_features is None:
            return StepRow(None, None, None, terms)
        size = self.replay_sizes[i]
        return StepRow(
            self.replay_features[i, :size],
            self.replay_targets[i, :size],
            self.replay_labels[i, :size],
            terms,
        )


def draw_epoch_plan(
    state: StepState,
    epoch: int,
    n_steps: int,
    column_of: Tensor,
    ignore_index: int,
    device: torch.device,
) -> EpochPlan:
    """Draw epoch ``epoch``'s plan of ``n_steps`` steps from what plugins registered.

    Args:
        state: the experience's ``StepState`` (its ``replay_source`` and ``plugin_losses``).
        epoch: the epoch within the experience (0-based), for the replay's generator.
        n_steps: steps of the epoch.
        column_of: ``[n_outputs]`` score column of each class id (``model.column_of``).
        ignore_index: the cross-entropy's target of padding rows.
        device: where the plan's tensors live.
    """
    plan = EpochPlan(n_steps=n_steps)
    drawn = state.replay_source(epoch, n_steps) if state.replay_source is not None else None
    if drawn is not None:
        feats, labels, sizes = drawn
        labels = labels.to(device)
        plan.replay_features = feats.to(device, torch.float32)
        plan.replay_labels = labels
        plan.replay_targets = torch.where(
            labels >= 0, column_of[labels.clamp(min=0)], torch.full_like(labels, ignore_index)
        )
        plan.replay_sizes = list(sizes)
    plan.terms = [(term, term.draw(n_steps)) for term in state.plugin_losses.values()]
    return plan


def row_at(
    at: Tensor,
    replay: Optional[Tuple[Tensor, Tensor]],
    terms: List[Tuple[PluginLoss, Tuple[Tensor, ...], Tuple[Optional[Tensor], ...]]],
) -> StepRow:
    """The row ``at`` (a ``[1]`` device index) of a plan's padded tensors, as the captured
    step reads it: ``replay`` is ``(features [n_steps, k, dim], targets [n_steps, k])``,
    ``terms`` each term with its inputs ``[n_steps, ...]`` and its constants."""
    features = targets = None
    if replay is not None:
        features, targets = (t.index_select(0, at)[0] for t in replay)
    picked = tuple(
        (term, tuple(t.index_select(0, at)[0] for t in inputs), constants)
        for term, inputs, constants in terms
    )
    return StepRow(features, targets, None, picked)
