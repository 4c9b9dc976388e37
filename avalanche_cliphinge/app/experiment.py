"""A whole class-incremental run: lock the output folder, build the strategy and its loggers,
train and evaluate each experience and record it (results, plots, TensorBoard, checkpoint),
finish with the final model.

Used by ``experiments/run_split_cifar.py`` and ``experiments/run_imagenet_r.py``; usable from
Python as ``run_experiment(config, named_benchmark, output_dir, ...)``.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from . import checkpoint as ckpt
from . import run_lock
from .. import distributed
from ..atomic import write_text_atomic
from ..config import CLIPHingeConfig
from ..errors import RunError, first_line
from ..kill_points import kill_point
from ..model.backbone import CLIPBackbone
from ..plugins.hard_pair_hinge import HardPairHingePlugin
from ..seeding import seed_everything
from .confusion import ConfusionMatrixPlugin
from .evaluation import Evaluation, EvaluatorError, make_evaluator
from .loop import SEEN_ACCURACY, metric_value, train_and_evaluate
from .results import cil_metrics, format_report, grouped_accuracy
from .run_checks import (
    FiniteScoresCheck,
    check_prompt_length,
    check_resumable,
    check_run_paths,
    check_stream,
    check_wandb,
    load_resume_state,
    stream_fingerprint,
)
from .run_folder import (
    LOG_FILES,
    RUN_FILES,
    check_output_dir,
    csv_row_counts,
    prepare_output_dir,
    remove_leftover_temp_files,
    remove_run_files,
    restore_logs,
    tensorboard_sizes,
)
from .run_reports import log_hparams, log_results, write_plots
from .run_record import (
    RunState,
    device_name,
    git_commit,
    hard_pairs_of,
    named_pair,
    now_iso,
    package_versions,
)
from ..strategy import CLIPHingeStrategy, build_model
from ..streams import task_layout
from ..wandb_logger import WandBLogger


def run_experiment(
    config: CLIPHingeConfig,
    named_benchmark,
    output_dir: str | Path,
    *,
    backbone: Optional[CLIPBackbone] = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    wandb: bool = False,
    interactive: bool | str = True,
    protocol: Optional[Dict[str, Any]] = None,
    plugins: Sequence[Any] = (),
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train on every experience of ``named_benchmark``, evaluating the full test stream after each.

    After every experience the results so far (``results.json``, ``results.txt``, plots,
    TensorBoard) and a checkpoint (``checkpoints/exp_<k>.pt``, the last two kept) are written
    atomically, in that order, and the run is marked finished only after the last of them, so
    an interrupted run continues with ``resume=True`` exactly as if it had not stopped.

    Args:
        config: the method's settings (checked against the stream's class count; layout keys
            left unset are read off the stream and recorded in the results).
        named_benchmark: a ``benchmarks.NamedBenchmark`` (Avalanche benchmark, class names and order).
        output_dir: where results, logs, TensorBoard events, plots and checkpoints go.
        backbone: the already loaded CLIP (its transforms built the stream); loaded from the
            config when ``None``. With random weights (``pretrained=None``) seed the global
            RNG with ``config.seed`` before loading it, or a resumed run gets another CLIP.
        device: torch device.
        resume: continue after the last complete experience of a run in ``output_dir``.
        overwrite: start again in a folder that holds a run.
        force: resume even when the checkpoint's config or stream differs.
        wandb: also log to Weights & Biases.
        interactive: progress bars and metric lines on standard output, drawn per epoch and
            per evaluated experience (``progress.EpochProgress``); ``"progress"``: the bars
            only.
        protocol: extra protocol fields (stream, class order, data source...).
        plugins: extra Avalanche plugins for the strategy.
        log: where one-line status messages go.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError, RunError, CheckpointError: the request cannot run (nothing is deleted).
        run_lock.RunLockedError: another process is running in ``output_dir`` (the folder is
            locked for the whole run; the lock of a dead process never blocks).
        FloatingPointError: a non-finite loss, stage-2 weight or test score; the checkpoints
            written so far are intact.
        OSError: the disk or the folder failed (full, quota, read-only); the files written
            so far are intact and ``resume=True`` continues.
    """
    if resume and overwrite:
        raise RunError(
            "resume and overwrite exclude each other: continue the run or start it again"
        )
    output_dir = Path(output_dir)
    if not config.layout_is_set:  # the keys left unset are read off the stream
        layout = task_layout(named_benchmark.benchmark)
        config = config.replace(**{k: v for k, v in layout.items() if getattr(config, k) is None})
    check_stream(config, named_benchmark)
    check_run_paths(config)
    if wandb:
        check_wandb()
    if not distributed.is_main():  # under torchrun rank 0 alone prints and shows bars
        log, interactive = _quiet, False
    with ExitStack() as held:
        locks: List[run_lock.RunLock] = []

        def take_folder() -> None:
            prepare_output_dir(output_dir)
            locks.append(held.enter_context(run_lock.hold(output_dir)))
            check_output_dir(output_dir, resume=resume, overwrite=overwrite)

        # the folder is rank 0's (torchrun); its verdict stops every rank alike
        distributed.on_main(take_folder)
        return _run_locked(
            config,
            named_benchmark,
            output_dir,
            locks[0] if locks else None,
            backbone=backbone,
            device=device,
            resume=resume,
            overwrite=overwrite,
            force=force,
            wandb=wandb,
            interactive=interactive,
            protocol=protocol,
            plugins=plugins,
            log=log,
        )


