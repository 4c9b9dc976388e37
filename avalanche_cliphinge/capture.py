"""How a training step becomes one captured graph; what both captured runners share.

Stage 1's ``compiled_step.CompiledStep`` and stage 2's
``plugins.second_stage_compiled.CompiledStage2`` each make a step function into a
``torch.compile(fullgraph=True)`` graph (inductor; ``mode="reduce-overhead"``, CUDA graphs,
on CUDA), one per step shape (one for a run whose tasks share a shape) from a fresh copy of
the function, and call it while Dynamo may trace ``Tensor.backward`` into it.
"""

from __future__ import annotations

import functools
import platform
import sys
import threading
import types
import warnings
from typing import Callable, Dict

import torch

from avalanche_cliphinge.kernel_batches import batched_cpu_kernels

#: a shape made for a task has room for tasks this much larger (steps; in stage 1, replayed
#: rows per step of the per-epoch volume for tasks this much smaller): tasks of unequal sizes
#: share a graph (both runners)
STEP_HEADROOM = 1.25


def compile_step(step: Callable, device: torch.device) -> Callable:
    """``torch.compile(step, fullgraph=True)``: inductor, with CUDA graphs on CUDA."""
    cuda = device.type == "cuda"
    return torch.compile(
        step, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None
    )


def traced(graph: Callable):
    """Call ``graph`` while torch may trace it: ``Tensor.backward`` is traced into the graph
    only with Dynamo's ``trace_autograd_ops`` (it breaks the graph otherwise); on an x86 CPU
    with ``known_vector_isa``'s settings; inductor's cache keys and instruction-set choice
    started on threads (``prepare_inductor_on_threads``); the graph's CPU kernels built as one
    library per compile thread (``kernel_batches.batched_cpu_kernels``)."""
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        with torch._inductor.config.patch(known_vector_isa()), batched_cpu_kernels():
            prepare_inductor_on_threads()
            return graph()


def call_graph(graph: Callable, called: bool, runner, stage: str):
    """One call of a captured graph, counted on ``runner`` (its ``graphs_traced`` and
    ``guard_failures``). At its first call (``called`` false) torch traces it (``traced``);
    after that it is called as it is: a guard failure then raises ``Unsupported`` (backward
    cannot be traced without the patch) and the call is made again while torch may trace it.
    A graph traced after the first call is a guard failure, warned naming ``stage`` (a first
    call's restarted analysis is not one). Returns the graph's outputs."""
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    if called:
        try:
            out = graph()
        except torch._dynamo.exc.Unsupported:
            out = traced(graph)
    else:
        out = traced(graph)
    made = stats["unique_graphs"] - before
    runner.graphs_traced += made
    failed = made if called else max(made - 1, 0)
    if failed:
        runner.guard_failures += failed
        warnings.warn(
            f"compile_step: a guard of the captured {stage} graph failed (something the "
            f"graph reads changed between its calls), so torch traced and compiled it again "
            f"({runner.guard_failures} so far in this run); the run goes on, at that "
            "compile's cost",
            stacklevel=3,
        )
    return out


def known_vector_isa() -> Dict[str, bool]:
    """Inductor settings that take the CPU's vector instructions (AVX2, AVX-512) from ATen's
    own dispatch (``torch.backends.cpu.get_cpu_capability()``) instead of test-compiling a
    program for each: with an empty compile cache those test builds took 7.4 s on a 2-core
    CPU, 1.3 s with these settings (inductor still tests AVX-512 bf16). Empty (inductor
    tests them) off Linux x86-64, when ATen dispatches no vector code (``ATEN_CPU_CAPABILITY``
    lowered it), or when ``torch._inductor.config.cpp.vec_isa_ok`` is set already."""
    import torch._inductor.config as inductor

    if sys.platform != "linux" or platform.machine() != "x86_64":
        return {}
    if inductor.cpp.vec_isa_ok is not None:
        return {}
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return {}
    return {"cpp.vec_isa_ok": True}


@functools.cache
def prepare_inductor_on_threads() -> None:
    """Start, once a process, what inductor computes at its first compile and caches for the
    process, on threads, so that it runs while Dynamo and AOT autograd trace the first graph:
    the hashes of torch's and triton's sources in its cache keys (torch's own ``prefetch`` of
    ``torch_key`` and ``triton_key``; about 1 s on a 2-core CPU) and, on an x86 CPU, its
    choice of vector instructions (``pick_vec_isa``: test builds of AVX-512 bf16 and VNNI,
    about 1.2 s of g++ with an empty compile cache). A call that finds one half made waits
    for it (the keys) or makes it too (the choice)."""
    from torch._inductor import codecache
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    for key in (codecache.torch_key, codecache.triton_key):
        prefetch = getattr(key, "prefetch", None)
        if prefetch is not None:
            prefetch()
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        threading.Thread(target=pick_vec_isa, name="cliphinge-vector-isa", daemon=True).start()


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
