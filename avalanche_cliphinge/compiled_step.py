"""One captured graph per stage-1 training step (the ``compile_step`` config key).

Avalanche's loop spreads a step over callbacks (replay in ``before_forward``, the hinge in
``before_backward``, metrics after the iteration) and runs Adam eagerly, so the host
dispatches every op of the step one by one. ``CompiledStep`` runs a task's stage-1 epochs
as one ``torch.compile(fullgraph=True)`` function per step shape (``mode="reduce-overhead"``,
CUDA graphs, on CUDA): the minibatch gather from the cached features, the prompt encoder's
forward and backward, the logits, the cross-entropy over real and replayed features, the
plugins' loss terms (``step_state.StepTerm``), the non-finite record, the epoch metrics' sums
and the Adam update (capturable, with a device learning rate) are captured together.

What moves out of the step:
- the epoch's random inputs are drawn at its start, in the order the eager step draws them
  (the minibatch order, the replay chunks, the hinge's noise), into buffers allocated once
  per task and indexed inside the graph by a device step counter;
- plugins register their loss terms once per task in ``strategy.step`` (``StepState.terms``,
  ``StepState.replay_epoch``) instead of adding to ``strategy.loss`` in a callback;
- gradients are allocated once per task and zeroed inside the graph;
- per-iteration callbacks run only for the plugins that implement them (for an
  ``EvaluationPlugin``, only when one of its metrics or loggers needs them: the method's
  epoch metrics read the sums the graph keeps, ``metrics.EpochSums``).

A task has one step shape: the last minibatch, when smaller, is padded with ignored rows (zero
features, left out of the loss and the sums), and so are the replay chunks, whose sizes differ
by one. Graphs are per task (the number of classes seen changes the logits' shape). Anything
the captured step cannot reproduce (a plugin that edits the loss or the gradients in a
callback, a criterion other than cross-entropy, an optimizer other than Adam, training on
images) makes the task run Avalanche's eager step, with a warning naming the reason once.

Stage 2 gets the same treatment (``CompiledStage2``, in ``plugins.second_stage_compiled``
beside the plugin that uses it; a name of this module too): when the head trains on the
cached features (``SecondStagePlugin`` without LoRA), each of its steps (the minibatch
gather, the head's forward, the cross-entropy, backward, SGD with momentum and the epoch's
loss sum) is one call of a captured graph per task. With LoRA the images go through the
adapted encoder at every step, and stage 2 stays eager. Both make their graphs the same way
(``capture``).
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates.base_sgd import PeriodicEval
from torch import Tensor
from torch.optim.adam import adam
from torch.utils.data import DataLoader

from .capture import compile_step, fresh, traced
from .loaders import TensorBatchLoader
from .metrics import EpochSums, metric_needs
from .plugins.second_stage_compiled import CompiledStage2
from .step_state import StepTerm

__all__ = [
    "INSIDE_STEP",
    "STEP_METHODS",
    "CompiledStage2",
    "CompiledStep",
    "StepTerm",
    "overrides",
    "plugin_needs",
    "replaced_by_terms",
]

#: The callbacks inside a step: a plugin implementing one can see or change the step's
#: loss, gradients or weights, which the captured step does not expose.
INSIDE_STEP = (
    "before_forward",
    "after_forward",
    "before_backward",
    "after_backward",
    "before_update",
    "after_update",
)
#: The strategy methods the captured step replaces; a subclass overriding one runs eagerly.
STEP_METHODS = (
    "training_epoch",
    "forward",
    "criterion",
    "backward",
    "optimizer_step",
    "_stage1_scores",
    "_stage1_logits",
)


def overrides(obj, name: str) -> bool:
    """Whether ``obj``'s class implements callback ``name`` (not Avalanche's empty one)."""
    implementation = getattr(type(obj), name, None)
    return implementation is not None and implementation is not getattr(
        SupervisedPlugin, name, None
    )


def replaced_by_terms(plugin, name: str) -> bool:
    """Whether callback ``name`` of ``plugin`` is one its class declares as replaced by the
    ``StepTerm`` it registers (``COMPILED_STEP_REPLACES``) and not overridden below it."""
    for cls in type(plugin).__mro__:
        declared = vars(cls).get("COMPILED_STEP_REPLACES")
        if declared is not None:
            return name in declared and getattr(type(plugin), name) is getattr(cls, name)
    return False


def plugin_needs(plugin, name: str, epoch_sums: bool) -> bool:
    """Whether ``plugin`` does any work in callback ``name`` of a training step.

    An ``EvaluationPlugin`` needs it when one of its metrics does (``metrics.metric_needs``)
    or one of its loggers implements it; ``PeriodicEval`` only when it evaluates every few
    iterations; any other plugin when its class implements the callback.
    """
    if isinstance(plugin, EvaluationPlugin):
        return plugin.active and (
            any(metric_needs(m, name, epoch_sums) for m in plugin.metrics)
            or any(overrides(logger, name) for logger in plugin.loggers)
        )
    if isinstance(plugin, PeriodicEval):
        return (
            name == "after_training_iteration"
            and plugin.peval_mode == "iteration"
            and plugin.eval_every > 0
        )
    return overrides(plugin, name)


@dataclass
class _Task:
    """The static buffers and the graph of one task (allocated at its first epoch):
    ``order [steps, B]`` and ``valid [steps, B]`` (false on the padding of a smaller last
    minibatch) index the cached ``features``; ``sizes`` are the minibatch sizes."""

    sizes: List[int]
    features: Tensor
    labels: Tensor
    tasks: Tensor
    order: Tensor
    valid: Tensor
    counter: Tensor
    lr: Tensor
    params: List[Tensor]
    state: Dict[str, List[Tensor]]
    hyper: Dict[str, object]
    frozen: List[Tuple[Tensor, Tensor]]
    replay: Optional[Tuple[Tensor, Tensor]] = None
    terms: List[Tuple[StepTerm, Tuple[Tensor, ...]]] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    sums: Dict[str, Tensor] = field(default_factory=dict)
    nonfinite_step: Optional[Tensor] = None
    nonfinite_terms: Dict[str, Tensor] = field(default_factory=dict)
    graph: Optional[Callable] = None
    traced: bool = False


class CompiledStep:
    """Runs the stage-1 epochs of a ``CLIPHingeStrategy`` as captured steps.

    ``run_epoch`` trains one epoch and returns ``True``, or returns ``False`` when this task
    must run the eager step (the strategy then runs Avalanche's loop); the reason is warned
    once. Each task's graph is made (``compile``) from a fresh copy of the step function, so
    no task counts against torch's recompile limit for another.

    Args:
        strategy: the ``CLIPHingeStrategy`` whose steps it runs.
        reference: the strategy class whose step (``STEP_METHODS``) the captured one
            reproduces (``CLIPHingeStrategy`` passes itself); a strategy whose class
            overrides one of them runs eagerly. Default: ``strategy``'s class.
    """

    def __init__(self, strategy, reference: Optional[type] = None):
        self.strategy = strategy
        self.reference = type(strategy) if reference is None else reference
        #: graphs traced so far (one per task that ran captured steps)
        self.graphs_traced = 0
        self._task: Optional[_Task] = None
        self._task_id: Optional[int] = None
        self._warned: set = set()

    def __getstate__(self):
        # Pickled (Avalanche's save_checkpoint) without the task: its traced graph belongs to
        # this process and cannot be pickled; the next experience builds its task anyway.
        state = self.__dict__.copy()
        state["_task"] = state["_task_id"] = None
        return state

    def __setstate__(self, state):
        # a pickle from before ``reference``: the strategy's class was the reference
        state.setdefault("reference", type(state["strategy"]))
        self.__dict__.update(state)

    # ---- what can run captured --------------------------------------------------------------
    def unsupported(self) -> Optional[str]:
        """Why the current task cannot run the captured step, or ``None`` when it can."""
        s = self.strategy
        if not isinstance(s.dataloader, TensorBatchLoader):
            if not isinstance(s.dataloader, DataLoader):  # a plugin's (ReplayPlugin's)
                return f"stage 1 reads a plugin's {type(s.dataloader).__name__}"
            return "stage 1 trains on images (feature cache off, or a random transform)"
        if not isinstance(s._criterion, torch.nn.CrossEntropyLoss):
            return f"the criterion is {type(s._criterion).__name__}, not CrossEntropyLoss"
        if type(s.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return f"the optimizer is {type(s.optimizer).__name__}, not Adam"
        if len(s.optimizer.param_groups) != 1 or s.optimizer.defaults.get("differentiable"):
            return "the optimizer has several parameter groups or is differentiable"
        for name in STEP_METHODS:
            if getattr(type(s), name) is not getattr(self.reference, name):
                return f"{type(s).__name__} overrides {name}"
        for plugin in s.plugins:
            for name in INSIDE_STEP:
                if plugin_needs(plugin, name, True) and not replaced_by_terms(plugin, name):
                    return f"plugin {type(plugin).__name__} implements {name}"
        return None

    def _fall_back(self, reason: str) -> bool:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"compile_step: {reason}, which the captured step cannot run; this "
                "task trains with the eager step (Avalanche's loop and callbacks)",
                stacklevel=3,
            )
        return False

    # ---- per task ---------------------------------------------------------------------------
    def _build(self) -> _Task:
        s, model = self.strategy, self.strategy.model
        device = s.device
        loader = s.dataloader
        n = loader.sampler.n
        batch = min(loader.sampler.batch_size, n)
        group = s.optimizer.param_groups[0]
        params = list(group["params"])
        state = {"step": [], "exp_avg": [], "exp_avg_sq": [], "max_exp_avg_sq": []}
        for p in params:
            # gradients live for the whole task and are zeroed in the graph
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
            kept = s.optimizer.state[p]
            if not kept:
                kept["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                kept["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                kept["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            kept["step"] = kept["step"].to(device=p.device, dtype=torch.float32)
            if group["amsgrad"] and "max_exp_avg_sq" not in kept:
                kept["max_exp_avg_sq"] = torch.zeros_like(p)
            for key in state:
                if key in kept:
                    state[key].append(kept[key])
        hyper = {
            "amsgrad": group["amsgrad"],
            "beta1": group["betas"][0],
            "beta2": group["betas"][1],
            "weight_decay": group["weight_decay"],
            "eps": group["eps"],
            "maximize": group["maximize"],
            "decoupled_weight_decay": group["decoupled_weight_decay"],
        }
        with torch.no_grad():
            model.text_features()  # frozen tasks' features cached before tracing
        sizes = [min(batch, n - start) for start in range(0, n, batch)]
        # the last minibatch, when smaller, is padded with ignored rows: one step shape
        valid = torch.arange(len(sizes) * batch).view(len(sizes), batch) < n
        task = _Task(
            sizes=sizes,
            features=loader.features,
            labels=loader.labels,
            tasks=loader._tasks,
            order=torch.zeros_like(valid, dtype=torch.long, device=device),
            valid=valid.to(device),
            counter=torch.zeros((), dtype=torch.long, device=device),
            lr=torch.zeros((), dtype=torch.float32, device=device),
            params=params,
            state=state,
            hyper=hyper,
            frozen=list(s._frozen_rows),
            nonfinite_step=torch.full((), -1, dtype=torch.long, device=device),
        )
        task.graph = self.compile(types.MethodType(fresh(CompiledStep._step), self))
        return task

    def compile(self, step: Callable) -> Callable:
        """``capture.compile_step``: inductor, with CUDA graphs on CUDA."""
        return compile_step(step, self.strategy.device)

    def _fill(self, task: _Task, first_epoch: bool) -> None:
        """The epoch's inputs into the task's buffers (allocated at its first epoch)."""
        s, device = self.strategy, self.strategy.device
        order = s.dataloader.sampler.order()
        task.order.view(-1)[: order.numel()].copy_(order.to(device, non_blocking=True))
        n_steps = len(task.sizes)
        replay = s.step.replay_epoch(n_steps) if s.step.replay_epoch is not None else None
        if replay is not None:
            feats, labels = replay
            ignore = s._criterion.ignore_index
            cols = torch.where(
                labels >= 0, s.model.column_of[labels.clamp(min=0)], torch.full_like(labels, ignore)
            )
            replay = (feats.to(device, torch.float32), cols.to(device))
        drawn = [(term, term.draw(n_steps)) for term in s.step.terms.values()]
        if first_epoch:
            task.replay = None if replay is None else tuple(t.clone() for t in replay)
            task.terms = [(term, tuple(t.clone() for t in inputs)) for term, inputs in drawn]
            task.names = ["cross_entropy"] + [n for term, _ in drawn for n in term.weights]
            task.sums = {
                name: torch.zeros((), dtype=torch.float64, device=device)
                for name in ["accuracy", "loss"] + task.names
            }
            task.nonfinite_terms = {name: torch.zeros((), device=device) for name in task.names}
            self._mark_static(task)
        else:
            if replay is not None:
                for kept, new in zip(task.replay, replay):
                    kept.copy_(new)
            for (_, kept), (_, new) in zip(task.terms, drawn):
                for buffer, values in zip(kept, new):
                    buffer.copy_(values)
        task.counter.zero_()
        task.nonfinite_step.fill_(-1)
        torch._foreach_zero_(list(task.sums.values()))
        for kept in task.nonfinite_terms.values():
            kept.fill_(math.nan)
        task.lr.fill_(float(s.optimizer.param_groups[0]["lr"]))

    def _mark_static(self, task: _Task) -> None:
        """On CUDA, the buffers the graph reads or updates keep their addresses: CUDA graphs
        use them in place instead of copying them in at every replay."""
        if self.strategy.device.type != "cuda":
            return
        buffers = [
            task.features,
            task.labels,
            task.tasks,
            task.order,
            task.valid,
            task.counter,
            task.lr,
            task.nonfinite_step,
            *task.sums.values(),
            *task.nonfinite_terms.values(),
            *[p.grad for p in task.params],
            *[t for ts in task.state.values() for t in ts],
            *(task.replay or ()),
            *[t for _, inputs in task.terms for t in inputs],
            *self.strategy.model._text_cache.values(),
        ]
        for tensor in buffers:
            torch._dynamo.mark_static_address(tensor)

    # ---- the epoch --------------------------------------------------------------------------
    def run_epoch(self) -> bool:
        """Train one stage-1 epoch with captured steps; ``False``: run it eagerly instead."""
        s = self.strategy
        task_id = s.clock.train_exp_counter
        first_epoch = task_id != self._task_id
        if first_epoch:
            self._task, self._task_id = None, task_id
            reason = self.unsupported()
            if reason is not None:
                return self._fall_back(reason)
            self._task = self._build()
        task = self._task
        if task is None:
            return False
        self._fill(task, first_epoch)
        s._nonfinite_step, s._nonfinite_terms = task.nonfinite_step, task.nonfinite_terms
        sums = s.epoch_sums = EpochSums(task.sums)
        before = [
            p.before_training_iteration
            for p in s.plugins
            if p is not s.clock and plugin_needs(p, "before_training_iteration", True)
        ]
        after = [
            p.after_training_iteration
            for p in s.plugins
            if p is not s.clock and plugin_needs(p, "after_training_iteration", True)
        ]
        mark = torch.compiler.cudagraph_mark_step_begin if s.device.type == "cuda" else None
        sync_lr = s.user_scheduler
        names, clock, graph, full = task.names, s.clock, task.graph, task.order.shape[1]
        for size in task.sizes:
            if s._stop_training:
                return True
            for callback in before:
                callback(s)
            if sync_lr:
                task.lr.fill_(float(s.optimizer.param_groups[0]["lr"]))
            if mark is not None:
                mark()
            if task.traced:
                try:
                    out = graph()
                except torch._dynamo.exc.Unsupported:
                    out = self._trace(graph)  # a guard failed: torch traces it again
            else:
                out = self._trace(graph)
                task.traced = True
                self.graphs_traced += 1
            x, y, labels, scores = out[:4] if size == full else [t[:size] for t in out[:4]]
            s.mbatch, s.mb_output, s.loss = [x, y, labels], scores, out[4]
            s.step.loss_terms = dict(zip(names, out[5:]))
            sums.samples += size
            for callback in after:
                callback(s)
            clock.after_training_iteration(s)
        return True

    def _trace(self, graph: Callable):
        """Call ``graph`` while torch may trace it (``capture.traced``)."""
        return traced(graph)

    def _step(self):
        """One step, traced: the minibatch of row ``counter`` of the epoch's order (its
        padding rows ignored), forward, loss terms, non-finite record, epoch sums, backward,
        Adam; the counter moves on.

        Returns ``(x [B, dim], y [B], task labels [B], scores [B, n_outputs], loss,
        *terms)``, ``B`` the batch size (a padded last minibatch included).
        """
        s, task = self.strategy, self._task
        k = task.counter
        at = k.reshape(1)
        rows = task.order.index_select(0, at).reshape(-1)
        valid = task.valid.index_select(0, at).reshape(-1)
        # padding rows: zero features (whatever row 0 holds), ignored by every sum
        x = torch.where(valid[:, None], task.features.index_select(0, rows), 0.0)
        y, task_labels = task.labels.index_select(0, rows), task.tasks.index_select(0, rows)
        replay = cols = None
        if task.replay is not None:
            replay, cols = (t.index_select(0, at)[0] for t in task.replay)
        with s.autocast():
            scores, replay_scores, text = s._stage1_scores(x, replay)
        logits, targets = s._stage1_logits(scores, y, replay_scores, cols)
        padding = torch.cat([~valid, torch.zeros_like(targets[valid.numel() :], dtype=bool)])
        targets = targets.masked_fill(padding, s._criterion.ignore_index)
        values = {"cross_entropy": s._criterion(logits, targets)}
        loss = values["cross_entropy"]
        for term, inputs in task.terms:
            parts = term.compute(text, tuple(t.index_select(0, at)[0] for t in inputs))
            for name, weight in term.weights.items():
                values[name] = parts[name]
                loss = loss + weight * parts[name]
        detached = loss.detach()
        bad = ~torch.isfinite(detached) & (task.nonfinite_step < 0)
        task.nonfinite_step.copy_(torch.where(bad, k, task.nonfinite_step))
        n = valid.sum().double()
        scores = scores.detach()
        task.sums["accuracy"].add_(((scores.argmax(1) == y) & valid).sum().double() / n * n)
        task.sums["loss"].add_(detached.double() * n)
        for name, value in values.items():
            value = value.detach().float().reshape(())
            kept = task.nonfinite_terms[name]
            kept.copy_(torch.where(bad, value, kept))
            task.sums[name].add_(value.double() * n)
        loss.backward()
        with torch.no_grad():
            saved = [ctx.detach().clone() for ctx, _ in task.frozen]
            grads = [p.grad for p in task.params]
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
            # rows of a returning task whose classes are absent stay as they were
            for (ctx, keep), old in zip(task.frozen, saved):
                ctx.copy_(torch.where(keep[:, None, None], old, ctx))
            for grad in grads:
                grad.zero_()
            k.add_(1)
        return (x, y, task_labels, scores, detached, *[value.detach() for value in values.values()])
