"""The buffers of the captured stage-1 step: one shape for a whole run.

``allocate_stage1_task`` makes a ``Stage1Task`` whose tensors every task of a run reuses
(``compiled_step.CompiledStep`` copies each task's data, prompts, Adam state and plan into
them); ``static_tensors`` lists those a CUDA graph reads or updates in place.
"""

from __future__ import annotations

from typing import Callable, ContextManager, List, Sequence, Tuple

import torch
from torch import Tensor

from .record import EpochRecord
from .stage1 import Stage1Task

#: the ``Stage1Task`` fields a CUDA graph reads or updates in place
STATIC_FIELDS = (
    "features",
    "labels",
    "task_labels",
    "order",
    "valid",
    "counter",
    "lr",
    "prefix",
    "ctx",
    "suffix",
    "tokens",
    "bank",
    "train_rows",
    "column_mask",
    "class_of_column",
)


def allocate_stage1_task(
    model,
    criterion: torch.nn.CrossEntropyLoss,
    group: dict,
    rows: Tuple[int, int, int],
    prompts,
    n_columns: int,
    dim: int,
    terms: Sequence,
    adapter: List[Tensor],
    autocast: Callable[[], ContextManager],
) -> Stage1Task:
    """Zeroed buffers of a captured stage-1 step.

    Args:
        model: the ``CLIPHingeModel``.
        criterion: the cross-entropy.
        group: the Adam parameter group (its settings).
        rows: ``(n, B, K)``: samples a task may have (a multiple of ``B``), the batch size,
            replayed rows per step.
        prompts: a task's ``TaskPrompts``: its shapes, of the largest task the buffers
            hold (a smaller task's prompts fill the first rows).
        n_columns: ``N``, the run's classes (one column more is made: where padding prompt
            rows write their text, never seen).
        dim: the feature dimension.
        terms: the plan's ``(loss term, inputs [n_steps, ...])`` (their shapes).
        adapter: the image adapter's parameters (trained in place), or none.
        autocast: the strategy's autocast context factory.
    """
    n, batch, k = rows
    device = prompts.ctx.device
    n_steps = -(-n // batch)
    ctx = torch.zeros(prompts.ctx.shape, device=device, requires_grad=True)
    params = [ctx, *adapter]
    for p in params:
        p.grad = torch.zeros_like(p)  # live for the run, zeroed in the graph
    names = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
    state = {name: [] for name in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    for p in params:
        for name in names:
            state[name].append(torch.zeros(() if name == "step" else p.shape, device=device))
    replay = None
    if k:
        replay = (
            torch.zeros(n_steps, k, dim, device=device),
            torch.zeros(n_steps, k, dtype=torch.long, device=device),
        )
    long = {"dtype": torch.long, "device": device}
    return Stage1Task(
        model=model,
        criterion=criterion,
        features=torch.zeros(n, dim, device=device),
        labels=torch.zeros(n, **long),
        task_labels=torch.zeros(n, **long),
        order=torch.zeros(n_steps, batch, **long),
        valid=(torch.arange(n_steps * batch).view(n_steps, batch) < n).to(device),
        counter=torch.zeros((), **long),
        lr=torch.zeros((), dtype=torch.float32, device=device),
        prefix=torch.zeros_like(prompts.prefix),
        ctx=ctx,
        suffix=torch.zeros_like(prompts.suffix),
        tokens=torch.zeros_like(prompts.tokens),
        bank=torch.zeros(n_columns + 1, dim, device=device),
        train_rows=torch.zeros(prompts.ctx.shape[0], **long),
        column_mask=torch.zeros(n_columns + 1, dtype=torch.bool, device=device),
        class_of_column=torch.zeros(n_columns + 1, **long),
        params=params,
        state=state,
        hyper={
            "amsgrad": group["amsgrad"],
            "beta1": group["betas"][0],
            "beta2": group["betas"][1],
            "weight_decay": group["weight_decay"],
            "eps": group["eps"],
            "maximize": group["maximize"],
            "decoupled_weight_decay": group["decoupled_weight_decay"],
        },
        record=EpochRecord(
            ["cross_entropy"] + [name for term, _ in terms for name in term.weights], device
        ),
        replay=replay,
        terms=[
            (
                term,
                tuple(t.new_zeros((n_steps, *t.shape[1:])) for t in inputs),
                tuple(torch.zeros_like(t) for t in term.constants),
            )
            for term, inputs in terms
        ],
        autocast=autocast,
    )


def static_tensors(task: Stage1Task) -> List[Tensor]:
    """Every tensor of ``task`` a CUDA graph reads or updates in place."""
    return [
        *[getattr(task, name) for name in STATIC_FIELDS],
        *task.record.tensors(),
        *[p.grad for p in task.params],
        *[t for ts in task.state.values() for t in ts],
        *(task.replay or ()),
        *[t for _, inputs, constants in task.terms for t in (*inputs, *constants)],
    ]
