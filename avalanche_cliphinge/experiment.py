"""A whole class-incremental run: loggers, eval after every experience, report, checkpoints.

Used by ``experiments/run_split_cifar.py`` and ``experiments/run_imagenet_r.py``; usable from
Python as ``run_experiment(config, bundle, output_dir, ...)``.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from avalanche.evaluation.metrics import (accuracy_metrics, bwt_metrics, forgetting_metrics,
                                          loss_metrics, timing_metrics)
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from . import checkpoint as ckpt
from .config import CLIPHingeConfig
from .model.backbone import CLIPBackbone
from .results import (cil_metrics, format_results, grouped_accuracy, plot_accuracy_curve,
                      plot_accuracy_matrix)
from .strategy import CLIPHingeStrategy, build_model

PACKAGES = ("avalanche-cliphinge", "avalanche-lib", "torch", "torchvision", "open_clip_torch",
            "peft", "numpy")


class RunError(RuntimeError):
    """The output folder or the checkpoints do not allow the requested run."""


def package_versions() -> Dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def make_evaluator(output_dir: Path, wandb: bool = False, interactive: bool = True,
                   csv_rows: Optional[Dict[str, int]] = None):
    """Avalanche ``EvaluationPlugin`` with accuracy, forgetting, BWT, loss and timing metrics.

    Loggers: ``InteractiveLogger`` (progress bars), ``TextLogger`` (``log.txt``),
    ``CSVLogger`` (``csv/``), ``TensorboardLogger`` (``tb/``) and ``WandBLogger`` when asked.
    ``csv_rows`` (resume) keeps that many lines of the earlier CSV files.

    Returns ``(evaluator, tensorboard_logger)``.
    """
    output_dir = Path(output_dir)
    csv_dir = output_dir / "csv"
    kept = {}
    if csv_rows:
        for name, rows in csv_rows.items():
            path = csv_dir / name
            if path.exists():
                kept[name] = path.read_text().splitlines(keepends=True)[1:rows]
    tb_logger = TensorboardLogger(tb_log_dir=str(output_dir / "tb"))
    loggers: List[Any] = [TextLogger(open(output_dir / "log.txt", "a")),
                          CSVLogger(log_folder=str(csv_dir)), tb_logger]
    for name, lines in kept.items():
        with open(csv_dir / name, "a") as handle:
            handle.writelines(lines)
    if interactive:
        loggers.insert(0, InteractiveLogger())
    if wandb:
        try:
            import wandb as _  # noqa: F401
        except ImportError:
            raise RunError("--wandb needs the wandb package: pip install wandb") from None
        from avalanche.logging import WandBLogger
        loggers.append(WandBLogger(project_name="avalanche-cliphinge",
                                   run_name=output_dir.name, dir=str(output_dir)))
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        timing_metrics(epoch=True, experience=True),
        loggers=loggers)
    return evaluator, tb_logger


def csv_row_counts(output_dir: Path) -> Dict[str, int]:
    """Lines (header included) of each Avalanche CSV file, to cut them back on resume."""
    counts = {}
    for path in (Path(output_dir) / "csv").glob("*.csv"):
        counts[path.name] = len(path.read_text().splitlines())
    return counts


@dataclass
class RunState:
    """What a run has measured so far (saved in every checkpoint and in results.json)."""

    matrix: List[List[float]] = field(default_factory=list)
    per_task: List[Dict[str, Any]] = field(default_factory=list)
    stream_forgetting: List[Optional[float]] = field(default_factory=list)
    hard_pairs: List[Dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    wall_seconds: float = 0.0


def _metric(results: Dict[str, float], prefix: str, exp: Optional[int] = None):
    for key, value in results.items():
        if key.startswith(prefix) and (exp is None or key.endswith(f"/Exp{exp:03d}")):
            return float(value)
    return None


def run_experiment(config: CLIPHingeConfig, bundle, output_dir: str | Path, *,
                   backbone: Optional[CLIPBackbone] = None, device: str = "cpu",
                   resume: bool = False, overwrite: bool = False, force: bool = False,
                   wandb: bool = False, interactive: bool = True,
                   protocol: Optional[Dict[str, Any]] = None,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train on every experience of ``bundle``, evaluating the full test stream after each.

    Args:
        config: the method's settings (checked against the stream's class count).
        bundle: a ``benchmarks.StreamBundle`` (Avalanche benchmark, class names and order).
        output_dir: where results, logs, TensorBoard events, plots and checkpoints go.
        backbone: the already loaded CLIP (its transforms built the stream); loaded from the
            config when ``None``.
        device: torch device.
        resume: continue after the last complete experience of a run in ``output_dir``.
        overwrite: start again in a folder that holds a run.
        force: resume even when the checkpoint's config differs.
        wandb: also log to Weights & Biases.
        interactive: show Avalanche's progress bars.
        protocol: extra protocol fields (stream, class order, data source...).
        log: where one-line status messages go.

    Returns:
        The content of ``results.json``.
    """
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    results_path = output_dir / "results.json"
    config.check_class_count(len(bundle.class_names), "the stream")
    n_exps = len(bundle.benchmark.train_stream)
    if n_exps != config.total_tasks:
        raise RunError(f"the stream has {n_exps} experiences but total_tasks="
                       f"{config.total_tasks}; make them agree")
    state = _prepare_output(output_dir, results_path, checkpoints, config, resume, overwrite,
                            force, log)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.to_json(output_dir / "config.json")

    torch.manual_seed(config.seed)
    model = build_model(config, bundle.class_names, device, backbone=backbone)
    backbone = model.backbone
    evaluator, tb_logger = make_evaluator(
        output_dir, wandb=wandb, interactive=interactive,
        csv_rows=state["csv_rows"] if state else None)
    strategy = CLIPHingeStrategy(config=config, class_names=bundle.class_names, model=model,
                                 evaluator=evaluator, device=device)
    run = RunState()
    start = 0
    if state is not None:
        ckpt.load_model_state(model, state["model"])
        model.to(device)
        ckpt.set_clock_state(strategy.clock, state["clock"])
        ckpt.set_evaluator_state(evaluator, state["evaluator"])
        ckpt.set_rng_state(state["rng"])
        strategy.current_task = model.n_tasks - 1
        run = RunState(**state["run"])
        start = state["completed"]
        log(f"resuming after experience {start - 1} ({start} of {n_exps} done)")

    test_sizes = [len(exp.dataset) for exp in bundle.benchmark.test_stream]
    full_protocol = {
        "model": config.model_name,
        "pretrained": backbone.pretrained,
        "weights_sha256": backbone.weights_sha256,
        "class_order": bundle.class_order,
        **(protocol or {}),
        **{f"stream_{k}": v for k, v in bundle.protocol.items()},
        "seed": config.seed,
        "device": _device_name(device),
        "versions": package_versions(),
        "config": config.to_dict(),
    }
    hinge = next((p for p in strategy.plugins if hasattr(p, "text_pairs")), None)
    for index in range(start, n_exps):
        experience = bundle.benchmark.train_stream[index]
        began = time.perf_counter()
        strategy.train(experience, eval_streams=[])
        run.train_seconds += time.perf_counter() - began
        results = strategy.eval(bundle.benchmark.test_stream)
        row = [100.0 * (_metric(results, "Top1_Acc_Exp/eval_phase/test_stream", j) or 0.0)
               for j in range(n_exps)]
        run.matrix.append(row)
        run.per_task.append(grouped_accuracy(row, test_sizes, index))
        forgetting = _metric(results, "StreamForgetting/eval_phase/test_stream")
        run.stream_forgetting.append(None if forgetting is None else 100.0 * forgetting)
        run.wall_seconds += time.perf_counter() - began
        run.hard_pairs.append({"text": [list(p) for p in hinge.text_pairs],
                               "image": [list(p) for p in hinge.image_pairs]}
                              if hinge is not None else {"text": [], "image": []})
        summary = _write_results(output_dir, run, test_sizes, full_protocol, n_exps, tb_logger,
                                 index)
        ckpt.save_checkpoint({
            "completed": index + 1,
            "config": config.to_dict(),
            "model": ckpt.model_state(model),
            "clock": ckpt.clock_state(strategy.clock),
            "evaluator": ckpt.evaluator_state(evaluator),
            "rng": ckpt.rng_state(),
            "run": run.__dict__,
            "csv_rows": csv_row_counts(output_dir),
        }, checkpoints)
        log(f"task {index}: accuracy on seen classes {run.per_task[-1]['all']:.2f}% "
            f"(AIA so far {summary['metrics']['AIA']:.2f}%)")
    tb_logger.writer.flush()
    for logger in evaluator.loggers:
        if isinstance(logger, CSVLogger):
            logger.close()
    return json.loads(results_path.read_text())


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def _prepare_output(output_dir: Path, results_path: Path, checkpoints: Path,
                    config: CLIPHingeConfig, resume: bool, overwrite: bool, force: bool,
                    log: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """Check the folder against the request; returns the checkpoint state to resume from."""
    if overwrite:
        for name in ("results.json", "results.txt", "log.txt", "config.json", "csv", "tb",
                     "checkpoints", "accuracy_matrix.png", "accuracy_curve.png"):
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return None
    finished = False
    if results_path.exists():
        try:
            finished = bool(json.loads(results_path.read_text()).get("finished"))
        except json.JSONDecodeError:
            finished = False
    if finished:
        raise RunError(f"{output_dir} already holds a finished run (results.json); pass "
                       "--overwrite to run again or choose another --output-dir")
    has_checkpoints = bool(ckpt.list_checkpoints(checkpoints))
    if not resume:
        if has_checkpoints or results_path.exists():
            raise RunError(f"{output_dir} holds an unfinished run; pass --resume to continue "
                           "it or --overwrite to start again")
        return None
    state = ckpt.load_latest(checkpoints, warn=log)
    if state is None:
        log(f"--resume: no checkpoint in {checkpoints}; starting from the first experience")
        return None
    differences = ckpt.config_differences(state["config"], config.to_dict())
    if differences and not force:
        raise RunError("the checkpoint was made with another config (" + "; ".join(
            differences) + "); pass --force to resume anyway")
    return state


def _write_results(output_dir: Path, run: RunState, sizes: Sequence[int],
                   protocol: Dict[str, Any], n_exps: int, tb_logger, index: int):
    metrics = cil_metrics(run.matrix, sizes)
    finished = len(run.matrix) == n_exps
    summary = {
        "finished": finished,
        "completed_tasks": len(run.matrix),
        "metrics": metrics,
        "avalanche_stream_forgetting": run.stream_forgetting[-1],
        "per_task": run.per_task,
        "accuracy_matrix": run.matrix,
        "test_sizes": list(sizes),
        "hard_pairs": run.hard_pairs,
        "train_seconds": run.train_seconds,
        "wall_seconds": run.wall_seconds,
        "protocol": protocol,
    }
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"metric {name} is {value}: the accuracy matrix holds "
                                     f"non-finite values {run.matrix}")
    ckpt.write_text_atomic(json.dumps(summary, indent=2) + "\n", output_dir / "results.json")
    ckpt.write_text_atomic(format_results(run.per_task, metrics, run.stream_forgetting[-1],
                                          protocol), output_dir / "results.txt")
    matrix_fig = plot_accuracy_matrix(run.matrix, output_dir / "accuracy_matrix.png")
    curve_fig = plot_accuracy_curve({"all seen classes": [g["all"] for g in run.per_task],
                                     "new classes": [g["new"] for g in run.per_task]},
                                    output_dir / "accuracy_curve.png")
    writer = tb_logger.writer
    writer.add_figure("results/accuracy_matrix", matrix_fig, global_step=index)
    writer.add_figure("results/accuracy_curve", curve_fig, global_step=index)
    for name, value in metrics.items():
        writer.add_scalar(f"results/{name}", value, global_step=index)
    writer.add_scalar("results/accuracy_seen_classes", run.per_task[-1]["all"], index)
    writer.flush()
    return summary


def print_summary(results: Dict[str, Any], out=sys.stdout) -> None:
    """Print results.txt-style lines for a finished (or partial) run."""
    metrics = results["metrics"]
    out.write(format_results(results["per_task"], metrics,
                             results["avalanche_stream_forgetting"],
                             {k: v for k, v in results["protocol"].items()
                              if k in ("model", "pretrained", "class_order", "seed",
                                       "device")}))
    out.write(f"wall time {results['wall_seconds']:.1f} s (training "
              f"{results['train_seconds']:.1f} s)\n")
