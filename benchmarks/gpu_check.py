#!/usr/bin/env python
"""One command for the first GPU a session is lent: the captured step checked and timed.

    python benchmarks/gpu_check.py                # CUDA: sized for 5 minutes on one H100
    python benchmarks/gpu_check.py --device cpu   # the CPU at tiny sizes (the suite runs it)

Prints ONE JSON line. Two parts, each run in processes of its own (this script with the
hidden ``--worker``), so every run starts with torch's in-memory caches empty:

``equality``: the tiny CLIP (``cliphinge-tiny``) in fp32 trains the same experiences with the
eager step and with the captured step (``compile_step`` false, then true; ``compile`` off):
Gaussian replay, both hinges with every pair hard, the image adapter, lr decay, 2 stage-2
epochs, a padded last minibatch. Compared: every learned tensor (prompt contexts, the adapter,
the stage-2 heads; the frozen CLIP too), Adam's step counts, the evaluator's epoch metrics and
stage 2's epoch losses, within ``TOLERANCE`` (tests/test_compiled_step.py's, reported with
the largest differences found). The captured run must compile graphs for both stages and
fall back to the eager step nowhere.

``vit``: ViT-B/16 (open_clip ``ViT-B-16-quickgelu``, random weights) in bf16 on synthetic
CIFAR-100-sized tensor items (``speed.py --synthetic --synthetic-items tensor``), the first
``--tasks`` tasks of B0 Inc10, timed by ``speed.run_once`` three times: ``eager``
(``compile_step`` and ``compile`` off: no torch.compile at all), ``captured_cold``
(``compile_step``, an empty inductor cache: a fresh ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR``) and ``captured_warm`` (the same, the cache the cold run filled). Each
gives ms per steady step (stage 1 and 2), torch's compile seconds and graphs by phase
(``speed.CompileWatch``), the whole run's seconds (``run_s``; ``process_s`` adds the
process's start), inductor's ``cudagraph_skips``, synchronising CUDA calls per steady stage-1
step (``speed.StepSyncCounter``: torch's sync debug mode) and the peak memory
(``torch.cuda.max_memory_allocated``). The captured runs must compile graphs, fall back
nowhere, trace no graph again (``guard_failures``) and, on CUDA, skip no CUDA graph.

``--device cpu`` runs both parts with the tiny CLIP in fp32, 2 tasks of 2 classes, and the
``eager`` backend: Dynamo captures each step whole (``fullgraph``, backward and optimizer
included) and the captured graph runs op by op, so the runners' work (buffers, padding, the
functional Adam and SGD, device epoch sums, learning rates, graphs per run) is checked without
AOT autograd's and inductor's compile time (``--backend aot_eager``, about 3 s more a graph
here, is what tests/test_runner_equality.py runs; ``--backend inductor``, minutes cold). ``--budget-s`` bounds the whole command:
a run that would pass it is stopped and counts as failed.

Exit status: 0 every check passed; 1 a check failed (``failures`` says which); 2 no CUDA
device (without ``--device cpu``), or bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: ``learned`` tensors and the ``reported`` figures (epoch metrics, stage 2's epoch losses):
#: those of tests/test_compiled_step.py, whose plan (3 epochs, lr decay) this is. The runners
#: sum in different orders (a padded minibatch, Adam's capturable form, inductor's fusions),
#: and Adam divides each gradient by its running RMS, so rounding on a gradient near zero moves
#: its weight by a fraction of lr (0.01) over the 9 steps of a task: up to 4e-5 seen on the
#: CPU (the adapter). tests/test_runner_equality.py's 1e-5 is for 3 steps a task.
TOLERANCE = {"learned": {"rtol": 1e-4, "atol": 1e-4}, "reported": {"rtol": 1e-4, "atol": 1e-5}}
#: experiences the equality part trains (stage 2 runs from the second)
EQUALITY_EXPERIENCES = 2
#: the ViT part's sizes by device: tasks, training and test images per class
SIZES = {"cuda": (3, 500, 100), "cpu": (2, 10, 5)}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--backend",
        choices=["inductor", "aot_eager", "eager"],
        default=None,
        help="what torch.compile makes of the captured step's graph (default: inductor on "
        "CUDA, eager on the CPU)",
    )
    parser.add_argument(
        "--tasks", type=int, default=None, help="vit: tasks run (default 3 on CUDA, 2 on the CPU)"
    )
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="vit: config overrides"
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["equality", "vit"], default=["equality", "vit"]
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=290.0,
        help="the whole command's wall time at most (default 290)",
    )
    parser.add_argument(
        "--worker", choices=["equality", "eager", "captured"], help=argparse.SUPPRESS
    )
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tasks, train, test = SIZES[args.device]
    args.backend = args.backend or ("inductor" if args.device == "cuda" else "eager")
    args.tasks = tasks if args.tasks is None else args.tasks
    args.train_per_class = train if args.train_per_class is None else args.train_per_class
    args.test_per_class = test if args.test_per_class is None else args.test_per_class
    for name in ("tasks", "train_per_class", "test_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    from avalanche_cliphinge.config import CLIPHingeConfig, ConfigError  # light: no torch

    try:
        CLIPHingeConfig.from_json("cifar100_b0_inc10").with_overrides(args.set)
    except ConfigError as err:
        parser.error(str(err))
    return args


# ---- the parent: runs the workers, checks, prints one line ---------------------------------
def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}); "
            "--device cpu runs the check on the CPU at tiny sizes",
            file=sys.stderr,
        )
        return 2
    began = time.perf_counter()
    report = {
        "check": "gpu_check",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "backend": args.backend,
    }
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:

        def spawn(kind, cache=None):
            left = args.budget_s - (time.perf_counter() - began)
            return run_worker(args, kind, Path(scratch), left, cache)

        if "equality" in args.parts:
            report["equality"] = equality = spawn("equality")
            failures += [f"equality: {f}" for f in equality.get("failures", [])]
        if "vit" in args.parts:
            cache = Path(scratch) / "inductor-cache"
            runs = {
                "eager": spawn("eager", Path(scratch) / "eager-cache"),
                "captured_cold": spawn("captured", cache),
                "captured_warm": spawn("captured", cache),
            }
            report["vit"] = runs
            for name, run in runs.items():
                failures += [f"vit {name}: {f}" for f in vit_failures(run, name, args.device)]
    report["failures"] = failures
    report["ok"] = not failures
    report["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def run_worker(args, kind: str, scratch: Path, seconds_left: float, cache=None) -> dict:
    """Run this script as worker ``kind`` in a process of its own; its JSON, or the error.
    ``cache``: the inductor (and Triton) cache folder the process uses."""
    if seconds_left < 1:
        return {"failures": [f"not run: the {args.budget_s:.0f} s budget was spent"]}
    out = scratch / f"{kind}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", str(out)]
    command += ["--device", args.device, "--backend", args.backend, "--tasks", str(args.tasks)]
    command += ["--train-per-class", str(args.train_per_class)]
    command += ["--test-per-class", str(args.test_per_class)]
    for item in args.set:
        command += ["--set", item]
    env = dict(os.environ)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        env["TRITON_CACHE_DIR"] = str(cache / "triton")
    began = time.perf_counter()
    # a session of its own: at the budget's end the worker goes with the processes it
    # started (inductor's compile workers), which hold its output open
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=seconds_left)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"failures": [f"stopped at the budget's end, after {seconds_left:.0f} s"]}
    seconds = round(time.perf_counter() - began, 1)
    if process.returncode != 0 or not out.is_file():
        tail = " | ".join(err.strip().splitlines()[-6:])
        return {"process_s": seconds, "failures": [f"exit {process.returncode}: {tail}"]}
    return {**json.loads(out.read_text()), "process_s": seconds}


def vit_failures(run: dict, name: str, device: str) -> list:
    """What a ViT run failed: its process, and for a captured run the graphs, fallbacks,
    guard failures and, on CUDA, CUDA-graph skips."""
    failures = list(run.get("failures", []))
    if failures or name == "eager":
        return failures
    if not run["graphs_compiled"]["total"]:
        failures.append("no graph compiled: the captured step did not run")
    if run["fell_back"]:
        failures.append(f"fell back to the eager step: {run['fell_back']}")
    if device == "cuda" and run["cudagraph_skips"] != 0:
        failures.append(f"cudagraph_skips is {run['cudagraph_skips']}, not 0")
    if run.get("guard_failures"):
        failures.append(f"{run['guard_failures']} guard failures: a graph was traced again")
    return failures


# ---- the workers ---------------------------------------------------------------------------
def worker(args) -> int:
    """One part's process: its JSON into ``--out``. Python's garbage collector is off while
    the modules import (their many objects made it run full collections: seconds)."""
    gc.disable()
    import torch

    speed_module()  # and through it the package, Avalanche, open_clip
    gc.freeze()
    gc.enable()
    if args.backend != "inductor":
        use_backend(args.backend)
    device = torch.device(args.device)
    result = equality(device, args) if args.worker == "equality" else vit_run(device, args)
    Path(args.out).write_text(json.dumps(result))
    return 0


def use_backend(name: str) -> None:
    """Every ``torch.compile`` of this process with backend ``name`` (its ``mode`` and
    ``options``, inductor's, dropped)."""
    import torch

    compile = torch.compile

    def compile_with(model=None, **kwargs):
        kwargs.pop("mode", None)
        kwargs.pop("options", None)
        return compile(model, **{**kwargs, "backend": name})

    torch.compile = compile_with


def speed_module():
    """benchmarks/speed.py (a script beside this one, not an installed module)."""
    sys.path.insert(0, str(HERE))
    import speed

    return speed


def watched_run(speed, config, named, backbone, device, experiences):
    """Train ``experiences`` from the same initial weights (seeded); returns the strategy,
    its epoch metrics (times left out), its ``CompileWatch`` (stage 2's runs its phase
    ``"stage2"``) and the ``compile_step`` fallback warnings."""
    from avalanche_cliphinge import CLIPHingeStrategy, build_model
    from avalanche_cliphinge.app.evaluation import make_evaluator
    from avalanche_cliphinge.plugins import SecondStagePlugin
    from avalanche_cliphinge.seeding import seed_everything

    seed_everything(config.seed)
    evaluator = make_evaluator().plugin
    model = build_model(config, named.class_names, device, backbone=backbone)
    strategy = CLIPHingeStrategy(
        config=config,
        class_names=named.class_names,
        model=model,
        evaluator=evaluator,
        device=device,
        progress=False,
    )
    watch = speed.CompileWatch()
    for plugin in strategy.plugins:
        if isinstance(plugin, SecondStagePlugin):
            plugin.after_training_exp = watch.during("stage2", plugin.after_training_exp)
    with watch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for experience in named.benchmark.train_stream[:experiences]:
            strategy.train(experience)
    metrics = {k: v for k, v in evaluator.get_all_metrics().items() if not k.startswith("Time_")}
    return strategy, metrics, watch, fallbacks(caught)


def fallbacks(caught) -> list:
    """The ``compile_step`` fallback warnings among ``caught``."""
    return sorted({str(w.message) for w in caught if str(w.message).startswith("compile_step:")})


def equality(device, args) -> dict:
    """Part (a): the eager and the captured step on the tiny CLIP in fp32, compared."""
    import torch

    from avalanche_cliphinge import TINY_MODEL, CLIPHingeConfig, load_clip
    from avalanche_cliphinge.plugins import SecondStagePlugin
    from avalanche_cliphinge.seeding import seed_everything

    if device.type == "cuda":  # fp32 means fp32: no TF32 in either run
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    speed = speed_module()
    config = CLIPHingeConfig(
        model_name=TINY_MODEL,
        pretrained=None,
        init_class=2,
        increment=2,
        total_tasks=3,
        class_order="natural",
        init_epochs=3,
        epochs=3,
        lr=0.01,
        init_lr=0.01,
        lr_decay_epochs=[2],
        batch_size=25,  # 60 images a task: 3 steps, the last one padded
        eval_batch_size=64,
        seed=0,
        second_stage_epochs=2,
        text_hard_pair_threshold=-1.0,
        use_image_hinge_loss=True,
        image_hard_pair_threshold=-1.0,
        use_image_adapter=True,
        resize_on_device=True,
        precision="fp32",
        compile=False,
    )
    named = speed.synthetic_benchmark(config, 30, 10, "tensor")
    seed_everything(config.seed)
    backbone = load_clip(config.model_name, config.pretrained, device=device)
    runs = {
        name: watched_run(
            speed,
            config.replace(compile_step=captured),
            named,
            backbone,
            device,
            EQUALITY_EXPERIENCES,
        )
        for name, captured in (("eager", False), ("captured", True))
    }
    (eager, eager_metrics, _, _), (captured, captured_metrics, watch, fell_back) = runs.values()
    failures, diffs = [], {}

    def within(name, a, b, kind="learned") -> None:
        tolerance = TOLERANCE[kind]
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        if a.shape != b.shape:
            failures.append(f"{name}: shapes {list(a.shape)} and {list(b.shape)}")
            return
        group = name.split(".")[0]
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        diffs[group] = max(diffs.get(group, 0.0), diff)
        if not torch.allclose(b, a, **tolerance):
            failures.append(f"{name}: max abs diff {diff:.3g} beyond {tolerance}")

    learned = [dict(run.model.named_parameters()) for run in (eager, captured)]
    if sorted(learned[0]) != sorted(learned[1]):
        failures.append(f"parameters differ: {sorted(set(learned[0]) ^ set(learned[1]))}")
    for name in sorted(set(learned[0]) & set(learned[1])):
        within(name, learned[0][name].detach().cpu(), learned[1][name].detach().cpu())
    steps = [adam_steps(run.optimizer) for run in (eager, captured)]
    if steps[0] != steps[1]:
        failures.append(f"Adam's step counts differ: eager {steps[0]}, captured {steps[1]}")
    if sorted(eager_metrics) != sorted(captured_metrics):
        failures.append(f"metrics differ: {sorted(set(eager_metrics) ^ set(captured_metrics))}")
    for name in sorted(set(eager_metrics) & set(captured_metrics)):
        (at_a, values_a), (at_b, values_b) = eager_metrics[name], captured_metrics[name]
        if list(at_a) != list(at_b):
            failures.append(f"metric {name}: reported at steps {at_a} and {at_b}")
        elif values_a:
            within(f"metrics.{name}", values_a, values_b, "reported")
    losses = [
        next(p for p in run.plugins if isinstance(p, SecondStagePlugin)).losses
        for run in (eager, captured)
    ]
    if len(losses[0]) != len(losses[1]) or not losses[0]:
        failures.append(f"stage-2 epoch losses: {losses}")
    else:
        within("stage2_losses", losses[0], losses[1], "reported")
    graphs = {"stage1": watch.graphs.get("other", 0), "stage2": watch.graphs.get("stage2", 0)}
    for stage, made in graphs.items():
        if not made:
            failures.append(f"no {stage} graph compiled: the captured {stage} did not run")
    if fell_back:
        failures.append(f"fell back to the eager step: {fell_back}")
    guard_failures = captured.compile_report()["guard_failures"]
    if guard_failures:
        failures.append(f"{guard_failures} guard failures: a graph was traced again")
    return {
        "ok": not failures,
        "model": config.model_name,
        "precision": config.precision,
        "experiences": EQUALITY_EXPERIENCES,
        "tolerance": TOLERANCE,
        "max_abs_diff": {name: float(f"{diff:.3g}") for name, diff in sorted(diffs.items())},
        "parameters_compared": len(learned[0]),
        "metrics_compared": len(eager_metrics),
        "adam_steps": {"eager": steps[0], "captured": steps[1]},
        "graphs_compiled": graphs,
        "guard_failures": guard_failures,
        "compile_s": round(sum(watch.seconds.values(), 0.0), 3),
        "fell_back": fell_back,
        "failures": failures,
    }


def adam_steps(optimizer) -> list:
    """Adam's step count of each parameter (``None`` for one it never stepped)."""
    counts = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            counts.append(None if step is None else int(float(step)))
    return counts


def vit_config(device, args, captured: bool):
    """The ViT part's config: CIFAR-100 B0 Inc10's first ``--tasks`` tasks, random weights,
    bf16 (on the CPU: the tiny CLIP in fp32, 2 classes a task, 2 epochs)."""
    from avalanche_cliphinge import TINY_MODEL, CLIPHingeConfig

    config = CLIPHingeConfig.from_json("cifar100_b0_inc10").replace(
        pretrained=None, resize_on_device=True, class_order="natural", total_tasks=args.tasks
    )
    if device.type == "cuda":
        config = config.replace(
            model_name="ViT-B-16-quickgelu", precision="bf16", eval_batch_size=512
        )
    else:
        config = config.replace(
            model_name=TINY_MODEL,
            init_class=2,
            increment=2,
            init_epochs=2,
            epochs=2,
            lr_decay_epochs=[],
            batch_size=16,
            eval_batch_size=64,
            second_stage_epochs=1,
        )
    config = config.with_overrides(args.set)
    # eager: no torch.compile at all (``compile`` would compile the prompt encoder on CUDA)
    return config.replace(compile_step=captured, compile=captured and config.compile)


def vit_run(device, args) -> dict:
    """Part (b): one timed run (``speed.run_once``) of the ViT config."""
    import torch

    from avalanche_cliphinge import load_clip
    from avalanche_cliphinge.seeding import seed_everything

    speed = speed_module()
    config = vit_config(device, args, captured=args.worker == "captured")
    seed_everything(config.seed)
    backbone = load_clip(
        config.model_name,
        config.pretrained,
        device=device,
        allow_activation_mismatch=config.allow_activation_mismatch,
    )
    named = speed.synthetic_benchmark(config, args.train_per_class, args.test_per_class, "tensor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phases, extracted, matrix, peak, syncs, steps = speed.run_once(
            config, named, backbone, device
        )
    stage1, stage2, total = steps["stage1"], steps["stage2"], steps["total"]
    synced = syncs.record() if syncs is not None else {}
    return {
        "model": config.model_name,
        "precision": config.precision,
        "compile_step": config.compile_step,
        "compile": config.compile,
        "tasks": config.total_tasks,
        "train_images": sum(len(e.dataset) for e in named.benchmark.train_stream),
        "run_s": round(phases["total"], 3),
        "phase_s": {
            name: round(phases[name], 3)
            for name in ("feature_extraction", "stage1", "stage2", "evaluation")
        },
        "stage1_ms_per_step": stage1.get("ms_per_step"),
        "stage2_ms_per_step": stage2.get("ms_per_step"),
        "compile_s": {
            "stage1": stage1["torch_compile_s"],
            "stage2": stage2["torch_compile_s"],
            "total": total["torch_compile_s"],
        },
        "graphs_compiled": {
            "stage1": stage1["graphs_compiled"],
            "stage2": stage2["graphs_compiled"],
            "total": total["graphs_compiled"],
        },
        "cudagraph_skips": total["cudagraph_skips"],
        "guard_failures": total["guard_failures"],
        "host_syncs_per_steady_step": synced.get("syncs_per_steady_step"),
        "host_sync_sites": synced.get("where"),
        "peak_mem_gib": None if peak is None else round(peak, 3),
        "final_accuracy": [None if a is None else round(float(a), 2) for a in matrix[-1]],
        "images_extracted": extracted,
        "fell_back": fallbacks(caught),
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    sys.exit(main())
