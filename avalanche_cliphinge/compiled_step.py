"""The captured runner of stage 1 (the ``compile_step`` config key).

Avalanche's loop dispatches every op of a step from the host. ``CompiledStep`` runs a
task's stage-1 epochs as calls of one ``torch.compile(fullgraph=True)`` graph per step
(``mode="reduce-overhead"``, CUDA graphs, on CUDA) of ``step.stage1_train_step``: the same
``stage1_scores``, ``stage1_loss``, ``EpochRecord.add`` and ``keeping_rows`` the eager runner
calls, with Adam in its capturable functional form, backward traced into the graph.

What the runner adds around the step, and nothing else: buffers allocated once per task
(``step.Stage1Task``: the epoch's minibatch order padded to one shape, the epoch plan's
replay rows and loss-term inputs copied in at each epoch's start, gradients, Adam's state, a
device step counter and learning rate), the per-iteration callbacks of the plugins that
implement them, and the clock. Anything the captured step cannot reproduce (a plugin that
works inside a step, a criterion other than cross-entropy, an optimizer other than Adam,
training on images, a subclass that overrides a step method) makes the task run Avalanche's
eager loop, with a warning naming the reason once. Graphs are per task (the number of
classes seen changes the logits' shape).

Stage 2's captured runner is ``plugins.second_stage_compiled.CompiledStage2`` (a name of this
module too), beside the plugin that uses it.
"""

from __future__ import annotations

import types
import warnings
from typing import Callable, Optional

import torch
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates.base_sgd import PeriodicEval
from torch.utils.data import DataLoader

from .capture import compile_step, fresh, traced
from .loaders import TensorBatchLoader
from .metrics import metric_needs
from .plugins.second_stage_compiled import CompiledStage2
from .step import Stage1Task, stage1_train_step

__all__ = ["INSIDE_STEP", "STEP_METHODS", "CompiledStage2", "CompiledStep", "plugin_needs"]

#: Avalanche's callbacks inside a step (around forward, backward and the update): a plugin
#: implementing one can see or change the step's loss, gradients or weights, which the
#: captured step does not expose.
INSIDE_STEP = tuple(
    name
    for name in dir(SupervisedPlugin)
    if name.startswith(("before_", "after_"))
    and name.split("_", 1)[1] in ("forward", "backward", "update")
)
#: The strategy's methods that make the eager step (Avalanche's loop and its hooks); the
#: captured step calls the ``step`` functions instead, so a subclass overriding one runs eagerly.
STEP_METHODS = (
    "training_epoch",
    "_before_forward",
    "forward",
    "criterion",
    "backward",
    "optimizer_step",
)


def overrides(obj, name: str) -> bool:
    """Whether ``obj``'s class implements callback ``name`` (not Avalanche's empty one)."""
    implementation = getattr(type(obj), name, None)
    return implementation is not None and implementation is not getattr(
        SupervisedPlugin, name, None
    )


def plugin_needs(plugin, name: str, sums_kept: bool) -> bool:
    """Whether ``plugin`` does any work in callback ``name`` of a training step.

    An ``EvaluationPlugin`` needs it when one of its metrics does (``metrics.metric_needs``)
    or one of its loggers implements it; ``PeriodicEval`` only when it evaluates every few
    iterations; any other plugin when its class implements the callback.
    """
    if isinstance(plugin, EvaluationPlugin):
        return plugin.active and (
            any(metric_needs(m, name, sums_kept) for m in plugin.metrics)
            or any(overrides(logger, name) for logger in plugin.loggers)
        )
    if isinstance(plugin, PeriodicEval):
        return (
            name == "after_training_iteration"
            and plugin.peval_mode == "iteration"
            and plugin.eval_every > 0
        )
    return overrides(plugin, name)


