"""Stage 1's step: the scores, the loss and its terms, the update that keeps frozen rows.

The eager runner (``CLIPHingeStrategy``'s ``forward``, ``criterion``, ``backward`` and
``optimizer_step``) calls ``stage1_scores``, ``stage1_loss``, ``EpochRecord.add`` and
``keeping_rows`` one by one; the captured runner (``compiled_step.CompiledStep``) compiles
``stage1_train_step``, which scores through the model's same ``encode_prompts`` and
``clip_logits`` over the run's padded columns and calls the same ``loss_with_terms`` and
``EpochRecord.add``, then Adam, into one graph for the whole run.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.adam import adam

from ..model.cliphinge_model import UNSEEN_SCORE
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
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The stage-1 loss of an eager step and its terms (``loss_with_terms``).

    The logits are the seen classes' columns of the minibatch's scores (class ids
    ``labels [b]``) followed by the replayed rows' (``row.replay_targets``).

    Returns ``(loss, {name: unweighted value})``: ``cross_entropy`` and the terms' names.
    """
    seen = model.class_of_column
    logits = scored.scores[:, seen].float()
    targets = model.column_of[labels]
    if scored.replay_scores is not None:
        logits = torch.cat([logits, scored.replay_scores[:, seen].float()])
        targets = torch.cat([targets, row.replay_targets])
    return loss_with_terms(model, logits, targets, scored.text, row, criterion)


def loss_with_terms(
    model,
    logits: Tensor,
    targets: Tensor,
    text: Tensor,
    row: StepRow,
    criterion: Callable[[Tensor, Tensor], Tensor],
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``criterion(logits [r, C], targets [r])`` (cross-entropy over score columns) plus each
    registered term's ``weight * value`` (``row.terms``, computed on ``text [C, dim]``).

    Returns ``(loss, {name: unweighted value})``: ``cross_entropy`` and the terms' names.
    """
    values = {"cross_entropy": criterion(logits, targets)}
    loss = values["cross_entropy"]
    for term, inputs, constants in row.terms:
        parts = term.compute(model, text, inputs, constants)
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
    """What the captured stage-1 step reads and updates: one shape for a whole run.

    Allocated once per run and step shape (``compiled_step.CompiledStep``); each task copies
    its data, prompts and plan into these buffers, so every task of a run calls one graph.
    The score columns are padded to ``N``, the number of classes of the run: columns
    ``[0, n_seen)`` are the seen classes' (as ``model.column_of`` numbers them), the rest
    masked out of the cross-entropy and the scores.

    Attributes:
        model: the ``CLIPHingeModel`` (its encoder, adapter and logit scale).
        criterion: ``torch.nn.CrossEntropyLoss`` (its ``ignore_index`` marks padding rows).
        features, labels, task_labels: ``[n, dim]``, ``[n]``, ``[n]``: the cached training
            data of the task.
        order, valid: ``[n_steps, B]`` rows of each step and whether each is real (a smaller
            last minibatch is padded).
        counter, lr: the step within the epoch and Adam's learning rate (device scalars).
        prefix, ctx, suffix, tokens: the task's prompts (``TaskPrompts``; rows past the
            task's classes are zero padding), ``ctx [T, n_ctx,
            width]`` trained here and copied back to the task's parameter.
        bank: ``[N + 1, dim]`` text features of the frozen classes in their columns; column
            ``N`` takes the padding prompts' text and is never seen.
        train_rows: ``[T]`` the columns of the task's classes (``N`` for padding rows).
        column_mask: ``[N + 1]`` the seen columns.
        class_of_column: ``[N + 1]`` class id of each column (``n_outputs`` for unseen
            columns).
        params, state, hyper: Adam's parameters (``ctx``, the adapter's), state lists and
            fixed settings.
        record: the run's ``EpochRecord`` (every term's name).
        replay: ``(features [n_steps, K, dim], targets [n_steps, K])`` or ``None``.
        terms: ``(loss term, inputs [n_steps, ...], constants)`` per registered term.
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
    prefix: Tensor
    ctx: Tensor
    suffix: Tensor
    tokens: Tensor
    bank: Tensor
    train_rows: Tensor
    column_mask: Tensor
    class_of_column: Tensor
    params: List[Tensor]
    state: Dict[str, List[Tensor]]
    hyper: Dict[str, object]
    record: EpochRecord
    replay: Optional[Tuple[Tensor, Tensor]] = None
    terms: List[Tuple[PluginLoss, Tuple[Tensor, ...], Tuple[Optional[Tensor], ...]]] = field(
        default_factory=list
    )
    autocast: Callable[[], ContextManager] = nullcontext


def stage1_train_step(task: Stage1Task) -> Tuple[Tensor, ...]:
    """One captured stage-1 step: row ``counter`` of the epoch's order and plan (padding
    rows ignored), the task's prompts through the text encoder into the padded text bank,
    the logits of the minibatch and its replayed rows over the run's columns (unseen ones
    masked), ``loss_with_terms``, ``EpochRecord.add``, backward, Adam; the counter moves on.

    Returns ``(x [B, dim], y [B], task labels [B], scores [B, n_outputs], loss, *terms)``,
    ``B`` the batch size (a padded last minibatch included), the terms in the order
    ``loss_with_terms`` returns them.
    """
    model, k = task.model, task.counter
    at = k.reshape(1)
    rows = task.order.index_select(0, at).reshape(-1)
    valid = task.valid.index_select(0, at).reshape(-1)
    # padding rows: zero features (whatever row 0 holds), ignored by every sum
    x = torch.where(valid[:, None], task.features.index_select(0, rows), 0.0)
    y, task_labels = task.labels.index_select(0, rows), task.task_labels.index_select(0, rows)
    row = row_at(at, task.replay, task.terms)
    feats = x if row.replay_features is None else torch.cat([x, row.replay_features])
    with task.autocast():
        embeddings = torch.cat([task.prefix, task.ctx.to(task.prefix.dtype), task.suffix], 1)
        text = task.bank.index_copy(
            0, task.train_rows, model.encode_prompts(embeddings, task.tokens)
        )
        logits = model.clip_logits(feats, text)
    logits = logits.float().masked_fill(~task.column_mask, float("-inf"))
    targets = model.column_of[y].masked_fill(~valid, task.criterion.ignore_index)
    if row.replay_targets is not None:
        targets = torch.cat([targets, row.replay_targets])
    loss, values = loss_with_terms(model, logits, targets, text, row, task.criterion)
    b, n_outputs = x.shape[0], model.n_outputs
    seen = logits[:b].detach().masked_fill(~task.column_mask, UNSEEN_SCORE)
    scores = torch.full((b, n_outputs + 1), UNSEEN_SCORE, device=x.device)
    scores = scores.scatter(1, task.class_of_column.expand(b, -1), seen)[:, :n_outputs]
    task.record.add(k, loss, values, scores, y, valid)
    loss.backward()
    with torch.no_grad():
        grads = [p.grad for p in task.params]
        adam_update(task, grads)
        for grad in grads:
            grad.zero_()
        k.add_(1)
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