def _run_locked(
    config: CLIPHingeConfig,
    named_benchmark,
    output_dir: Path,
    lock,
    *,
    backbone,
    device,
    resume,
    overwrite,
    force,
    wandb,
    interactive,
    protocol,
    plugins,
    log,
):
    """``run_experiment`` once the folder is locked and checked."""
    checkpoints = output_dir / "checkpoints"
    n_exps = len(named_benchmark.benchmark.train_stream)
    fingerprint = stream_fingerprint(named_benchmark)
    # read on rank 0 (the output folder may be on its machine only), sent to every rank
    state = distributed.on_main(
        lambda: load_resume_state(checkpoints, config, fingerprint, resume, force, log)
    )
    if state is not None:
        check_resumable(state, config, named_benchmark)
    seed_everything(config.seed)
    model = build_model(config, named_benchmark.class_names, device, backbone=backbone)
    backbone = model.backbone
    check_prompt_length(backbone.tokenizer, named_benchmark.class_names, config)
    if state is not None:
        try:
            ckpt.load_model_state(model, state["model"])
        except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {state['path']} does not fit this model "
                f"({first_line(err, 160)}); resume with the config it was made "
                "with, or start again with --overwrite"
            ) from None
    made: List[Evaluation] = []

    def claim_folder() -> None:
        # Everything is checked: from here on the folder is this run's.
        lock.announce()
        remove_leftover_temp_files(output_dir)
        if state is None:
            # --overwrite, --resume of a run without checkpoint, or a start after an attempt
            # that failed before its first checkpoint: old logs would mix with the new run's.
            remove_run_files(output_dir, RUN_FILES if overwrite or resume else LOG_FILES)
        else:
            restore_logs(output_dir, state, log)
            ckpt.prune_checkpoints(checkpoints)
        write_text_atomic(config.to_json(), output_dir / "config.json")
        try:
            made.append(
                make_evaluator(
                    tensorboard_dir=output_dir / "tb",
                    text_log=output_dir / "log.txt",
                    csv_dir=output_dir / "csv",
                    interactive=interactive,
                    wandb_run=output_dir.name if wandb else None,
                    wandb_dir=output_dir,
                    wandb_config=config.to_dict(),
                    append=state is not None,
                )
            )
        except EvaluatorError as err:
            raise RunError(str(err)) from None

    # files and loggers on rank 0; the other ranks measure the same metrics, log nothing
    distributed.on_main(claim_folder)
    evaluation = made[0] if made else make_evaluator()
    evaluator, tb_logger = evaluation.plugin, evaluation.tensorboard
    try:
        checks = [FiniteScoresCheck(), ConfusionMatrixPlugin(len(named_benchmark.class_names))]
        strategy = CLIPHingeStrategy(
            config=config,
            class_names=named_benchmark.class_names,
            model=model,
            plugins=[*plugins, *checks],
            evaluator=evaluator,
            device=device,
            progress=interactive,
        )
        run = RunState(created=now_iso(), git_commit=git_commit())
        start = 0
        if state is not None:
            ckpt.set_clock_state(strategy.clock, state["clock"])
            ckpt.set_evaluator_state(evaluator, state["evaluator"])
            ckpt.set_rng_state(state["rng"])
            strategy.current_task = model.n_tasks - 1
            run = RunState(**state["run"])
            start = state["completed"]
            message = (
                f"resuming from {Path(state['path']).name}: after experience "
                f"{start - 1} ({start} of {n_exps} done)"
            )

            def announce() -> None:
                log(message)
                print(f"=== {message} ===", file=evaluation.files[0])
                kill_point("resume_loggers", start)

            distributed.on_main(announce)
        _train_and_record(
            strategy,
            named_benchmark,
            output_dir,
            run,
            start,
            config,
            fingerprint,
            backbone,
            protocol,
            device,
            tb_logger,
            evaluator,
            log,
        )
    finally:
        evaluation.close()
    return distributed.on_main(lambda: json.loads((output_dir / "results.json").read_text()))


