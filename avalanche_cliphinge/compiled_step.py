"""The captured runner of stage 1 (the ``compile_step`` config key).

Avalanche's loop dispatches every op of a step from the host. ``CompiledStep`` runs the
stage-1 epochs of a whole run as calls of one ``torch.compile(fullgraph=True)`` graph
(``mode="reduce-overhead"``, CUDA graphs, on CUDA) of ``step.stage1_train_step``, which
calls the model's same ``encode_prompts`` and ``clip_logits`` and the same
``loss_with_terms`` and ``EpochRecord.add`` as the eager runner, with Adam in its capturable
functional form, backward traced into the graph.

One shape for the run: the score columns are padded to the run's class count (unseen ones
masked), the replay rows to the run's largest chunk, the hinge's pairs to their cap (the
plugin registers them so under ``compile_step``), and every task copies its data, prompts,
Adam state and plan into the same buffers (``step.Stage1Task``), its learned tensors copied
back after each epoch. Tasks of another size (B50 Inc10: the first task) get one graph more.

What the runner adds around the step, and nothing else: those buffers, the per-iteration
callbacks of the plugins that implement them, and the clock. Anything the captured step
cannot reproduce (a plugin that works inside a step, a criterion other than cross-entropy,
an optimizer other than Adam, training on images, a subclass that overrides a step method,
prompts of several tasks or frozen prompt rows training together, hinge pairs without a cap)
makes the task run Avalanche's eager loop, with a warning naming the reason once.

Stage 2's captured runner is ``plugins.second_stage_compiled.CompiledStage2`` (a name of this
module too), beside the plugin that uses it.
"""

from __future__ import annotations

import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .capture import call_graph, compile_step, fresh
from .captured_shapes import adam_rows, capacity, fits, stage1_shape
from .loaders import TensorBatchLoader
from .plugins.second_stage_compiled import CompiledStage2
from .runner_checks import INSIDE_STEP, STEP_METHODS, plugin_needs
from .step import Stage1Task, allocate_stage1_task, stage1_train_step, static_tensors

__all__ = ["CompiledStage2", "CompiledStep", "graphs_report"]