class CompiledStep:
    """Runs the stage-1 epochs of a ``CLIPHingeStrategy`` as captured steps.

    ``run_epoch`` trains one epoch and returns ``True``, or returns ``False`` when this task
    must run the eager step (the strategy then runs Avalanche's loop); the reason is warned
    once. Each task's graph is made (``compile``) from a fresh copy of
    ``step.stage1_train_step``, so no task counts against torch's recompile limit for another.
    It reads the strategy's public state only: ``dataloader`` (a ``TensorBatchLoader``),
    ``optimizer``, ``loss_function``, ``model``, ``frozen_rows``, ``epoch_plan``,
    ``epoch_record``, ``plugins``, ``clock``, ``autocast``.

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
        self._task: Optional[Stage1Task] = None
        self._graph: Optional[Callable] = None
        self._traced = False
        self._task_id: Optional[int] = None
        self._warned: set = set()

    def __getstate__(self):
        # Pickled (Avalanche's save_checkpoint) without the task: its traced graph belongs to
        # this process and cannot be pickled; the next experience builds its task anyway.
        state = self.__dict__.copy()
        state["_task"] = state["_task_id"] = state["_graph"] = None
        state["_traced"] = False
        return state

    def __setstate__(self, state):
        # a pickle from before ``reference``: the strategy's class was the reference
        state.setdefault("reference", type(state["strategy"]))
        state.setdefault("_graph", None)
        state.setdefault("_traced", False)
        self.__dict__.update(state)

    # ---- what can run captured --------------------------------------------------------------
    def unsupported(self) -> Optional[str]:
        """Why the current task cannot run the captured step, or ``None`` when it can."""
        s = self.strategy
        if not isinstance(s.dataloader, TensorBatchLoader):
            if not isinstance(s.dataloader, DataLoader):  # a plugin's (ReplayPlugin's)
                return f"stage 1 reads a plugin's {type(s.dataloader).__name__}"
            return "stage 1 trains on images (feature cache off, or a random transform)"
        if not isinstance(s.loss_function, torch.nn.CrossEntropyLoss):
            return f"the criterion is {type(s.loss_function).__name__}, not CrossEntropyLoss"
        if type(s.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return f"the optimizer is {type(s.optimizer).__name__}, not Adam"
        if len(s.optimizer.param_groups) != 1 or s.optimizer.defaults.get("differentiable"):
            return "the optimizer has several parameter groups or is differentiable"
        for name in STEP_METHODS:
            if getattr(type(s), name) is not getattr(self.reference, name):
                return f"{type(s).__name__} overrides {name}"
        for plugin in s.plugins:
            for name in INSIDE_STEP:
                if plugin_needs(plugin, name, True):
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
    def _build(self) -> Stage1Task:
        s, device = self.strategy, self.strategy.device
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
            s.model.text_features()  # frozen tasks' features cached before tracing
        n_steps = -(-n // batch)
        # the last minibatch, when smaller, is padded with ignored rows: one step shape
        valid = torch.arange(n_steps * batch).view(n_steps, batch) < n
        return Stage1Task(
            model=s.model,
            criterion=s.loss_function,
            features=loader.features,
            labels=loader.labels,
            task_labels=loader.task_labels,
            order=torch.zeros_like(valid, dtype=torch.long, device=device),
            valid=valid.to(device),
            counter=torch.zeros((), dtype=torch.long, device=device),
            lr=torch.zeros((), dtype=torch.float32, device=device),
            params=params,
            state=state,
            hyper=hyper,
            frozen=list(s.frozen_rows),
            record=s.epoch_record,
            autocast=s.autocast,
        )

    def compile(self, step: Callable) -> Callable:
        """``capture.compile_step``: inductor, with CUDA graphs on CUDA."""
        return compile_step(step, self.strategy.device)

    def _fill(self, task: Stage1Task, first_epoch: bool) -> None:
        """The epoch's order and plan into the task's buffers (allocated at its first epoch)."""
        s, device = self.strategy, self.strategy.device
        order = s.dataloader.sampler.order()
        task.order.view(-1)[: order.numel()].copy_(order.to(device, non_blocking=True))
        plan = s.epoch_plan
        replay = None
        if plan.replay_features is not None:
            replay = (plan.replay_features, plan.replay_targets)
        if first_epoch:
            task.replay = None if replay is None else tuple(t.clone() for t in replay)
            task.terms = [(term, tuple(t.clone() for t in inputs)) for term, inputs in plan.terms]
            self._mark_static(task)
        else:
            for kept, new in zip(task.replay or (), replay or ()):
                kept.copy_(new)
            for (_, kept), (_, new) in zip(task.terms, plan.terms):
                for buffer, values in zip(kept, new):
                    buffer.copy_(values)
        task.counter.zero_()
        task.lr.fill_(float(s.optimizer.param_groups[0]["lr"]))

    def _mark_static(self, task: Stage1Task) -> None:
        """On CUDA, the buffers the graph reads or updates keep their addresses: CUDA graphs
        use them in place instead of copying them in at every replay."""
        if self.strategy.device.type != "cuda":
            return
        buffers = [
            task.features,
            task.labels,
            task.task_labels,
            task.order,
            task.valid,
            task.counter,
            task.lr,
            *task.record.tensors(),
            *[p.grad for p in task.params],
            *[t for ts in task.state.values() for t in ts],
            *(task.replay or ()),
            *[t for _, inputs in task.terms for t in inputs],
            *task.model.cached_text_tensors(),
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
            self._task, self._task_id, self._graph, self._traced = None, task_id, None, False
            reason = self.unsupported()
            if reason is not None:
                return self._fall_back(reason)
            self._task = self._build()
            self._graph = self.compile(types.MethodType(fresh(stage1_train_step), self._task))
        task = self._task
        if task is None:
            return False
        self._fill(task, first_epoch)
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
        names = ["cross_entropy"] + [n for term, _ in task.terms for n in term.weights]
        clock, record, full = s.clock, task.record, task.order.shape[1]
        n = task.features.shape[0]
        sizes = [min(full, n - start) for start in range(0, n, full)]
        for size in sizes:
            if s.training_stopped:
                return True
            for callback in before:
                callback(s)
            if sync_lr:
                task.lr.fill_(float(s.optimizer.param_groups[0]["lr"]))
            if mark is not None:
                mark()
            out = self._call()
            x, y, labels, scores = out[:4] if size == full else [t[:size] for t in out[:4]]
            s.mbatch, s.mb_output, s.loss = [x, y, labels], scores, out[4]
            s.step.loss_terms = dict(zip(names, out[5:]))
            record.count(size)
            for callback in after:
                callback(s)
            clock.after_training_iteration(s)
        return True

    def _call(self):
        """One call of the task's graph; torch traces it at its first call, or again when a
        guard fails (``capture.traced``)."""
        if self._traced:
            try:
                return self._graph()
            except torch._dynamo.exc.Unsupported:
                return traced(self._graph)
        out = traced(self._graph)
        self._traced = True
        self.graphs_traced += 1
        return out