def _train_and_record(
    strategy,
    named_benchmark,
    output_dir: Path,
    run: RunState,
    start: int,
    config: CLIPHingeConfig,
    fingerprint: Dict[str, Any],
    backbone,
    protocol: Optional[Dict[str, Any]],
    device: str,
    tb_logger,
    evaluator,
    log: Callable[[str], None],
) -> None:
    """Train and evaluate each experience from ``start`` on (``loop.train_and_evaluate``) and
    record it: ``run`` updated, then results, plots, TensorBoard points and a checkpoint
    written; after the last experience the final model, the HParams and the finished
    results."""
    n_exps = len(named_benchmark.benchmark.train_stream)
    test_sizes = fingerprint["test_sizes"]
    full_protocol = {
        "model": config.model_name,
        "pretrained": backbone.pretrained,
        "weights_sha256": backbone.weights_sha256,
        "activation": backbone.activation,
        "class_order": named_benchmark.class_order,
        **(protocol or {}),
        "created": run.created,
        "git_commit": run.git_commit,
        **(resumed_code(run) if start else {}),
        **{f"stream_{k}": v for k, v in named_benchmark.protocol.items()},
        "seed": config.seed,
        "device": device_name(device),
        **({"processes": distributed.world_size()} if distributed.world_size() > 1 else {}),
        "versions": package_versions(),
        "config": config.to_dict(),
    }
    hinge = next((p for p in strategy.plugins if isinstance(p, HardPairHingePlugin)), None)
    wandb_logger = next((x for x in evaluator.loggers if isinstance(x, WandBLogger)), None)
    confusion = next(p for p in strategy.plugins if isinstance(p, ConfusionMatrixPlugin))
    model = strategy.model
    names = named_benchmark.class_names
    for task in train_and_evaluate(
        strategy,
        named_benchmark.benchmark.train_stream,
        named_benchmark.benchmark.test_stream,
        start,
    ):
        index = task.index
        run.train_seconds += task.train_seconds
        run.wall_seconds += task.seconds
        run.matrix.append(task.trained_row)
        run.per_task.append(grouped_accuracy(task.row, test_sizes, index))
        run.stream_forgetting.append(task.stream_forgetting)
        run.seen_stream_accuracy.append(metric_value(task.metrics, SEEN_ACCURACY))
        run.hard_pairs.append(
            {
                kind: [named_pair(pair, names) for pair in pairs]
                for kind, pairs in hard_pairs_of(hinge).items()
            }
        )
        if index == n_exps - 1:  # the confusion matrix once every task is trained
            run.confusion = confusion.matrix(named_benchmark.class_order).tolist()

        def write_experience(index: int = index) -> None:
            # results, plots, TensorBoard, checkpoint, and only then "finished": a kill at
            # any point between redoes this experience on --resume, and the redone
            # experience cuts the logs back to the previous checkpoint.
            run_lock.check(output_dir)  # a .lock deleted by hand is written again
            summary = _write_results(output_dir, run, test_sizes, full_protocol, n_exps, False)
            kill_point("results", index)
            figures = write_plots(
                output_dir,
                run,
                protocol=full_protocol,
                confusion=None if run.confusion is None else np.asarray(run.confusion),
                class_names=[names[c] for c in named_benchmark.class_order],
                final=index == n_exps - 1,
            )
            kill_point("plots", index)
            log_results(tb_logger, figures, summary["metrics"], run, strategy.clock, wandb_logger)
            kill_point("tensorboard", index)
            ckpt.save_checkpoint(
                {
                    "completed": index + 1,
                    "config": config.to_dict(),
                    "stream": fingerprint,
                    "model": ckpt.model_state(model),
                    "clock": ckpt.clock_state(strategy.clock),
                    "evaluator": ckpt.evaluator_state(evaluator),
                    "rng": ckpt.rng_state(),
                    "run": dict(run.__dict__),
                    "csv_rows": csv_row_counts(output_dir),
                    "tb_files": tensorboard_sizes(output_dir, tb_logger),
                },
                output_dir / "checkpoints",
            )
            log(
                f"task {index}: accuracy on seen classes {run.per_task[-1]['all']:.2f}% "
                f"(AIA so far {summary['metrics']['AIA']:.2f}%)"
            )

        # files on rank 0 (torchrun); a failure there stops every rank alike
        distributed.on_main(write_experience)
    strategy.release_graphs()  # the captured steps' graphs and buffers (compile_step)
    if len(run.matrix) == n_exps:

        def finish() -> None:
            # Also when resumed from the last checkpoint: its plots and TensorBoard points
            # were written before it, only the "finished" results may be missing.
            strategy.model.save(output_dir / "final_model.pt", config)
            log_hparams(
                tb_logger.writer,
                config,
                cil_metrics(run.matrix, test_sizes),
                strategy.clock.train_iterations,
            )
            _write_results(output_dir, run, test_sizes, full_protocol, n_exps, True)

        distributed.on_main(finish)


