"""The one evaluator of the application: the runner, the comparison and the speed benchmark
all measure with ``make_evaluator``."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from avalanche.evaluation.metrics import (accuracy_metrics, bwt_metrics, forgetting_metrics,
                                          loss_metrics, timing_metrics)
from avalanche.logging import (BaseLogger, CSVLogger, InteractiveLogger, TensorboardLogger,
                               TextLogger)
from avalanche.training.plugins import EvaluationPlugin

from ..metrics import (DeviceEpochAccuracy, DeviceEpochLoss, DeviceEpochLossTerm,
                       EpochLearningRate, SeenClassesStreamAccuracy, Stage2EpochLoss)

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
    """

    plugin: EvaluationPlugin
    tensorboard: Optional[TensorboardLogger] = None
    files: List[Any] = field(default_factory=list)

    def close(self) -> None:
        """Flush TensorBoard and close the CSV and text files (the plugin stays usable for
        reading its last metrics)."""
        if self.tensorboard is not None:
            self.tensorboard.writer.flush()
        for logger in self.plugin.loggers:
            if isinstance(logger, CSVLogger):
                logger.close()
        for file in self.files:
            if file not in (sys.stdout, sys.stderr) and not file.closed:
                file.close()


def make_metrics() -> list:
    """The metrics every run, entry and benchmark measures.

    Accuracy, loss, forgetting and BWT per experience and stream, timing; the training epoch's
    accuracy and loss kept on the device (``DeviceEpochAccuracy``, ``DeviceEpochLoss``:
    Avalanche's names and values without a host sync per step); per epoch the loss terms
    (``Loss_Epoch_<term>``), the learning rate (``LR_Epoch``) and stage 2's loss
    (``Loss_Stage2_Epoch``); the accuracy over the classes trained so far
    (``Top1_Acc_Stream_SeenClasses``) beside Avalanche's ``Top1_Acc_Stream``, which also counts
    the classes not trained yet. New metrics go at the end: checkpoints restore the forgetting
    metrics' memory by position.
    """
    return [DeviceEpochAccuracy(), accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            DeviceEpochLoss(), loss_metrics(experience=True, stream=True),
            timing_metrics(epoch=True, experience=True),
            *[DeviceEpochLossTerm(term) for term in LOSS_TERMS], EpochLearningRate(),
            Stage2EpochLoss(), SeenClassesStreamAccuracy()]


def make_evaluator(*, tensorboard_dir: Optional[Path] = None, text_log: Optional[Path] = None,
                   csv_dir: Optional[Path] = None, interactive: bool = False,
                   wandb_run: Optional[str] = None, wandb_dir: Optional[Path] = None,
                   append: bool = False) -> Evaluation:
    """Avalanche ``EvaluationPlugin`` with ``make_metrics()`` and the loggers asked for.

    Args:
        tensorboard_dir: ``TensorboardLogger`` folder (none when ``None``).
        text_log: ``TextLogger`` file, opened for appending and line-buffered (a killed run
            keeps every line written).
        csv_dir: ``CSVLogger`` folder.
        interactive: ``InteractiveLogger`` (progress bars).
        wandb_run: also log to Weights & Biases under this run name (in ``wandb_dir``).
        append: the CSV files are continued, never truncated (a resumed run: the caller has
            already cut them back to its checkpoint).

    Raises:
        EvaluatorError: W&B asked for without the ``wandb`` package.
    """
    loggers: List[Any] = [InteractiveLogger()] if interactive else []
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
    if wandb_run is not None:
        try:
            import wandb as _  # noqa: F401
        except ImportError:
            raise EvaluatorError("--wandb needs the wandb package: pip install wandb") from None
        from avalanche.logging import WandBLogger
        loggers.append(WandBLogger(project_name="avalanche-cliphinge", run_name=wandb_run,
                                   dir=str(wandb_dir or ".")))
    return Evaluation(EvaluationPlugin(*make_metrics(), loggers=loggers), tb_logger, files)


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
