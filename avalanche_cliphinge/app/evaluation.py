"""The one evaluator of the application: the runner, the comparison and the speed benchmark
all measure with ``make_evaluator``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    loss_metrics,
    timing_metrics,
)
from avalanche.logging import BaseLogger, CSVLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from ..runner_checks import overrides
from ..errors import first_line
from ..metrics import (
    DeviceEpochAccuracy,
    DeviceEpochLoss,
    DeviceEpochLossTerm,
    EpochLearningRate,
    SeenClassesStreamAccuracy,
    Stage2EpochLoss,
    StepFreeEpochTime,
    metric_needs,
)
from .progress import EpochProgress

#: The loss terms of a stage-1 step logged per epoch (``Loss_Epoch_<term>``).
LOSS_TERMS = ("cross_entropy", "text_hinge", "image_hinge")


class EvaluatorError(RuntimeError):
    """An optional logger was asked for but cannot be made."""


@dataclass
class Evaluation:
    """An ``EvaluationPlugin`` and the loggers the caller needs to reach.

    Attributes:
        plugin: pass it as the strategy's ``evaluator``.
        tensorboard: its ``TensorboardLogger`` (``None`` without a TensorBoard folder).
        files: open log files, closed by ``close``.
        wandb: its ``wandb_logger.WandBLogger`` (``None`` without W&B).
    """

    plugin: EvaluationPlugin
    tensorboard: Optional[TensorboardLogger] = None
    files: List[Any] = field(default_factory=list)
    wandb: Optional[Any] = None

    def close(self) -> None:
        """Close TensorBoard's writer (every event written), finish the W&B run and close the
        CSV and text files: nothing is left for the interpreter's exit to write (the plugin
        stays usable for reading its last metrics)."""
        if self.tensorboard is not None:
            self.tensorboard.writer.close()
        for logger in self.plugin.loggers:
            if isinstance(logger, CSVLogger):
                logger.close()
        for file in self.files:
            if file not in (sys.stdout, sys.stderr) and not file.closed:
                file.close()
        if self.wandb is not None:
            self.wandb.finish()


class LeanEvaluationPlugin(EvaluationPlugin):
    """Avalanche's ``EvaluationPlugin`` without the per-step work its metrics do not need.

    Avalanche's version hands every callback to every metric and logger and wraps the
    experience in a logging view (``experience.logging()``, a copy) each time, whether or not
    anything listens: about 650 Python calls per training step with ``make_metrics``. This
    one hands each callback only to the metrics that do something in it
    (``metrics.metric_needs``) and the loggers that implement it, from a table made once per
    callback; a callback of a step that none of them needs costs one lookup. The logging
    view is made once per experience. Metric values, names and logging are Avalanche's.
    """

    def __init__(self, *metrics, **kwargs):
        super().__init__(*metrics, **kwargs)
        self._tables: Dict[Tuple[str, bool], Tuple[list, list]] = {}
        self._view: Tuple[Any, Any] = (None, None)

    def _update_metrics_and_loggers(self, strategy, callback: str):
        if not self._active:
            return []
        sums_kept = getattr(strategy, "epoch_record", None) is not None
        table = self._tables.get((callback, sums_kept))
        if table is None:
            table = self._tables[callback, sums_kept] = (
                [m for m in self.metrics if metric_needs(m, callback, sums_kept)],
                [logger for logger in self.loggers if overrides(logger, callback)],
            )
        metrics, loggers = table
        if not metrics and not loggers and not self._metric_values:
            return []
        experience = strategy.experience
        if experience is not None:
            # the strategy's view of an experience as CLIP's input shares its logging view
            source = getattr(experience, "source_experience", experience)
            if self._view[0] is not source:
                self._view = (source, source.logging())
            strategy.experience = self._view[1]
        try:
            for metric in metrics:
                results = getattr(metric, callback)(strategy)
                for value in (
                    results
                    if isinstance(results, Sequence)
                    else []
                    if results is None
                    else [results]
                ):
                    self.publish_metric_value(value)
            values, self._metric_values = self._metric_values, []
            for logger in self.loggers:
                logger.log_metrics(values)
            for logger in loggers:
                getattr(logger, callback)(strategy, values)
        finally:
            strategy.experience = experience
        return []


def make_metrics() -> list:
    """The metrics every run, entry and benchmark measures.

    Accuracy, loss, forgetting and BWT per experience and stream, timing (the epoch's from
    its start and end, ``StepFreeEpochTime``, not after every step); the training epoch's
    accuracy and loss kept on the device (``DeviceEpochAccuracy``, ``DeviceEpochLoss``:
    Avalanche's names and values without a host sync per step); per epoch the loss terms
    (``Loss_Epoch_<term>``), the learning rate (``LR_Epoch``) and stage 2's loss
    (``Loss_Stage2_Epoch``); the accuracy over the classes trained so far
    (``Top1_Acc_Stream_SeenClasses``) beside Avalanche's ``Top1_Acc_Stream``, which also counts
    the classes not trained yet. New metrics go at the end: checkpoints restore the forgetting
    metrics' memory by position.
    """
    return [
        DeviceEpochAccuracy(),
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        DeviceEpochLoss(),
        loss_metrics(experience=True, stream=True),
        StepFreeEpochTime(),
        timing_metrics(experience=True),
        *[DeviceEpochLossTerm(term) for term in LOSS_TERMS],
        EpochLearningRate(),
        Stage2EpochLoss(),
        SeenClassesStreamAccuracy(),
    ]


def make_evaluator(
    *,
    tensorboard_dir: Optional[Path] = None,
    text_log: Optional[Path] = None,
    csv_dir: Optional[Path] = None,
    interactive: bool | str = False,
    wandb_run: Optional[str] = None,
    wandb_dir: Optional[Path] = None,
    wandb_config: Optional[Dict[str, Any]] = None,
    append: bool = False,
) -> Evaluation:
    """A ``LeanEvaluationPlugin`` with ``make_metrics()`` and the loggers asked for.

    Args:
        tensorboard_dir: ``TensorboardLogger`` folder (none when ``None``).
        text_log: ``TextLogger`` file, opened for appending and line-buffered (a killed run
            keeps every line written).
        csv_dir: ``CSVLogger`` folder.
        interactive: ``progress.EpochProgress`` (progress bars fed per epoch and per
            evaluated experience, and every metric after each epoch and evaluation);
            ``"progress"``: its bars only. Neither has a callback per step.
        wandb_run: also log to Weights & Biases under this run name (in ``wandb_dir``), with
            ``wandb_config`` as the run's config.
        append: the CSV files are continued, never truncated (a resumed run: the caller has
            already cut them back to its checkpoint), and W&B continues the run it last
            started in ``wandb_dir`` (its id, ``resume="allow"``; a new run if it has none).

    Raises:
        EvaluatorError: W&B asked for without a working ``wandb`` package, or W&B could not
            start its run (its message in one line).
    """
    # W&B first: when it cannot start, no file is open yet
    wandb_logger = (
        None if wandb_run is None else _wandb_logger(wandb_run, wandb_dir, wandb_config, append)
    )
    loggers: List[Any] = []
    if interactive:
        loggers.append(EpochProgress(metric_lines=interactive != "progress"))
    files: List[Any] = []
    tb_logger = None
    if text_log is not None:
        Path(text_log).parent.mkdir(parents=True, exist_ok=True)
        files.append(open(text_log, "a", buffering=1))
        loggers.append(TextLogger(files[-1]))
    if csv_dir is not None:
        loggers.append(_csv_logger(Path(csv_dir), append))
    if tensorboard_dir is not None:
        tb_logger = TensorboardLogger(tb_log_dir=str(tensorboard_dir))
        loggers.append(tb_logger)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return Evaluation(
        LeanEvaluationPlugin(*make_metrics(), loggers=loggers), tb_logger, files, wandb_logger
    )


def require_wandb() -> None:
    """Refuse (``EvaluatorError``) W&B logging without a ``wandb`` package that imports."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise EvaluatorError("--wandb needs the wandb package: pip install wandb") from None
    except Exception as err:  # a broken install fails in many ways; say which
        raise EvaluatorError(
            f"--wandb: the wandb package fails to import ({_first_line(err)}); reinstall it "
            "(pip install --force-reinstall wandb) or run without --wandb"
        ) from None


def _wandb_logger(
    run_name: str, folder: Optional[Path], config: Optional[Dict[str, Any]], resume: bool = False
):
    """The package's ``WandBLogger`` (project ``avalanche-cliphinge``) or ``EvaluatorError``;
    with ``resume``, continuing the W&B run last started in ``folder``."""
    require_wandb()
    from ..wandb_logger import WandBLogger, last_run_id

    run_id = last_run_id(Path(folder or ".")) if resume else None
    try:
        return WandBLogger(
            project_name="avalanche-cliphinge",
            run_name=run_name,
            dir=str(folder or "."),
            config=config,
            params=None if run_id is None else {"id": run_id, "resume": "allow"},
        )
    except Exception as err:  # login, network, a wandb without the API this logger uses
        raise EvaluatorError(
            f"--wandb: W&B could not start the run ({_first_line(err)}); for a run without "
            "an account set WANDB_MODE=offline, or run without --wandb"
        ) from None


def _first_line(err: BaseException) -> str:
    text = first_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _csv_logger(csv_dir: Path, append: bool) -> CSVLogger:
    """Avalanche's ``CSVLogger``; with ``append``, one that continues the existing files.

    ``CSVLogger`` opens its files with mode ``"w"``: a resume killed right after it would
    lose every kept row. The appending logger sets the same attributes over handles opened
    with ``"a"`` (the headers are already there).
    """
    if not append:
        return CSVLogger(log_folder=str(csv_dir))
    logger = CSVLogger.__new__(CSVLogger)
    BaseLogger.__init__(logger)
    csv_dir.mkdir(parents=True, exist_ok=True)
    logger.log_folder = str(csv_dir)
    logger.training_file = open(csv_dir / "training_results.csv", "a")
    logger.eval_file = open(csv_dir / "eval_results.csv", "a")
    logger.training_exp_id = None
    logger.in_train_phase = None
    logger.val_acc, logger.val_loss = 0, 0
    return logger