class CompiledStep:
    """Runs the stage-1 epochs of a ``CLIPHingeStrategy`` as calls of one captured graph.

    ``run_epoch`` trains one epoch and returns ``True``, or returns ``False`` when this task
    must run the eager step (the strategy then runs Avalanche's loop); the reason is warned
    once. One graph per step shape (``captured_shapes.stage1_shape``), made (``compile``)
    from a fresh copy of ``step.stage1_train_step``. It reads the strategy's public state
    only: ``dataloader`` (a ``TensorBatchLoader``), ``optimizer``, ``loss_function``,
    ``model``, ``frozen_rows``, ``step``, ``epoch_plan``, ``epoch_record``, ``config``,
    ``plugins``, ``clock``, ``autocast``, ``training_stopped``.

    Args:
        strategy: the ``CLIPHingeStrategy`` whose steps it runs.
        reference: the strategy class whose step (``STEP_METHODS``) the captured one
            reproduces (``CLIPHingeStrategy`` passes itself); a strategy whose class
            overrides one of them runs eagerly. Default: ``strategy``'s class.
    """

    def __init__(self, strategy, reference: Optional[type] = None):
        self.strategy = strategy
        self.reference = type(strategy) if reference is None else reference
        #: graphs traced so far (one per step shape, plus one per guard failure)
        self.graphs_traced = 0
        #: graphs traced again for a shape that had one (a guard failed)
        self.guard_failures = 0
        self._shapes: Dict[tuple, List[list]] = {}
        self._current: Optional[list] = None
        self._task_id: Optional[int] = None
        self._warned: set = set()

    def __getstate__(self):
        # Pickled (Avalanche's save_checkpoint) without its buffers and graphs: they belong
        # to this process; the next experience builds them again.
        state = self.__dict__.copy()
        state["_shapes"], state["_current"], state["_task_id"] = {}, None, None
        return state

    def __setstate__(self, state):
        state.setdefault("reference", type(state["strategy"]))
        state.setdefault("guard_failures", 0)
        state.setdefault("_shapes", {})
        state.setdefault("_current", None)
        for old in ("_task", "_graph", "_traced"):
            state.pop(old, None)
        self.__dict__.update(state)

    def release(self) -> None:
        """Free every graph and buffer (the end of a run); a later task builds them again."""
        self._shapes, self._current, self._task_id = {}, None, None

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
        model = s.model
        if getattr(model, "shared_ctx", None) is not None:
            return "every class's prompt reads one shared context (CoOp)"
        adapter = [] if model.adapter is None else list(model.adapter.parameters())
        expected = [model.prompts[model.n_tasks - 1].ctx, *adapter]
        if s.frozen_rows or [id(p) for p in self._trained()] != [id(p) for p in expected]:
            return "prompts of several tasks, or frozen prompt rows, train together"
        for term in s.step.plugin_losses.values():
            if any(t is None for t in term.constants):
                return "a loss term has no fixed shape (hinge pairs without a cap)"
        return None

    def _trained(self) -> List[Tensor]:
        return list(self.strategy.optimizer.param_groups[0]["params"])

    def _fall_back(self, reason: str) -> bool:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"compile_step: {reason}, which the captured step cannot run; this "
                "task trains with the eager step (Avalanche's loop and callbacks)",
                stacklevel=3,
            )
        return False

    # ---- shapes -----------------------------------------------------------------------------
    def _entry(self) -> list:
        """A built shape this task fits (``captured_shapes.fits``), or a new one with room
        for larger tasks (``captured_shapes.capacity``)."""
        key, needs = stage1_shape(self.strategy)
        for entry in self._shapes.setdefault(key, []):
            if fits(entry[0], needs):
                return entry
        entry = self._build(key, *capacity(self.strategy, needs))
        self._shapes[key].append(entry)
        return entry

    def _build(self, key: tuple, steps: int, k: int) -> list:
        """Buffers (``Stage1Task``) for ``steps`` steps of ``k`` replayed rows, and graph, of
        one step shape."""
        s, model = self.strategy, self.strategy.model
        batch = key[0]
        adapter = [] if model.adapter is None else list(model.adapter.parameters())
        task = allocate_stage1_task(
            model,
            s.loss_function,
            s.optimizer.param_groups[0],
            rows=(steps * batch, batch, k),
            prompts=model.prompts[model.n_tasks - 1],
            n_columns=s.config.n_classes if s.config.layout_is_set else model.n_outputs,
            dim=s.dataloader.features.shape[1],
            terms=s.epoch_plan.terms,
            adapter=adapter,
            autocast=s.autocast,
        )
        if s.device.type == "cuda":
            for tensor in static_tensors(task):
                torch._dynamo.mark_static_address(tensor)
        graph = self.compile(types.MethodType(fresh(stage1_train_step), task))
        return [task, graph, False]

    def compile(self, step: Callable) -> Callable:
        """``capture.compile_step``: inductor, with CUDA graphs on CUDA."""
        return compile_step(step, self.strategy.device)

    # ---- per task and epoch -----------------------------------------------------------------
    @torch.no_grad()
    def _load(self, task: Stage1Task) -> None:
        """The task's data, prompts, text bank and Adam state into the shape's buffers."""
        s, model = self.strategy, self.strategy.model
        loader = s.dataloader
        n, batch = loader.sampler.n, task.order.shape[1]
        task.features[:n] = loader.features
        task.labels[:n] = loader.labels
        task.task_labels[:n] = loader.task_labels
        rows = torch.arange(task.order.numel(), device=task.valid.device)
        task.valid.copy_((rows < n).view(-1, batch))
        prompts = model.prompts[model.n_tasks - 1]
        size = prompts.ctx.shape[0]
        for buffer, values in (
            (task.prefix, prompts.prefix),
            (task.suffix, prompts.suffix),
            (task.tokens, prompts.tokens),
            (task.ctx, prompts.ctx),
        ):  # padding prompts: zeros, their text written to the last (never seen) column
            buffer.zero_()
            buffer[:size] = values
        n_seen, dump = len(model.seen_classes), task.bank.shape[0] - 1
        task.bank.zero_()
        task.bank[:n_seen] = model.text_features()
        task.train_rows.fill_(dump)
        task.train_rows[:size] = torch.arange(n_seen - size, n_seen, device=task.bank.device)
        columns = torch.arange(task.bank.shape[0], device=task.bank.device)
        task.column_mask.copy_(columns < n_seen)
        task.class_of_column.fill_(model.n_outputs)
        task.class_of_column[:n_seen] = model.class_of_column
        for i, p in enumerate(self._trained()):
            kept = s.optimizer.state[p]
            for name, buffers in task.state.items():
                if buffers:
                    buffers[i].zero_()
                    if name in kept:
                        adam_rows(buffers[i], p).copy_(kept[name])

    @torch.no_grad()
    def _fill(self, task: Stage1Task) -> None:
        """The epoch's order and plan into the buffers; the run's record emptied."""
        s, device = self.strategy, self.strategy.device
        order = s.dataloader.sampler.order()
        task.order.view(-1)[: order.numel()].copy_(order.to(device, non_blocking=True))
        plan = s.epoch_plan
        if task.replay is not None:
            features, targets = task.replay
            features.zero_()
            targets.fill_(task.criterion.ignore_index)
            if plan.replay_features is not None:
                steps, k = plan.replay_features.shape[:2]
                features[:steps, :k] = plan.replay_features
                targets[:steps, :k] = plan.replay_targets
        for (_, inputs, constants), (term, new) in zip(task.terms, plan.terms):
            for buffer, values in zip(inputs, new):
                buffer[: values.shape[0]] = values
            for buffer, values in zip(constants, term.constants):
                buffer.copy_(values)
        task.counter.zero_()
        task.record.reset()
        task.lr.fill_(float(s.optimizer.param_groups[0]["lr"]))

    @torch.no_grad()
    def _store(self, task: Stage1Task) -> None:
        """The epoch's learned tensors and Adam state back to the task's parameters and the
        optimizer, its record to the strategy's."""
        s, model = self.strategy, self.strategy.model
        ctx = model.prompts[model.n_tasks - 1].ctx
        ctx.copy_(task.ctx[: ctx.shape[0]])
        for i, p in enumerate(self._trained()):
            s.optimizer.state[p] = {
                name: adam_rows(buffers[i], p).clone()
                for name, buffers in task.state.items()
                if buffers
            }
        s.epoch_record.copy_from(task.record)

    # ---- the epoch --------------------------------------------------------------------------
    def run_epoch(self) -> bool:
        """Train one stage-1 epoch with captured steps; ``False``: run it eagerly instead."""
        s = self.strategy
        task_id = s.clock.train_exp_counter
        if task_id != self._task_id:
            self._current, self._task_id = None, task_id
            reason = self.unsupported()
            if reason is not None:
                return self._fall_back(reason)
            self._current = self._entry()
            self._load(self._current[0])
        if self._current is None:
            return False
        task = self._current[0]
        self._fill(task)
        try:
            self._steps(task)
        finally:
            self._store(task)
        return True

    def _steps(self, task: Stage1Task) -> None:
        s = self.strategy
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
        names = list(task.record.sums)[2:]
        clock, record, full = s.clock, task.record, task.order.shape[1]
        n = s.dataloader.sampler.n
        for start in range(0, n, full):
            size = min(full, n - start)
            if s.training_stopped:
                return
            for callback in before:
                callback(s)
            if sync_lr:
                task.lr.fill_(float(s.optimizer.param_groups[0]["lr"]))
            if mark is not None:
                mark()
            out = self._call()
            if mark is not None:  # a CUDA graph's outputs are overwritten by its next replay
                out = [t.clone() for t in out]
            x, y, labels, scores = out[:4] if size == full else [t[:size] for t in out[:4]]
            s.mbatch, s.mb_output, s.loss = [x, y, labels], scores, out[4]
            s.step.loss_terms = dict(zip(names, out[5:]))
            record.count(size)
            for callback in after:
                callback(s)
            clock.after_training_iteration(s)

    def _call(self):
        """One call of the shape's graph (``capture.call_graph``: traced at its first call,
        backward into the graph; counted in ``graphs_traced`` and ``guard_failures``)."""
        entry = self._current
        out = call_graph(entry[1], entry[2], self, "stage-1")
        entry[2] = True
        return out


