"""The shapes of the captured stage-1 step: which tasks share a graph, how large it is made.

A graph is made for buffers of fixed sizes (``step.allocate_stage1_task``). ``stage1_shape``
says what of a task must match a built shape exactly (the key) and what only has to fit in it
(steps, replayed rows per step, prompts); ``capacity`` sizes a new shape for the run's larger
tasks, ``fits`` says whether a task fits a built one. ``compiled_step.CompiledStep`` keeps the
built shapes.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .capture import STEP_HEADROOM
from .step import Stage1Task

__all__ = ["PROMPT_FILL", "STEP_HEADROOM", "adam_rows", "capacity", "fits", "stage1_shape"]

#: a shape made for a task of T classes also runs tasks of T / PROMPT_FILL to T classes, their
#: prompts padded with rows that train nothing (the smoke layout's tasks of 4, 2, 2 and 2
#: classes share a graph; B50 Inc10's first task of 50 classes gets a shape of its own)
PROMPT_FILL = 2


def stage1_shape(strategy) -> Tuple[tuple, Tuple[int, int, int]]:
    """What fixes the captured step's shapes in the strategy's current task: ``(key,
    (steps, replayed rows per step, prompts))``.

    ``key`` holds what must match exactly: the config's batch size (a task with fewer samples
    pads its one minibatch), one prompt's shape, whether there is replay, each loss term's
    per-step shape. The rest only has to fit a built shape (``fits``).
    """
    sampler, model = strategy.dataloader.sampler, strategy.model
    batch = sampler.batch_size
    prompts = model.prompts[model.n_tasks - 1]
    plan = strategy.epoch_plan
    k = 0 if plan.replay_features is None else plan.replay_features.shape[1]
    terms = tuple(
        (
            tuple(term.weights.items()),
            getattr(term.compute, "__func__", term.compute),
            tuple(tuple(t.shape[1:]) for t in inputs),
            tuple(tuple(t.shape) for t in term.constants),
        )
        for term, inputs in plan.terms
    )
    one_prompt = (tuple(prompts.ctx.shape[1:]), tuple(prompts.tokens.shape[1:]))
    key = (batch, one_prompt, strategy.step.replay_source is not None, terms)
    return key, (-(-sampler.n // batch), k, prompts.ctx.shape[0])


def fits(task: Stage1Task, needs: Tuple[int, int, int]) -> bool:
    """Whether a task of ``needs`` (``stage1_shape``) runs in the built buffers ``task``: no
    more steps or replayed rows per step than they hold, and from ``1 / PROMPT_FILL`` of
    their prompts to all of them."""
    n_steps, k, n_prompts = needs
    rows = task.ctx.shape[0]
    return (
        task.order.shape[0] >= n_steps
        and (task.replay is None or task.replay[0].shape[1] >= k)
        and n_prompts <= rows <= n_prompts * PROMPT_FILL
    )


def capacity(strategy, needs: Tuple[int, int, int]) -> Tuple[int, int]:
    """``(steps, replayed rows per step)`` of a new shape for a task of ``needs``: a quarter
    more steps (``STEP_HEADROOM``), and ``replay_rows``."""
    n_steps, k, n_prompts = needs
    return int(n_steps * STEP_HEADROOM) + 1, max(k, replay_rows(strategy, n_steps, n_prompts))


def replay_rows(strategy, n_steps: int, task_size: int) -> int:
    """Replayed rows per step a shape made now holds: the largest chunk any task of the run
    can have, or 0 without replay.

    With ``replay_classes_per_step`` that is its classes' rows. Otherwise the config's volume
    (``samples_per_old_class`` of every old class) over a task's steps, largest for the run's
    last task (the most old classes) when it has the fewest steps: with the layout known, a
    task of the layout's smallest class count, its steps estimated from this task's samples
    per class (``task_size`` classes, ``n_steps`` steps) and a quarter fewer; without it,
    every class but this task's over this task's steps a quarter fewer."""
    if strategy.step.replay_source is None:
        return 0
    config, sampler = strategy.config, strategy.dataloader.sampler
    per_class = config.samples_per_old_class
    if config.replay_classes_per_step > 0:
        return config.replay_classes_per_step * per_class
    if config.layout_is_set:
        smallest = min(config.task_size(t) for t in range(config.total_tasks))
        samples = int(smallest * sampler.n / max(task_size, 1))
        n_steps = min(n_steps, -(-samples // sampler.batch_size))
        old = config.n_classes - smallest
    else:
        old = strategy.model.n_outputs - task_size
    steps = max(int(n_steps / STEP_HEADROOM), 1)
    return -(-max(old, 1) * per_class // steps)


def adam_rows(buffer: Tensor, parameter: Tensor) -> Tensor:
    """The part of an Adam state ``buffer`` that holds ``parameter``'s rows (a padded
    prompt buffer has more rows; the step count is a scalar)."""
    return buffer if buffer.dim() == 0 else buffer[: parameter.shape[0]]
