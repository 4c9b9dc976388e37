"""How a training step becomes one captured graph; what both captured runners share.

Stage 1's ``compiled_step.CompiledStep`` and stage 2's
``plugins.second_stage_compiled.CompiledStage2`` each make a step function into a
``torch.compile(fullgraph=True)`` graph (inductor; ``mode="reduce-overhead"``, CUDA graphs,
on CUDA), one per task from a fresh copy of the function, and call it while Dynamo may trace
``Tensor.backward`` into it.
"""

from __future__ import annotations

import types
from typing import Callable

import torch


def compile_step(step: Callable, device: torch.device) -> Callable:
    """``torch.compile(step, fullgraph=True)``: inductor, with CUDA graphs on CUDA."""
    cuda = device.type == "cuda"
    return torch.compile(
        step, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None
    )


def traced(graph: Callable):
    """Call ``graph`` while torch may trace it: ``Tensor.backward`` is traced into the graph
    only with Dynamo's ``trace_autograd_ops`` (it breaks the graph otherwise)."""
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        return graph()


def fresh(function: types.FunctionType) -> types.FunctionType:
    """``function`` with a code object of its own: torch.compile keeps its graphs, and counts
    recompilations against its limit, per code object."""
    return types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