def graphs_report(
    stage1: Optional[CompiledStep], plugins: Sequence, freed: Tuple[int, int] = (0, 0)
) -> Dict[str, int]:
    """What a run's captured runners traced: ``stage1_graphs``, ``stage2_graphs`` (one per
    step shape, plus one per guard failure), ``stage2_guard_failures`` and ``guard_failures``
    (both stages: graphs traced again for a shape that had one, because something a graph
    reads changed between its calls; each is warned). ``stage1`` is the stage-1 runner
    (``None`` without ``compile_step``), ``plugins`` the strategy's (stage 2's runners are
    ``SecondStagePlugin.captured``), ``freed`` stage 2's graphs and guard failures of runners
    already freed."""
    runners = [
        runner
        for plugin in plugins
        if isinstance(getattr(plugin, "captured", None), dict)
        for runners in plugin.captured.values()
        for runner in runners
    ]
    stage2_failures = freed[1] + sum(r.guard_failures for r in runners)
    return {
        "stage1_graphs": 0 if stage1 is None else stage1.graphs_traced,
        "stage2_graphs": freed[0] + sum(r.graphs_traced for r in runners),
        "stage2_guard_failures": stage2_failures,
        "guard_failures": stage2_failures + (0 if stage1 is None else stage1.guard_failures),
    }