def resumed_code(run: RunState) -> Dict[str, Any]:
    """``{"git_commit_resumed": git_commit()}`` when this process's code differs from the code
    that began the run (a resume after a commit or an edit), else ``{}``."""
    if run.created is None and run.git_commit is None:
        return {}  # a checkpoint of an older version: its code was not recorded
    now = git_commit()
    return {} if now == run.git_commit else {"git_commit_resumed": now}


def _quiet(message: str) -> None:
    """The ``log`` of ranks other than 0 under torchrun: says nothing."""


def _write_results(
    output_dir: Path,
    run: RunState,
    sizes: Sequence[int],
    protocol: Dict[str, Any],
    n_exps: int,
    finished: bool,
) -> Dict[str, Any]:
    """results.json and results.txt (atomic); ``finished`` only once everything else of the
    last experience is written."""
    metrics = cil_metrics(run.matrix, sizes)
    summary = {
        "finished": finished,
        "completed_tasks": len(run.matrix),
        "metrics": metrics,
        "avalanche_stream_forgetting": run.stream_forgetting[-1],
        "per_task": run.per_task,
        "accuracy_matrix": run.matrix,
        "test_sizes": list(sizes),
        "hard_pairs": run.hard_pairs,
        "seen_stream_accuracy": run.seen_stream_accuracy,
        "confusion_matrix": run.confusion,
        "train_seconds": run.train_seconds,
        "wall_seconds": run.wall_seconds,
        "protocol": protocol,
    }
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"metric {name} is {value}: the accuracy matrix holds "
                f"non-finite values {run.matrix}"
            )
    write_text_atomic(json.dumps(summary, indent=2) + "\n", output_dir / "results.json")
    write_text_atomic(format_report(summary), output_dir / "results.txt")
    return summary
