"""Stage 2's captured runner: a task's head trained on cached features, one graph per step.

``SecondStagePlugin`` runs its epochs through ``CompiledStage2`` when ``compile_step`` is on
and the head trains on the strategy's cached features; with LoRA the images go through the
adapted encoder at every step, and stage 2 stays eager (the plugin's own loop). The graph is
made as stage 1's (``capture``).
"""

from __future__ import annotations

import types
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.sgd import sgd

from ..capture import compile_step, fresh, traced


class CompiledStage2:
    """Runs the stage-2 epochs of one task's head on cached features as captured steps.

    Made by ``SecondStagePlugin`` for a task when ``compile_step`` is on and the head trains
    on the cached features (the LoRA run stays eager). ``run_epoch`` trains one epoch: one
    call per step of a ``torch.compile(fullgraph=True)`` function made for this task (inductor;
    ``mode="reduce-overhead"``, CUDA graphs, on CUDA) that gathers the minibatch from the
    features by a device step counter, runs the head, the cross-entropy and backward, updates
    the head with SGD (``torch.optim.sgd.sgd``, the functional form of the plugin's
    optimizer; momentum buffers allocated once per task) and adds the loss to the epoch's
    device sum. The epoch's minibatch order is drawn at its start from the loader's sampler,
    as the eager loop draws it, so both learn the same head (to float tolerance). A smaller
    last minibatch is padded with ignored rows (zero features, target ``-100``): one step
    shape per task.

    Args:
        strategy: the strategy (its ``device`` and ``autocast``).
        head: the ``TaskHead`` being trained.
        optimizer: the plugin's ``torch.optim.SGD`` over the head's parameters: its
            hyperparameters are used, its state is not (the buffers are this object's).
        loader: the ``TensorBatchLoader`` of the task's cached features; its sampler draws
            every epoch's order.
        classes: ``[n_classes]`` class ids of the head's columns, on the device.
    """

    #: cross-entropy target of the padding rows
    IGNORE = -100

    def __init__(self, strategy, head, optimizer, loader, classes: Tensor):
        if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
            raise TypeError("CompiledStage2 runs one parameter group of torch.optim.SGD")
        device = self.device = strategy.device
        self.head, self.autocast, self.sampler = head, strategy.autocast, loader.sampler
        group = optimizer.param_groups[0]
        self.params = list(group["params"])
        self.hyper = {
            name: group[name]
            for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        }
        #: samples of an epoch
        self.n = self.sampler.n
        batch = max(min(self.sampler.batch_size, self.n), 1)
        self.n_steps = -(-self.n // batch)
        self.features = loader.features.to(device)
        labels = loader.labels.to(device)
        self.targets = (labels[:, None] == classes[None, :]).float().argmax(1)
        self.order = torch.zeros((self.n_steps, batch), dtype=torch.long, device=device)
        self.valid = (torch.arange(self.n_steps * batch).view(self.n_steps, batch) < self.n).to(
            device
        )
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        self.total = torch.zeros((), device=device)
        for p in self.params:
            # gradients live for the whole task and are zeroed in the graph
            p.grad = torch.zeros_like(p)
        # the eager SGD's first step sets its buffer to the gradient: 0 * momentum + gradient
        self.buffers = [
            torch.zeros_like(p) if self.hyper["momentum"] != 0 else None for p in self.params
        ]
        if device.type == "cuda":
            buffers = [self.features, self.targets, self.order, self.valid, self.counter]
            buffers += [self.total, *[p.grad for p in self.params]]
            buffers += [b for b in self.buffers if b is not None]
            for tensor in buffers:
                torch._dynamo.mark_static_address(tensor)
        #: graphs traced so far (one, unless a guard failed)
        self.graphs_traced = 0
        self.graph = self.compile(types.MethodType(fresh(CompiledStage2._step), self))

    def compile(self, step: Callable) -> Callable:
        """``capture.compile_step``: inductor, with CUDA graphs on CUDA."""
        return compile_step(step, self.device)

    def run_epoch(self) -> Tuple[Tensor, int]:
        """Train one epoch; returns the summed loss (a device scalar, this object's buffer,
        valid until the next epoch) and the number of samples."""
        order = self.sampler.order()
        self.order.view(-1)[: order.numel()].copy_(order.to(self.device, non_blocking=True))
        self.counter.zero_()
        self.total.zero_()
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
        return self.total, self.n

    def _trace(self) -> None:
        """Call the graph while torch may trace it (``capture.traced``)."""
        traced(self.graph)
        self.graphs_traced += 1

    def _step(self) -> None:
        """One step, traced: the minibatch of row ``counter`` of the epoch's order (its
        padding rows ignored), the head, the cross-entropy, backward, SGD, the loss sum; the
        counter moves on."""
        at = self.counter.reshape(1)
        rows = self.order.index_select(0, at).reshape(-1)
        valid = self.valid.index_select(0, at).reshape(-1)
        # padding rows: zero features (whatever row 0 holds), left out of the loss
        x = torch.where(valid[:, None], self.features.index_select(0, rows), 0.0)
        target = self.targets.index_select(0, rows).masked_fill(~valid, self.IGNORE)
        with self.autocast():
            logits = self.head(x)
        loss = F.cross_entropy(logits.float(), target, ignore_index=self.IGNORE)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            sgd(self.params, grads, self.buffers, foreach=False, fused=False, **self.hyper)
            for grad in grads:
                grad.zero_()
            self.total.add_(loss.detach() * valid.sum())
            self.counter.add_(1)
