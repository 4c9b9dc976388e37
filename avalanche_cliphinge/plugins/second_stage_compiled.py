"""Stage 2's captured runner: a task's head trained on cached features, one graph per step.

``SecondStagePlugin`` runs its epochs through ``CompiledStage2`` when ``compile_step`` is on
and the head trains on the strategy's cached features; with LoRA the images go through the
adapted encoder at every step, and stage 2 stays eager (the plugin's own loop). The graph is
``step.stage2_train_step``, made as stage 1's (``capture``).
"""

from __future__ import annotations

import types
from typing import Callable, Tuple

import torch
from torch import Tensor

from ..capture import compile_step, fresh, traced
from ..step import Stage2Task, stage2_targets, stage2_train_step


class CompiledStage2:
    """Runs the stage-2 epochs of one task's head on cached features as captured steps.

    Made by ``SecondStagePlugin`` for a task when ``compile_step`` is on and the head trains
    on the cached features (the LoRA run stays eager). ``run_epoch`` trains one epoch: one
    call per step of a ``torch.compile(fullgraph=True)`` graph of ``step.stage2_train_step``
    made for this task (inductor; ``mode="reduce-overhead"``, CUDA graphs, on CUDA), with SGD
    in its functional form (momentum buffers allocated once per task). The epoch's minibatch
    order is drawn at its start from the loader's sampler, as the eager loop draws it, so
    both learn the same head (to float tolerance). A smaller last minibatch is padded with
    ignored rows: one step shape per task.

    Args:
        strategy: the strategy (its ``device`` and ``autocast``).
        head: the ``TaskHead`` being trained.
        optimizer: the plugin's ``torch.optim.SGD`` over the head's parameters: its
            hyperparameters are used, its state is not (the buffers are this object's).
        loader: the ``TensorBatchLoader`` of the task's cached features; its sampler draws
            every epoch's order.
        classes: ``[n_classes]`` class ids of the head's columns, on the device.
    """

    def __init__(self, strategy, head, optimizer, loader, classes: Tensor):
        if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
            raise TypeError("CompiledStage2 runs one parameter group of torch.optim.SGD")
        device = self.device = strategy.device
        self.sampler = loader.sampler
        group = optimizer.param_groups[0]
        params = list(group["params"])
        hyper = {
            name: group[name]
            for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        }
        #: samples of an epoch
        self.n = self.sampler.n
        batch = max(min(self.sampler.batch_size, self.n), 1)
        self.n_steps = -(-self.n // batch)
        valid = torch.arange(self.n_steps * batch).view(self.n_steps, batch) < self.n
        for p in params:
            # gradients live for the whole task and are zeroed in the graph
            p.grad = torch.zeros_like(p)
        self.task = Stage2Task(
            head=head,
            features=loader.features.to(device),
            targets=stage2_targets(loader.labels.to(device), classes),
            order=torch.zeros((self.n_steps, batch), dtype=torch.long, device=device),
            valid=valid.to(device),
            counter=torch.zeros((), dtype=torch.long, device=device),
            total=torch.zeros((), device=device),
            params=params,
            # the eager SGD's first step sets its buffer to the gradient: 0 * momentum + it
            buffers=[torch.zeros_like(p) if hyper["momentum"] != 0 else None for p in params],
            hyper=hyper,
            autocast=strategy.autocast,
        )
        if device.type == "cuda":
            t = self.task
            buffers = [t.features, t.targets, t.order, t.valid, t.counter, t.total]
            buffers += [p.grad for p in params] + [b for b in t.buffers if b is not None]
            for tensor in buffers:
                torch._dynamo.mark_static_address(tensor)
        #: graphs traced so far (one, unless a guard failed)
        self.graphs_traced = 0
        self.graph = self.compile(types.MethodType(fresh(stage2_train_step), self.task))

    def compile(self, step: Callable) -> Callable:
        """``capture.compile_step``: inductor, with CUDA graphs on CUDA."""
        return compile_step(step, self.device)

    def run_epoch(self) -> Tuple[Tensor, int]:
        """Train one epoch; returns the summed loss (a device scalar, this object's buffer,
        valid until the next epoch) and the number of samples."""
        task = self.task
        order = self.sampler.order()
        task.order.view(-1)[: order.numel()].copy_(order.to(self.device, non_blocking=True))
        task.counter.zero_()
        task.total.zero_()
        mark = torch.compiler.cudagraph_mark_step_begin if self.device.type == "cuda" else None
        graph = self.graph
        for _ in range(self.n_steps):
            if mark is not None:
                mark()
            if self.graphs_traced:
                try:
                    graph()
                except torch._dynamo.exc.Unsupported:
                    self._trace()  # a guard failed: torch traces it again
            else:
                self._trace()
        return task.total, self.n

    def _trace(self) -> None:
        """Call the graph while torch may trace it (``capture.traced``)."""
        traced(self.graph)
        self.graphs_traced += 1
