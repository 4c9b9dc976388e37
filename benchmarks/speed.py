#!/usr/bin/env python
"""Time every phase of a CLIPHingeStrategy run; print one JSON line per phase.

    # one GPU, ViT-B/16 random weights, CIFAR-100-sized synthetic data, B0 Inc10, both stages
    python benchmarks/speed.py --synthetic --device cuda --set precision=bf16 --set eval_batch_size=512
    # the data loader alone: PILToTensor vs ToTensor, 0/2/4 workers (--loader-workers)
    python benchmarks/speed.py --synthetic --loader-only --repeats 7
    # 2-core CPU: tiny CLIP on real CIFAR-10 JPEGs (../shared/data), 5 epochs per task,
    # cached vs uncached
    python benchmarks/speed.py --preset tiny --compare-uncached
    # 8 GPUs: every process times its own run, the feature extraction shared out (rank 0
    # prints)
    torchrun --standalone --nproc_per_node 8 benchmarks/speed.py --synthetic

Phases: ``feature_extraction`` (frozen-encoder passes over train and test data),
``stage1`` (prompt-learning epochs, hinge included), ``hinge`` (the hinge plugin's share of
stage 1; on CUDA its device time from events, so steps are not serialised; 0 with
``--set compile_step=true``, where the hinge is inside the captured step), ``stage2``
(head training), ``evaluation`` (scoring the test stream after every task, extraction
excluded), ``total`` (the whole run), ``bare_image_encoder`` (open_clip's
image encoder alone, same process, same precision), ``extraction_efficiency``
(extraction throughput / bare throughput) and, on CUDA, ``stage1_host_syncs`` (synchronising
CUDA calls inside training steps, from torch's sync debug mode: 0 when the steps never stall
the host). Random weights: timings only, accuracy is
meaningless. ``--compare-uncached`` runs the same config with ``cache_features=false`` and
prints both times, their ratio and whether the metrics agree (``--repeats N``: N runs of
each path, alternating, and the ratio of the median wall times; ``cpu_time_speedup`` is the
same ratio for the process's CPU time, steadier on a shared machine). Before the timed runs, an
untimed ``warmup`` runs the first experience of each timed path with compile off, so no
timed run pays the process's one-time costs (``--no-warmup`` skips it); compile time stays
inside the timed run.

Per step, on any device: the ``stage1`` line gives ``ms_per_step`` (steady state: every task's
first epoch left out, and given apart as ``first_epoch_ms_per_step``; ``compile_s`` is what the
first epochs took beyond their steps at the steady rate: tracing, compiling, capturing),
``ops_per_step`` (aten ops dispatched in a step outside captured graphs) and
``python_calls_per_step`` (Python frames entered in a step outside captured graphs), counted
in the last epoch of every task with 3 epochs or more (``StepCounter``; that epoch is left out
of ``ms_per_step`` but not of the phase's seconds). The ``stage2`` line gives the same for
stage 2, counted over the last task's whole stage-2 run (set-up and per-epoch checks included;
with ``compile_step`` a call into its captured graph counts as one call and no op), the time
over the other tasks' runs; with ``compile_step`` each stage-2 graph's first call (tracing,
compiling) is left out of its ``ms_per_step`` and given as ``compile_s``. ``--no-step-counts``
counts nothing.

Compiles, from torch's side (``CompileWatch``: Dynamo's compile callbacks): the ``stage1`` and
``stage2`` lines give ``graphs_compiled`` (frames Dynamo made a graph of during the phase) and
``torch_compile_s`` (seconds inside torch's compiles during the phase: Dynamo, AOT autograd,
the backend, and CUDA-graph recording); the ``total`` line gives the whole run's, compiles
outside both phases included, ``cudagraph_skips`` (inductor's count of graphs it ran
without CUDA graphs) and ``guard_failures`` (captured graphs traced again for a shape that
had one: ``CLIPHingeStrategy.compile_report``). Its ``seconds`` is the whole run's wall time (model built, stream
trained and evaluated).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from unittest.mock import patch

import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset, TensorDataset

from avalanche_cliphinge import (
    CLIPHingeConfig,
    CLIPHingeStrategy,
    ConfigError,
    build_model,
    load_clip,
)
from avalanche_cliphinge import distributed
from avalanche_cliphinge.app.run_options import SMOKE
from avalanche_cliphinge.compiled_step import CompiledStage2
from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.app.loop import train_and_evaluate
from avalanche_cliphinge.plugins import HardPairHingePlugin, SecondStagePlugin
from avalanche_cliphinge.seeding import seed_everything
from avalanche.training.plugins import SupervisedPlugin
from avalanche_cliphinge.benchmarks import device_resize_transforms

ROOT = Path(__file__).resolve().parents[1]


class ImageTensors(TensorDataset):
    """``(uint8 image [3, 32, 32], label)`` items sliced from one tensor, with no per-image
    PIL work (``--synthetic-items tensor``); ``targets`` is the list Avalanche reads."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.targets = labels.tolist()


