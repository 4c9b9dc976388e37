"""Stage 1's step: the scores, the loss and its terms, the update that keeps frozen rows.

The eager runner (``CLIPHingeStrategy``'s ``forward``, ``criterion``, ``backward`` and
``optimizer_step``) calls ``stage1_scores``, ``stage1_loss``, ``EpochRecord.add`` and
``keeping_rows`` one by one; the captured runner (``compiled_step.CompiledStep``) compiles
``stage1_train_step``, which calls the same functions, then Adam, into one graph per step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.adam import adam

from ..step_state import PluginLoss
from .plan import StepRow, row_at
from .record import EpochRecord

#: ``(prompt context [n_classes, n_ctx, width], keep [n_classes] bool)``: rows kept as they
#: were by every update (classes of a returning task absent from the experience)
FrozenRows = Tuple[Tensor, Tensor]


class Stage1Scores(NamedTuple):
    """The model's output for a minibatch and its replayed rows, in one call.

    Attributes:
        scores: ``[b, n_outputs]`` scores of the minibatch.
        replay_scores: ``[k, n_outputs]`` scores of the replayed features, or ``None``.
        text: ``[n_seen, dim]`` the step's prompted text features (in the graph), shared
            with the plugins' loss terms.
    """

    scores: Tensor
    replay_scores: Optional[Tensor]
    text: Tensor


def stage1_scores(model, features: Tensor, replay_features: Optional[Tensor]) -> Stage1Scores:
    """Score ``features [b, dim]`` (frozen image features) and ``replay_features [k, dim]``
    (or ``None``) with one pass of the trainable prompts through the text encoder."""
    n_real = features.shape[0]
    if replay_features is not None:
        features = torch.cat([features, replay_features.to(features.dtype)])
    text = model.text_features()
    scores = model(features, text_features=text)
    replay = None if replay_features is None else scores[n_real:]
    return Stage1Scores(scores[:n_real], replay, text)


def stage1_loss(
    model,
    scored: Stage1Scores,
    labels: Tensor,
    row: StepRow,
    criterion: Callable[[Tensor, Tensor], Tensor],
    valid: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The stage-1 loss of a step and its terms.

    ``criterion`` (cross-entropy) over the seen classes' columns of the minibatch's scores
    (class ids ``labels [b]``; ``valid [b]``, default every row, sets padding rows to
    ``ignore_index``) followed by the replayed rows (``row.replay_targets``), plus each
    registered term's ``weight * value`` (``row.terms``, computed on ``scored.text``).

    Returns ``(loss, {name: unweighted value})``: ``cross_entropy`` and the terms' names.
    """
    seen = model.class_of_column
    logits = scored.scores[:, seen].float()
    targets = model.column_of[labels]
    if valid is not None:
        targets = targets.masked_fill(~valid, ignore_index)
    if scored.replay_scores is not None:
        logits = torch.cat([logits, scored.replay_scores[:, seen].float()])
        targets = torch.cat([targets, row.replay_targets])
    values = {"cross_entropy": criterion(logits, targets)}
    loss = values["cross_entropy"]
    for term, inputs in row.terms:
        parts = term.compute(scored.text, inputs)
        for name, weight in term.weights.items():
            values[name] = parts[name]
            loss = loss + weight * parts[name]
    return loss, values


def keeping_rows(update: Callable[[], object], frozen: Sequence[FrozenRows]) -> None:
    """Run ``update`` (an optimizer step), then put the ``frozen`` rows back as they were."""
    saved = [ctx.detach().clone() for ctx, _ in frozen]
    update()
    with torch.no_grad():
        for (ctx, keep), old in zip(frozen, saved):
            ctx.copy_(torch.where(keep[:, None, None], old, ctx))


@dataclass
class Stage1Task:
    """What a captured stage-1 step reads and updates, allocated once per task.

    Attributes:
        model: the ``CLIPHingeModel``.
        criterion: ``torch.nn.CrossEntropyLoss`` (its ``ignore_index`` marks padding rows).
        features, labels, task_labels: ``[n, dim]``, ``[n]``, ``[n]``: the cached training
            data of the experience.
        order, valid: ``[n_steps, B]`` rows of each step and whether each is real (a smaller
            last minibatch is padded).
        counter: the step within the epoch (a device scalar).
        lr: Adam's learning rate (a device scalar).
        params, state, hyper: Adam's parameters, its state lists (``exp_avg``...) and its
            fixed settings.
        frozen: rows every update keeps.
        replay: ``(features [n_steps, k, dim], targets [n_steps, k])`` or ``None``.
        terms: ``(loss term, inputs [n_steps, ...])`` per registered ``PluginLoss``.
        record: the epoch's ``EpochRecord``.
        autocast: the strategy's autocast context factory.
    """

    model: object
    criterion: torch.nn.CrossEntropyLoss
    features: Tensor
    labels: Tensor
    task_labels: Tensor
    order: Tensor
    valid: Tensor
    counter: Tensor
    lr: Tensor
    params: List[Tensor]
    state: Dict[str, List[Tensor]]
    hyper: Dict[str, object]
    frozen: List[FrozenRows]
    record: EpochRecord
    replay: Optional[Tuple[Tensor, Tensor]] = None
    terms: List[Tuple[PluginLoss, Tuple[Tensor, ...]]] = field(default_factory=list)
    autocast: Callable[[], ContextManager] = nullcontext


def stage1_train_step(task: Stage1Task) -> Tuple[Tensor, ...]:
    """One captured stage-1 step: row ``counter`` of the epoch's order and plan (padding
    rows ignored), ``stage1_scores``, ``stage1_loss``, ``EpochRecord.add``, backward, Adam
    through ``keeping_rows``; the counter moves on.

    Returns ``(x [B, dim], y [B], task labels [B], scores [B, n_outputs], loss, *terms)``,
    ``B`` the batch size (a padded last minibatch included), the terms in the order
    ``stage1_loss`` returns them.
    """
    k = task.counter
    at = k.reshape(1)
    rows = task.order.index_select(0, at).reshape(-1)
    valid = task.valid.index_select(0, at).reshape(-1)
    # padding rows: zero features (whatever row 0 holds), ignored by every sum
    x = torch.where(valid[:, None], task.features.index_select(0, rows), 0.0)
    y, task_labels = task.labels.index_select(0, rows), task.task_labels.index_select(0, rows)
    row = row_at(at, task.replay, task.terms)
    with task.autocast():
        scored = stage1_scores(task.model, x, row.replay_features)
    loss, values = stage1_loss(
        task.model, scored, y, row, task.criterion, valid, task.criterion.ignore_index
    )
    task.record.add(k, loss, values, scored.scores, y, valid)
    loss.backward()
    with torch.no_grad():
        grads = [p.grad for p in task.params]
        keeping_rows(lambda: adam_update(task, grads), task.frozen)
        for grad in grads:
            grad.zero_()
        k.add_(1)
    scores = scored.scores.detach()
    return (x, y, task_labels, scores, loss.detach(), *[v.detach() for v in values.values()])


def adam_update(task: Stage1Task, grads: List[Tensor]) -> None:
    """``torch.optim.Adam``'s update in its capturable functional form (device lr)."""
    adam(
        task.params,
        grads,
        task.state["exp_avg"],
        task.state["exp_avg_sq"],
        task.state["max_exp_avg_sq"],
        task.state["step"],
        foreach=False,
        capturable=True,
        differentiable=False,
        fused=False,
        lr=task.lr,
        **task.hyper,
    )
