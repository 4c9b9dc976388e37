"""Stage 2's step: a task head's loss on its task's data, eager or captured.

``SecondStagePlugin``'s loops (on cached features, with LoRA on images, split across torchrun
ranks) call ``stage2_targets`` and ``stage2_loss``; the captured runner
(``plugins.second_stage_compiled.CompiledStage2``) compiles ``stage2_train_step``, which calls
the same functions, then SGD, into one graph per step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.sgd import sgd

#: cross-entropy target of padding rows
IGNORE = -100


def stage2_targets(labels: Tensor, classes: Tensor) -> Tensor:
    """Head columns ``[n]`` of class ids ``labels [n]``; ``classes [c]`` are the task's
    class ids in its head's column order."""
    return (labels[:, None] == classes[None, :]).float().argmax(1)


def stage2_loss(
    head: Callable[[Tensor], Tensor],
    features: Tensor,
    targets: Tensor,
    autocast: Callable[[], ContextManager] = nullcontext,
    reduction: str = "mean",
) -> Tuple[Tensor, Tensor]:
    """Cross-entropy of ``head(features [b, dim])`` against head columns ``targets [b]``
    (``IGNORE`` rows left out). Returns ``(loss, logits [b, c])``; the logits in float32."""
    with autocast():
        logits = head(features)
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=IGNORE), logits


@dataclass
class Stage2Task:
    """What a captured stage-2 step reads and updates, allocated once per task.

    Attributes:
        head: the ``TaskHead`` being trained.
        features, targets: ``[n, dim]`` cached features of the task's data and their head
            columns ``[n]``.
        order, valid: ``[n_steps, B]`` rows of each step and whether each is real.
        counter: the step within the epoch (a device scalar).
        total: the epoch's summed loss (a device scalar).
        params, buffers, hyper: SGD's parameters, momentum buffers and settings.
        autocast: the strategy's autocast context factory.
    """

    head: torch.nn.Module
    features: Tensor
    targets: Tensor
    order: Tensor
    valid: Tensor
    counter: Tensor
    total: Tensor
    params: List[Tensor]
    buffers: List[Optional[Tensor]]
    hyper: Dict[str, object]
    autocast: Callable[[], ContextManager] = nullcontext


def stage2_train_step(task: Stage2Task) -> None:
    """One captured stage-2 step: row ``counter`` of the epoch's order (padding rows
    ignored), ``stage2_loss``, backward, SGD, the loss sum; the counter moves on."""
    at = task.counter.reshape(1)
    rows = task.order.index_select(0, at).reshape(-1)
    valid = task.valid.index_select(0, at).reshape(-1)
    # padding rows: zero features (whatever row 0 holds), left out of the loss
    x = torch.where(valid[:, None], task.features.index_select(0, rows), 0.0)
    target = task.targets.index_select(0, rows).masked_fill(~valid, IGNORE)
    loss, _ = stage2_loss(task.head, x, target, task.autocast)
    loss.backward()
    with torch.no_grad():
        grads = [p.grad for p in task.params]
        sgd(task.params, grads, task.buffers, foreach=False, fused=False, **task.hyper)
        for grad in grads:
            grad.zero_()
        task.total.add_(loss.detach() * valid.sum())
        task.counter.add_(1)