class CIFARLikeImages(Dataset):
    """Random 32-px images served item by item the way torchvision's ``CIFAR100`` serves them.

    Each item is an HWC uint8 array made into a PIL image, then the transform that
    ``run_split_cifar.py`` uses with ``resize_on_device`` (``device_resize_transforms``), so the
    host pays the real per-image cost: ``(uint8 image [3, 32, 32], label)``. ``transform``
    replaces that transform (``ToTensor()`` gives float images, as without ``resize_on_device``).
    """

    def __init__(self, images, labels, transform=None):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform = transform or device_resize_transforms()[1]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def synthetic_cifar(
    n_classes: int, train_per_class: int, test_per_class: int, seed: int, items: str = "pil"
):
    """CIFAR-100-sized uint8 stream: a random 32-px prototype per class plus noise.

    ``items``: ``"pil"`` serves each image through PIL like torchvision's ``CIFAR100``
    (``CIFARLikeImages``); ``"tensor"`` slices it from a tensor (``ImageTensors``). Both give
    the same ``uint8 [3, 32, 32]`` images.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(n_classes, 3, 32, 32, generator=g) * 255

    def split(per_class):
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), 3, 32, 32, generator=g) * 40
        images = (protos[labels] + noise).clamp(0, 255).to(torch.uint8)
        return (CIFARLikeImages if items == "pil" else ImageTensors)(images, labels)

    return split(train_per_class), split(test_per_class)


def synthetic_benchmark(config, train_per_class: int, test_per_class: int, items: str = "pil"):
    """``synthetic_cifar`` as the ``NamedBenchmark`` of ``config``'s layout (its classes in
    natural order, ``init_class`` then ``increment`` per experience)."""
    from avalanche.benchmarks import nc_benchmark

    from avalanche_cliphinge.benchmarks.common import NamedBenchmark

    n = config.n_classes
    train, test = synthetic_cifar(n, train_per_class, test_per_class, config.seed, items)
    per_exp = {0: config.init_class} if config.init_class != config.increment else None
    benchmark = nc_benchmark(
        train,
        test,
        config.total_tasks,
        task_labels=False,
        fixed_class_order=list(range(n)),
        per_exp_classes=per_exp,
    )
    return NamedBenchmark(
        benchmark=benchmark,
        class_names=[f"class {i}" for i in range(n)],
        class_order=list(range(n)),
        protocol={"name": "synthetic-cifar"},
    )


def loader_rates(args, config):
    """``--loader-only``: images/s of one DataLoader pass over the first training experience.

    The synthetic PIL items go through ``nc_benchmark`` (Avalanche's dataset wrappers), for
    ``PILToTensor`` (what the model gets with ``resize_on_device``) and ``ToTensor``, with each
    of ``--loader-workers`` (default 0, 2 and 4 workers); worker start and stop are inside the
    timed pass. Medians of ``--repeats`` passes, the combinations alternating; one JSON line
    per combination.
    """
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import DataLoader
    from torchvision import transforms

    items, _ = synthetic_cifar(config.n_classes, args.train_per_class, 1, config.seed)
    datasets = {}
    for name, transform in (("PILToTensor", items.transform), ("ToTensor", transforms.ToTensor())):
        data = copy.copy(items)
        data.transform = transform
        benchmark = nc_benchmark(
            data,
            data,
            config.total_tasks,
            task_labels=False,
            fixed_class_order=list(range(config.n_classes)),
        )
        datasets[name] = benchmark.train_stream[0].dataset.eval()
    rates = {(name, workers): [] for name in datasets for workers in args.loader_workers}
    for _ in range(args.repeats):  # alternating, so a drifting machine hits all alike
        for name, workers in rates:
            began = time.perf_counter()
            n = sum(
                len(batch[0])
                for batch in DataLoader(
                    datasets[name], batch_size=config.eval_batch_size, num_workers=workers
                )
            )
            rates[name, workers].append(n / (time.perf_counter() - began))
    for (name, workers), runs in rates.items():
        emit(
            {
                "phase": "loader",
                "transform": name,
                "num_workers": workers,
                "images": len(datasets[name]),
                "batch": config.eval_batch_size,
                "images_per_s": round(statistics.median(runs), 1),
                "runs": [round(r, 1) for r in runs],
            }
        )


class PhaseTimer(SupervisedPlugin):
    """Wall time of stage-1 epochs (in total and each with its step count) and of evaluation,
    synchronised on CUDA; with an ``extraction`` stopwatch, also the feature extraction done
    inside evaluations."""

    def __init__(self, device, extraction=None, watch=None):
        super().__init__()
        self.device = device
        self.extraction = extraction
        self.watch = watch
        self.seconds = {"stage1": 0.0, "evaluation": 0.0, "extraction_in_eval": 0.0}
        #: (epoch of its task, counted by ``StepCounter``, seconds, steps) per stage-1 epoch
        self.epochs: list = []
        self._start = 0.0
        self._steps = 0
        self._extracted = 0.0

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def before_training_epoch(self, strategy, **kwargs):
        self._steps = len(strategy.dataloader)
        if self.watch is not None:
            self.watch.phase = "stage1"
        self._start = self._now()

    def after_training_epoch(self, strategy, **kwargs):
        seconds = self._now() - self._start
        if self.watch is not None:
            self.watch.phase = "other"
        self.seconds["stage1"] += seconds
        self.epochs.append(
            (strategy.clock.train_exp_epochs, counted_epoch(strategy), seconds, self._steps)
        )

    def before_eval(self, strategy, **kwargs):
        self._start = self._now()
        self._extracted = self.extraction.seconds if self.extraction else 0.0

    def after_eval(self, strategy, **kwargs):
        self.seconds["evaluation"] += self._now() - self._start
        if self.extraction:
            self.seconds["extraction_in_eval"] += self.extraction.seconds - self._extracted


class CompileWatch:
    """Torch's compiles while active (a ``with`` block), counted by phase from torch's side.

    Dynamo's compile callbacks (``torch._dynamo.callback_handler``) open and close around each
    compile: a frame traced by Dynamo (AOT autograd and the backend included), a backward
    compiled lazily, a CUDA-graph recording. ``seconds[phase]`` adds up their wall time;
    ``graphs[phase]`` counts the Dynamo compiles that made a graph (torch's
    ``counters["stats"]["unique_graphs"]`` grew: one per frame, a restarted analysis counted
    once). ``phase`` names where the run is: the caller sets it (``PhaseTimer`` and
    ``Stage2Steps`` do); anything else is ``"other"``. ``cudagraph_skips`` is inductor's count
    of graphs run without CUDA graphs over the block.
    """

    def __init__(self):
        self.phase = "other"
        self.graphs: dict = {}
        self.seconds: dict = {}
        self.cudagraph_skips = 0
        self._open: list = []
        self._skips = 0

    @staticmethod
    def _counters():
        from torch._dynamo.utils import counters

        return counters

    def during(self, phase: str, function):
        """``function`` run with ``phase`` as the watch's phase (the one before restored)."""

        def in_phase(*args, **kwargs):
            before, self.phase = self.phase, phase
            try:
                return function(*args, **kwargs)
            finally:
                self.phase = before

        return in_phase

    def _begin(self, args) -> None:
        unique = self._counters()["stats"]["unique_graphs"]
        self._open.append((time.perf_counter(), unique, self.phase))

    def _end(self, args) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if not self._open:
            return
        began, unique, phase = self._open.pop()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - began
        self.graphs.setdefault(phase, 0)
        made = self._counters()["stats"]["unique_graphs"] > unique
        if made and args.callback_trigger == CallbackTrigger.DYNAMO:
            self.graphs[phase] += 1

    def __enter__(self) -> "CompileWatch":
        handler = torch._dynamo.callback_handler
        handler.register_start_callback(self._begin)
        handler.register_end_callback(self._end)
        self._skips = self._counters()["inductor"]["cudagraph_skips"]
        return self

    def __exit__(self, *exc) -> None:
        handler = torch._dynamo.callback_handler
        for callbacks, mine in (
            (handler.start_callbacks, self._begin),
            (handler.end_callbacks, self._end),
        ):
            if mine in callbacks:  # torch._dynamo.reset() clears them
                callbacks.remove(mine)
        self.cudagraph_skips = self._counters()["inductor"]["cudagraph_skips"] - self._skips

    def record(self, phase=None) -> dict:
        """``graphs_compiled`` and ``torch_compile_s`` of ``phase`` (``None``: all phases)."""
        phases = list(self.seconds) if phase is None else [phase]
        return {
            "graphs_compiled": sum(self.graphs.get(name, 0) for name in phases),
            "torch_compile_s": round(sum((self.seconds.get(name, 0.0) for name in phases), 0.0), 3),
        }


class StepSyncCounter(SupervisedPlugin):
    """CUDA only: counts synchronising CUDA calls made inside stage-1 training steps.

    Each step (``before_training_iteration`` .. ``after_training_iteration``) runs under
    ``torch.cuda.set_sync_debug_mode("warn")``; the warnings it raises are counted and the
    first few call sites kept, so a GPU run shows whether its steps stall the host. Syncs in
    the first epoch of a task (where ``torch.compile`` traces and captures) are counted
    apart from the steady state of the later epochs.
    """

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.steady_steps = 0
        self.syncs = 0
        self.first_epoch_syncs = 0
        self.where: list = []
        self._catch = None
        self._log: list = []

    def before_training_iteration(self, strategy, **kwargs):
        self._catch = warnings.catch_warnings(record=True)
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def after_training_iteration(self, strategy, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        found = [w for w in self._log if "synchroniz" in str(w.message)]
        self.steps += 1
        if strategy.clock.train_exp_epochs == 0:
            self.first_epoch_syncs += len(found)
        else:
            self.syncs += len(found)
            self.steady_steps += 1
        for w in found:
            site = f"{Path(w.filename).name}:{w.lineno}"
            if site not in self.where and len(self.where) < 5:
                self.where.append(site)

    def record(self) -> dict:
        """The JSON line of the counts."""
        return {
            "phase": "stage1_host_syncs",
            "steps": self.steps,
            "syncs_after_first_epoch": self.syncs,
            "syncs_in_first_epochs": self.first_epoch_syncs,
            "steps_after_first_epoch": self.steady_steps,
            "syncs_per_steady_step": (
                round(self.syncs / self.steady_steps, 3) if self.steady_steps else None
            ),
            "where": self.where,
        }


def counted_epoch(strategy) -> bool:
    """Whether ``StepCounter`` counts the steps of the strategy's current epoch: the last epoch
    of a task with at least 3 (never the first, where ``torch.compile`` traces and captures;
    one steady epoch at least is left to time)."""
    epochs = strategy.train_epochs
    return epochs >= 3 and strategy.clock.train_exp_epochs == epochs - 1


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active (every aten call, backward included)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class Counting:
    """Ops dispatched (a ``TorchDispatchMode``) and Python calls made (``sys.setprofile``
    ``call`` events: every Python frame entered) between ``start`` and ``stop``; ``pause``
    and ``resume`` leave a stretch out. The op counter's own frames (its
    ``__torch_dispatch__`` and what it calls to run the op) are not counted."""

    _COUNTER = _OpCounter.__torch_dispatch__.__code__

    def __init__(self):
        self.mode = _OpCounter()
        self.calls = 0
        self._inside = 0

    def _profile(self, frame, event, arg):
        if frame.f_code is self._COUNTER:
            self._inside += {"call": 1, "return": -1}.get(event, 0)
        elif event == "call" and not self._inside:
            self.calls += 1

    def start(self) -> "Counting":
        self.mode.__enter__()
        sys.setprofile(self._profile)
        return self

    def stop(self) -> "Counting":
        sys.setprofile(None)
        self.mode.__exit__(None, None, None)
        return self

    pause, resume = stop, start


class StepCounter(SupervisedPlugin):
    """Ops dispatched and Python calls made per stage-1 step, outside captured graphs.

    Counts in the epochs ``counted_epoch`` names, from the epoch's first
    ``before_training_iteration`` to its ``after_training_epoch``, and divides by the epoch's
    steps: everything the steps run (callbacks, forward, backward, optimizer step, metrics,
    the loader's next minibatch), the epoch's own callbacks left out. This plugin's own
    callbacks are not counted. A call into a captured graph made through ``pause_inside``
    counts as one Python call and no op, whatever it runs inside: on CUDA a CUDA-graph
    replay, on the CPU inductor's kernels. Put it first among the plugins, so that the
    window holds the others' step callbacks.
    """

    def __init__(self):
        super().__init__()
        self.ops = self.calls = self.steps = 0
        self._counting = None
        self._steps = 0

    def before_training_iteration(self, strategy, **kwargs):
        if self._counting is None and counted_epoch(strategy):
            self._counting, self._steps = Counting().start(), 0
        self._steps += 1

    def after_training_epoch(self, strategy, **kwargs):
        if self._counting is None:
            return
        self._counting.stop()
        self.ops += self._counting.mode.ops
        # this plugin's callbacks: the later steps' before_training_iteration and this one
        self.calls += self._counting.calls - self._steps
        self.steps += self._steps
        self._counting = None

    def paused(self, inner):
        """``inner`` (a captured graph's callable) as a call that counts as one Python call
        and no op."""

        def captured(*args, **kwargs):
            counting = self._counting
            if counting is None:
                return inner(*args, **kwargs)
            counting.pause()
            try:
                return inner(*args, **kwargs)
            finally:
                counting.resume()

        return captured

    def pause_inside(self, strategy) -> None:
        """Count every captured graph of ``strategy`` through ``paused``: the compiled prompt
        encoder, when there is one, and each graph of the compiled step (``compile_step``)."""
        model = strategy.model
        if hasattr(model._encode_trainable, "_torchdynamo_orig_callable"):
            model._encode_trainable = self.paused(model._encode_trainable)
        runner = getattr(strategy, "_compiled_step", None)
        if runner is not None:
            make = runner.compile
            runner.compile = lambda step: self.paused(make(step))

    def record(self) -> dict:
        """``ops_per_step``, ``python_calls_per_step`` (means) and ``counted_steps``."""
        return per_step(self.ops, self.calls, self.steps)


def per_step(ops: int, calls: int, steps: int) -> dict:
    """The JSON fields of ``ops`` and ``calls`` counted over ``steps`` steps."""
    return {
        "ops_per_step": round(ops / steps, 1) if steps else None,
        "python_calls_per_step": round(calls / steps, 1) if steps else None,
        "counted_steps": steps,
    }


class Stage2Steps:
    """Times every stage-2 run (``SecondStagePlugin.after_training_exp``, one per task) and
    counts the ops and Python calls of the run of ``counted_task`` (whole run: set-up and
    per-epoch checks included), which is left out of the timing.

    With ``compile_step`` (``CompiledStage2``) a call into a stage-2 graph counts as one Python
    call and no op, like ``StepCounter.paused``; each graph's first call (tracing, compiling,
    one step) is left out of ``ms_per_step`` and given apart as ``compile_s``. With a
    ``CompileWatch`` (``watch``), the stage-2 runs are its phase ``"stage2"``.
    """

    def __init__(self, plugin, device, counted_task: int, watch=None):
        self.plugin, self.device, self.counted_task = plugin, device, counted_task
        self.seconds = self.steps = 0.0
        self.compile_seconds, self.compiled_graphs = 0.0, 0
        self.counted: dict = {}
        self._counting = None
        inner = plugin.after_training_exp
        if watch is not None:
            inner = watch.during("stage2", inner)

        def run(strategy, **kwargs):
            before = plugin.steps
            if strategy.current_task == counted_task:
                with self._graphs():  # outside the count
                    self._counting = Counting().start()
                    try:
                        return inner(strategy, **kwargs)
                    finally:
                        self._counting.stop()
                        self.counted = per_step(
                            self._counting.mode.ops, self._counting.calls, plugin.steps - before
                        )
                        self._counting = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            began, first = time.perf_counter(), (self.compile_seconds, self.compiled_graphs)
            with self._graphs():
                out = inner(strategy, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - began - (self.compile_seconds - first[0])
            self.steps += plugin.steps - before - (self.compiled_graphs - first[1])
            return out

        plugin.after_training_exp = run

    def _graphs(self):
        """While active, the graphs ``CompiledStage2`` makes go through ``_graph``."""
        make = CompiledStage2.compile
        return patch.object(
            CompiledStage2, "compile", lambda runner, step: self._graph(make(runner, step))
        )

    def _graph(self, inner):
        """``inner`` (a stage-2 graph), its first call timed apart, its calls paused in the
        count."""
        first = [True]

        def captured(*args, **kwargs):
            counting = self._counting
            if counting is not None:
                counting.pause()
            began = time.perf_counter() if first[0] else None
            try:
                return inner(*args, **kwargs)
            finally:
                if began is not None:
                    first[0] = False
                    if counting is None:
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        self.compile_seconds += time.perf_counter() - began
                        self.compiled_graphs += 1
                if counting is not None:
                    counting.resume()

        return captured

    def record(self) -> dict:
        """``ms_per_step`` of the timed runs (each stage-2 graph's first call left out),
        ``compile_s`` (those first calls, with ``compile_step``) and the counts of the counted
        run."""
        ms = 1000 * self.seconds / self.steps if self.steps else None
        compiled = {"compile_s": round(self.compile_seconds, 3)} if self.compiled_graphs else {}
        return {"ms_per_step": None if ms is None else round(ms, 3), **compiled, **self.counted}


def stage1_steps(epochs: list) -> dict:
    """``ms_per_step`` over the steady epochs (every task's first epoch and the counted ones
    left out), ``first_epoch_ms_per_step`` over the tasks' first epochs, and
    ``compile_s``: the first epochs' time beyond their steps at the steady rate (tracing,
    compiling and capturing, plus whatever else a task's first epoch pays once)."""
    steady = [(s, n) for epoch, counted, s, n in epochs if epoch > 0 and not counted]
    first = [(s, n) for epoch, _, s, n in epochs if epoch == 0]
    steady_s, steady_n = sum(s for s, _ in steady), sum(n for _, n in steady)
    first_s, first_n = sum(s for s, _ in first), sum(n for _, n in first)
    rate = steady_s / steady_n if steady_n else None
    return {
        "ms_per_step": None if rate is None else round(1000 * rate, 3),
        "steady_steps": steady_n,
        "first_epoch_ms_per_step": round(1000 * first_s / first_n, 3) if first_n else None,
        "compile_s": None if rate is None else round(first_s - first_n * rate, 3),
        "counted_epochs_s": round(sum(s for _, counted, s, _ in epochs if counted), 3),
    }


class Stopwatch:
    """Adds up the duration of every call of a wrapped method.

    ``per_step=False``: host wall time between device synchronisations, for phases entered a
    few times per task. ``per_step=True`` on CUDA: device time between two CUDA events
    recorded around each call and read once at the end, so a phase that runs inside every
    training step is timed without making the host wait for the device at every step.
    """

    def __init__(self, device: torch.device, per_step: bool = False):
        self.cuda = device.type == "cuda"
        self.events = per_step and self.cuda
        self._seconds = 0.0
        self._pairs = []
        self.items = 0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, obj, name: str, count_items: bool = False) -> None:
        """Replace ``obj.name`` by a timed call (``count_items``: add ``len(first arg)``)."""
        inner = getattr(obj, name)

        def wrapper(*args, **kwargs):
            if self.events:
                start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                out = inner(*args, **kwargs)
                stop.record()
                self._pairs.append((start, stop))
                return out
            self._sync()
            began = time.perf_counter()
            out = inner(*args, **kwargs)
            self._sync()
            self._seconds += time.perf_counter() - began
            if count_items and args:
                self.items += len(args[0])
            return out

        setattr(obj, name, wrapper)

    @property
    def seconds(self) -> float:
        """Total so far (synchronises the device once in event mode)."""
        if self._pairs:
            self._sync()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._pairs) / 1000
            self._pairs = []
        return self._seconds


def run_once(config, named_benchmark, backbone, device, experiences=None, count_steps=False):
    """One run; returns (phase seconds, images extracted, accuracy matrix, peak GiB,
    ``StepSyncCounter`` or ``None`` off CUDA, per-step figures by phase).

    ``experiences`` limits the run to the first ones (the warm-up uses one). The per-step
    figures are ``ms_per_step`` of stage 1 and 2 and, with ``count_steps``, their
    ``ops_per_step`` and ``python_calls_per_step`` (``StepCounter``, ``Stage2Steps``); with
    each phase's compiles (``CompileWatch``: ``graphs_compiled``, ``torch_compile_s``), and
    under ``"total"`` the whole run's and its ``cudagraph_skips``.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extraction, hinge, stage2 = (
        Stopwatch(device),
        Stopwatch(device, per_step=True),
        Stopwatch(device),
    )
    watch = CompileWatch()
    timer = PhaseTimer(device, extraction, watch)
    syncs = StepSyncCounter() if device.type == "cuda" else None
    counter = StepCounter() if count_steps else None
    evaluator = make_evaluator().plugin
    model = build_model(config, named_benchmark.class_names, device, backbone=backbone)
    strategy = CLIPHingeStrategy(
        config=config,
        class_names=named_benchmark.class_names,
        model=model,
        plugins=([counter] if counter else []) + [timer] + ([syncs] if syncs else []),
        evaluator=evaluator,
        device=device,
        progress=False,
    )
    extraction.wrap(strategy, "extract_features", count_items=True)
    if counter is not None:
        counter.pause_inside(strategy)
    train_stream = named_benchmark.benchmark.train_stream[:experiences]
    stage2_steps = None
    for plugin in strategy.plugins:
        if isinstance(plugin, HardPairHingePlugin):
            hinge.wrap(plugin, "before_backward")
        if isinstance(plugin, SecondStagePlugin):
            counted = len(train_stream) - 1 if count_steps else -1
            stage2_steps = Stage2Steps(plugin, device, counted, watch)
            stage2.wrap(plugin, "after_training_exp")
    sync()
    began, began_cpu = time.perf_counter(), time.process_time()
    with watch:
        matrix = [
            task.row
            for task in train_and_evaluate(
                strategy, train_stream, named_benchmark.benchmark.test_stream[:experiences]
            )
        ]
        sync()
    total, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    phases = {
        "feature_extraction": extraction.seconds,
        "stage1": timer.seconds["stage1"],
        "hinge": hinge.seconds,
        "stage2": stage2.seconds,
        "evaluation": timer.seconds["evaluation"] - timer.seconds["extraction_in_eval"],
        "total": total,
        "total_process_cpu": cpu,
    }
    steps = {
        "stage1": {
            **stage1_steps(timer.epochs),
            **(counter.record() if counter else {}),
            **watch.record("stage1"),
        },
        "stage2": {**(stage2_steps.record() if stage2_steps else {}), **watch.record("stage2")},
        "total": {
            **watch.record(),
            "cudagraph_skips": watch.cudagraph_skips,
            "guard_failures": strategy.compile_report()["guard_failures"],
        },
    }
    return phases, extraction.items, matrix, peak, syncs, steps


@torch.no_grad()
def bare_encoder_throughput(backbone, device, batch, precision, repeats=10):
    """Images/s of open_clip's image encoder alone on random input at its resolution."""
    size = backbone.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    visual = backbone.model.visual
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if precision == "bf16" and device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    with autocast:
        for _ in range(3):
            visual(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(repeats):
            visual(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - began)


def emit(record):
    if distributed.is_main():  # under torchrun rank 0 prints
        print(json.dumps(record), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="cifar100_b0_inc10", help="a shipped preset name or a JSON config file"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="CIFAR-100-sized random 32-px images, served per item through "
        "PIL like torchvision's CIFAR100, resized on the device",
    )
    parser.add_argument(
        "--synthetic-items",
        choices=["pil", "tensor"],
        default="pil",
        help="--synthetic: 'pil' pays torchvision CIFAR100's per-image PIL "
        "work; 'tensor' slices uint8 tensors (the path of the GPU figures "
        "measured at commit 600fee6)",
    )
    parser.add_argument(
        "--preset",
        choices=["tiny"],
        default=None,
        help="tiny: the smoke preset's tiny CLIP on the JPEG folder of "
        "--data-root with CLIP's eval transform, 5 epochs per task",
    )
    parser.add_argument(
        "--data-root",
        default=str(ROOT.parent / "shared/data/cifar10-jpeg-subset"),
        help="--preset tiny: a root/{train,test}/<class>/*.jpg tree "
        "(default: the CIFAR-10 JPEG subset in ../shared/data)",
    )
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--bare-batch", type=int, default=512)
    parser.add_argument("--compare-uncached", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="--compare-uncached: timed runs per path, alternating; the "
        "medians are compared. --loader-only: passes per combination",
    )
    parser.add_argument(
        "--loader-only",
        action="store_true",
        help="with --synthetic: time only the data loader (PIL items through "
        "Avalanche's wrappers, PILToTensor vs ToTensor, each of --loader-workers) "
        "for one training experience; no model",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        nargs="+",
        default=[0, 2, 4],
        metavar="N",
        help="--loader-only: the DataLoader worker counts to time (default: 0 2 4)",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up (the first experience once per "
        "compared path, compile off) that takes one-time process costs "
        "(lazy imports, kernel set-up for new shapes, the OS file "
        "cache) off the first timed run",
    )
    parser.add_argument(
        "--no-step-counts",
        dest="step_counts",
        action="store_false",
        help="do not count ops and Python calls per step (counting slows the "
        "counted epochs, which the phase times include)",
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        metavar="N",
        help="no run: the peak memory of fitting, sampling and checkpointing "
        "the class Gaussians of N synthetic 512-d classes "
        "(benchmarks/gaussian_memory.py; --device cpu for the CPU)",
    )
    parser.add_argument(
        "--gaussian-storage",
        nargs="+",
        default=None,
        choices=["full", "bf16", "lowrank"],
        help="--classes: the storage modes to measure (default: all)",
    )
    args = parser.parse_args(argv)
    if args.classes is not None:
        if args.classes < 1:
            parser.error(f"--classes must be at least 1, got {args.classes}")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gaussian_memory import report

        report(args.classes, args.gaussian_storage, args.device)
        return
    if not args.synthetic and args.preset is None:
        parser.error("choose --synthetic (CIFAR-sized data) or --preset tiny")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.loader_only and not args.synthetic:
        parser.error("--loader-only times the synthetic CIFAR items: add --synthetic")
    if min(args.loader_workers) < 0:
        parser.error(f"--loader-workers must be 0 or more, got {min(args.loader_workers)}")
    try:  # under torchrun: join the processes, each on cuda:LOCAL_RANK (or the CPU)
        device = torch.device(distributed.init_from_env(args.device))
    except distributed.DistributedError as err:
        parser.error(str(err))
    try:
        config = CLIPHingeConfig.from_json(args.config)
    except ConfigError as err:
        parser.error(str(err))
    if args.preset == "tiny":
        tiny = {
            **SMOKE,
            "init_epochs": 5,
            "epochs": 5,
            "lr_decay_epochs": [],
            "batch_size": config.batch_size,
        }
        config = config.replace(**tiny)
    else:
        config = config.replace(pretrained=None, resize_on_device=True, class_order="natural")
    try:
        config = config.with_overrides(args.set)
    except ConfigError as err:
        parser.error(str(err))
    if args.loader_only:
        loader_rates(args, config)
        return
    seed_everything(config.seed)  # random weights are the same in every process
    backbone = load_clip(
        config.model_name,
        config.pretrained,
        device=device,
        allow_activation_mismatch=config.allow_activation_mismatch,
    )
    if args.preset == "tiny":
        from avalanche_cliphinge.benchmarks import split_image_folder

        named_benchmark = split_image_folder(
            args.data_root,
            init_class=config.init_class,
            increment=config.increment,
            train_transform=backbone.eval_transform,
            eval_transform=backbone.eval_transform,
        )
    else:
        named_benchmark = synthetic_benchmark(
            config, args.train_per_class, args.test_per_class, args.synthetic_items
        )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit(
        {
            "phase": "setup",
            "device": device_name,
            "model": config.model_name,
            "precision": config.precision,
            "compile": config.compile and device.type == "cuda",
            "compile_step": config.compile_step,
            "tasks": config.total_tasks,
            "epochs": [config.init_epochs, config.epochs],
            "second_stage_epochs": config.second_stage_epochs,
            "data": f"synthetic, {args.synthetic_items} items" if args.synthetic else "jpeg folder",
            "num_workers": config.num_workers,
            "train_images": sum(len(e.dataset) for e in named_benchmark.benchmark.train_stream),
            "test_images": sum(len(e.dataset) for e in named_benchmark.benchmark.test_stream),
            "torch": torch.__version__,
            "processes": distributed.world_size(),
        }
    )
    bare = bare_encoder_throughput(backbone, device, args.bare_batch, config.precision)
    emit({"phase": "bare_image_encoder", "images_per_s": round(bare, 1), "batch": args.bare_batch})
    if args.warmup:
        began = time.perf_counter()
        for cached in [True, False] if args.compare_uncached else [True]:
            run_once(
                config.replace(cache_features=cached, compile=False, compile_step=False),
                named_benchmark,
                backbone,
                device,
                experiences=1,
            )
        emit({"phase": "warmup", "seconds": round(time.perf_counter() - began, 3)})
    phases, extracted, matrix, peak, syncs, steps = run_once(
        config, named_benchmark, backbone, device, count_steps=args.step_counts
    )
    for name, seconds in phases.items():
        record = {"phase": name, "seconds": round(seconds, 3), **steps.get(name, {})}
        if name == "feature_extraction":
            record["images"] = extracted
            record["images_per_s"] = round(extracted / max(seconds, 1e-9), 1)
        if peak is not None:
            record["peak_mem_gib"] = round(peak, 3)
        emit(record)
    extraction_rate = extracted / max(phases["feature_extraction"], 1e-9)
    emit({"phase": "extraction_efficiency", "ratio_to_bare": round(extraction_rate / bare, 3)})
    emit({"phase": "final_accuracy", "top1_exp_percent": matrix[-1]})
    if syncs is not None:
        emit(syncs.record())
    if args.compare_uncached:
        runs = {"cached": [phases], "uncached": []}
        diff = 0.0
        for repeat in range(args.repeats):
            if repeat > 0:
                runs["cached"].append(run_once(config, named_benchmark, backbone, device)[0])
            uncached, _, matrix_u, *_ = run_once(
                config.replace(cache_features=False), named_benchmark, backbone, device
            )
            runs["uncached"].append(uncached)
            diff = max(
                [diff] + [abs(a - b) for ra, rb in zip(matrix, matrix_u) for a, b in zip(ra, rb)]
            )

        def median(path, key):
            return statistics.median(run[key] for run in runs[path])

        cached_s, uncached_s = median("cached", "total"), median("uncached", "total")
        cached_cpu, uncached_cpu = (
            median("cached", "total_process_cpu"),
            median("uncached", "total_process_cpu"),
        )
        emit(
            {
                "phase": "compare_uncached",
                "cached_s": round(cached_s, 3),
                "uncached_s": round(uncached_s, 3),
                "speedup": round(uncached_s / cached_s, 2),
                "cpu_time_speedup": round(uncached_cpu / cached_cpu, 2),
                "repeats": args.repeats,
                "cached_runs_s": [round(run["total"], 3) for run in runs["cached"]],
                "uncached_runs_s": [round(run["total"], 3) for run in runs["uncached"]],
                "max_abs_accuracy_diff_percent": diff,
                "same_metrics": diff <= 1e-4,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
