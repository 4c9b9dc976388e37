"""Stage 2's captured runner: a task's head trained on cached features, one graph per step.

``SecondStagePlugin`` runs its epochs through ``CompiledStage2`` when ``compile_step`` is on
and the head trains on the strategy's cached features; with LoRA the images go through the
adapted encoder at every step, and stage 2 stays eager (the plugin's own loop). The graph is
``step.stage2_train_step``, made as stage 1's (``capture``).
"""

from __future__ import annotations

import copy
import types
from typing import Callable, Tuple

import torch
from torch import Tensor

from ..capture import STEP_HEADROOM, call_graph, compile_step, fresh
from ..step import Stage2Task, stage2_targets, stage2_train_step


class CompiledStage2:
    """Runs the stage-2 epochs of the task heads of a run on cached features, as calls of
    one captured graph per step shape.

    Made by ``SecondStagePlugin`` at the first task that trains a head on cached features
    when ``compile_step`` is on (the LoRA run stays eager), and kept for the later tasks of
    the same shape (``shape_key``): each task copies its features, targets and head into this
    object's buffers (``load``), trains its epochs (``run_epoch``: one call per step of a
    ``torch.compile(fullgraph=True)`` graph of ``step.stage2_train_step``, made once; inductor;
    ``mode="reduce-overhead"``, CUDA graphs, on CUDA), and gets its trained head back
    (``store``). SGD runs in its functional form, its momentum buffers zeroed per task as a
    new eager optimizer's are. The epoch's minibatch order is drawn at its start from the
    loader's sampler, as the eager loop draws it, so both learn the same head (to float
    tolerance). A smaller last minibatch is padded with ignored rows.

    Args:
        strategy: the strategy (its ``device`` and ``autocast``).
        head: the first task's ``TaskHead`` (the graph trains a copy of it).
        optimizer: the plugin's ``torch.optim.SGD`` over the head's parameters: its
            hyperparameters are used, its state is not (the buffers are this object's).
        loader: the ``TensorBatchLoader`` of the task's cached features.
    """

    def __init__(self, strategy, head, optimizer, loader):
        if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
            raise TypeError("CompiledStage2 runs one parameter group of torch.optim.SGD")
        device = self.device = strategy.device
        group = optimizer.param_groups[0]
        hyper = {
            name: group[name]
            for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        }
        self.key = self.shape_key(head, optimizer, loader)
        batch = max(min(loader.sampler.batch_size, loader.sampler.n), 1)
        # room for tasks a quarter larger: tasks of unequal sizes share the graph
        steps = int(-(-loader.sampler.n // batch) * STEP_HEADROOM) + 1
        #: the most samples a task may have here
        self.capacity = steps * batch
        own = copy.deepcopy(head).requires_grad_(True)
        params = list(own.parameters())
        for p in params:
            # gradients live for the run and are zeroed in the graph
            p.grad = torch.zeros_like(p)
        self.task = Stage2Task(
            head=own,
            features=loader.features.new_zeros((self.capacity, loader.features.shape[1])),
            targets=torch.zeros(self.capacity, dtype=torch.long, device=device),
            order=torch.zeros((steps, batch), dtype=torch.long, device=device),
            valid=torch.zeros((steps, batch), dtype=torch.bool, device=device),
            counter=torch.zeros((), dtype=torch.long, device=device),
            total=torch.zeros((), device=device),
            params=params,
            buffers=[torch.zeros_like(p) if hyper["momentum"] != 0 else None for p in params],
            hyper=hyper,
            autocast=strategy.autocast,
        )
        if device.type == "cuda":
            t = self.task
            buffers = [t.features, t.targets, t.order, t.valid, t.counter, t.total]
            buffers += params + [p.grad for p in params]
            buffers += [b for b in t.buffers if b is not None]
            for tensor in buffers:
                torch._dynamo.mark_static_address(tensor)
        self.sampler = loader.sampler
        #: graphs traced so far (one, unless a guard failed)
        self.graphs_traced = 0
        #: graphs traced again after the first (a guard failed; each is warned)
        self.guard_failures = 0
        self._called = False
        self.graph = self.compile(types.MethodType(fresh(stage2_train_step), self.task))

    @staticmethod
    def shape_key(head, optimizer, loader) -> tuple:
        """What fixes the captured step's shapes and settings for a task (its number of
        samples need only fit ``capacity``)."""
        group = optimizer.param_groups[0]
        settings = tuple(
            group[name]
            for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        )
        shapes = tuple(tuple(p.shape) for p in head.parameters())
        batch = max(min(loader.sampler.batch_size, loader.sampler.n), 1)
        return (batch, loader.features.shape[1], shapes, settings)

    def compile(self, step: Callable) -> Callable:
        """``capture.compile_step``: inductor, with CUDA graphs on CUDA."""
        return compile_step(step, self.device)

    @torch.no_grad()
    def load(self, head, loader, classes: Tensor) -> None:
        """A task's head, features and head columns (``classes [c]``: class ids of its
        columns) into the buffers; momentum and gradients zeroed."""
        task = self.task
        n = loader.sampler.n
        task.features[:n] = loader.features
        task.targets[:n] = stage2_targets(loader.labels.to(self.device), classes)
        rows = torch.arange(task.order.numel(), device=self.device)
        task.valid.copy_((rows < n).view_as(task.valid))
        #: samples of an epoch, and its steps
        self.n, self.n_steps = n, -(-n // task.order.shape[1])
        for mine, theirs in zip(task.params, head.parameters()):
            mine.copy_(theirs)
            mine.grad.zero_()
        for buffer in task.buffers:
            if buffer is not None:
                buffer.zero_()
        self.sampler = loader.sampler

    @torch.no_grad()
    def store(self, head) -> None:
        """The trained head back into the task's ``head``."""
        for theirs, mine in zip(head.parameters(), self.task.params):
            theirs.copy_(mine)

    def run_epoch(self) -> Tuple[Tensor, int]:
        """Train one epoch; returns the summed loss (a device scalar, this object's buffer,
        valid until the next epoch) and the number of samples."""
        task = self.task
        order = self.sampler.order()
        task.order.view(-1)[: order.numel()].copy_(order.to(self.device, non_blocking=True))
        task.counter.zero_()
        task.total.zero_()
        mark = torch.compiler.cudagraph_mark_step_begin if self.device.type == "cuda" else None
        for _ in range(self.n_steps):
            if mark is not None:
                mark()
            call_graph(self.graph, self._called, self, "stage-2")
            self._called = True
        return task.total, self.n
