"""The method's training step, written once, free of Avalanche.

Both runners call these functions: the eager runner is Avalanche's loop, whose ``forward``,
``criterion``, ``backward`` and ``optimizer_step`` (``CLIPHingeStrategy``) and whose stage-2
loop (``SecondStagePlugin``) call them one by one; the captured runner
(``compiled_step.CompiledStep``, ``plugins.second_stage_compiled.CompiledStage2``) compiles
``stage1_train_step`` and ``stage2_train_step``, which call the same functions, into one
graph per step.

- ``plan``: the epoch's random inputs drawn once at its start (``EpochPlan``: the replayed
  rows and the plugins' loss-term inputs of every step; ``draw_epoch_plan``).
- ``record``: what an epoch sums on the device (``EpochRecord``: accuracy, loss, each loss
  term, the first non-finite step and its terms).
- ``stage1``: ``stage1_scores``, ``stage1_loss`` and ``loss_with_terms`` (the cross-entropy
  and the plugins' terms), ``keeping_rows`` (an optimizer update that leaves frozen prompt
  rows as they were) and the captured step ``stage1_train_step`` (one shape for a run).
- ``stage2``: ``stage2_targets``, ``stage2_loss`` and the captured step ``stage2_train_step``.
- ``run_shape``: the captured stage-1 step's buffers, one shape for a run.
"""

from .plan import EpochPlan, StepRow, draw_epoch_plan
from .record import EpochRecord
from .run_shape import allocate_stage1_task, static_tensors
from .stage1 import (
    Stage1Scores,
    Stage1Task,
    keeping_rows,
    loss_with_terms,
    stage1_loss,
    stage1_scores,
    stage1_train_step,
)
from .stage2 import Stage2Task, stage2_loss, stage2_targets, stage2_train_step

__all__ = [
    "EpochPlan",
    "EpochRecord",
    "Stage1Scores",
    "Stage1Task",
    "Stage2Task",
    "StepRow",
    "allocate_stage1_task",
    "draw_epoch_plan",
    "keeping_rows",
    "loss_with_terms",
    "stage1_loss",
    "stage1_scores",
    "stage1_train_step",
    "stage2_loss",
    "stage2_targets",
    "stage2_train_step",
    "static_tensors",
]
