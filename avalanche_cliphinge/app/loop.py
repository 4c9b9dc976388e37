"""The one run loop: train on an experience, evaluate the whole test stream, read the
accuracy row. The runner, the comparison and the speed benchmark all go through it.

An upper bound (a strategy whose class has ``upper_bound = True``, such as
``baselines.JointTraining``) is trained once, on the whole training stream, and evaluated once:
one ``TaskResult``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

#: Avalanche's metric names the loop reads.
EXP_ACCURACY = "Top1_Acc_Exp/eval_phase/test_stream"
STREAM_FORGETTING = "StreamForgetting/eval_phase/test_stream"
SEEN_ACCURACY = "Top1_Acc_Stream_SeenClasses/eval_phase/test_stream"


class MissingMetricError(RuntimeError):
    """The evaluator reported no accuracy for a test experience."""


@dataclass
class TaskResult:
    """What training on one experience and evaluating the test stream gave.

    Attributes:
        index: the experience trained (0-based).
        row: ``[n_test_experiences]`` accuracy on each test experience (percent), Avalanche's
            ``Top1_Acc_Exp``; experiences of tasks not trained yet are there too (the caller
            decides how to report them).
        stream_forgetting: Avalanche's ``StreamForgetting`` (percent), ``None`` before any.
        train_seconds: wall time inside ``strategy.train``.
        seconds: wall time of training and evaluation.
        metrics: every value the evaluator reported last (``strategy.eval``'s result).
        upper_bound: trained once on every experience (``index`` is then the last one).
    """

    index: int
    row: List[float]
    stream_forgetting: Optional[float]
    train_seconds: float
    seconds: float
    metrics: Dict[str, float]
    upper_bound: bool = False

    @property
    def trained_row(self) -> List[Optional[float]]:
        """``row`` with ``None`` for the experiences of tasks not trained yet (``j > index``):
        their 0 is not a measurement of the method. What the reports store."""
        return [a if j <= self.index else None for j, a in enumerate(self.row)]


def metric_value(
    results: Dict[str, float], prefix: str, experience: Optional[int] = None
) -> Optional[float]:
    """The first value whose name starts with ``prefix`` (and ends with ``/Exp<experience>``
    when given); ``None`` when there is none."""
    for key, value in results.items():
        if key.startswith(prefix) and (experience is None or key.endswith(f"/Exp{experience:03d}")):
            return float(value)
    return None


def accuracy_row(results: Dict[str, float], n_exps: int) -> List[float]:
    """``Top1_Acc_Exp`` of every test experience (percent) from Avalanche's last metrics.

    Raises:
        MissingMetricError: an experience has no accuracy (the evaluator lacks
            ``accuracy_metrics(experience=True)``, or the stream was not evaluated whole).
    """
    row = []
    for j in range(n_exps):
        value = metric_value(results, EXP_ACCURACY, j)
        if value is None:
            raise MissingMetricError(
                f"the evaluator reported no {EXP_ACCURACY}/.../Exp{j:03d}; give the strategy "
                "an evaluator with accuracy_metrics(experience=True) and evaluate the whole "
                "test stream"
            )
        row.append(100.0 * value)
    return row


def is_upper_bound(strategy) -> bool:
    """Whether ``strategy`` trains once on the whole stream (its class's ``upper_bound``)."""
    return bool(getattr(type(strategy), "upper_bound", False))


def train_and_evaluate(
    strategy, train_stream: Sequence, test_stream: Sequence, start: int = 0
) -> Iterator[TaskResult]:
    """Train ``strategy`` on ``train_stream[start:]`` one experience at a time and evaluate
    ``test_stream`` after each; yields one ``TaskResult`` per experience, after its
    evaluation (the caller writes results and checkpoints before the next one starts).

    An upper bound (``is_upper_bound``) gets the whole ``train_stream`` in one ``train`` call
    and yields one ``TaskResult`` (``index`` = the last experience, ``upper_bound`` true,
    ``stream_forgetting`` ``None``: one evaluation has nothing to forget).

    Raises:
        ValueError: ``start > 0`` for an upper bound (it cannot resume part way).
    """
    n_exps = len(test_stream)
    if is_upper_bound(strategy):
        if start:
            raise ValueError(
                f"{type(strategy).__name__} trains once on the whole stream; "
                f"it cannot start at experience {start}"
            )
        began = time.perf_counter()
        strategy.train(train_stream, eval_streams=[])
        trained = time.perf_counter()
        results = strategy.eval(test_stream)
        yield TaskResult(
            index=len(train_stream) - 1,
            row=accuracy_row(results, n_exps),
            stream_forgetting=None,
            train_seconds=trained - began,
            seconds=time.perf_counter() - began,
            metrics=dict(results),
            upper_bound=True,
        )
        return
    for index in range(start, len(train_stream)):
        began = time.perf_counter()
        strategy.train(train_stream[index], eval_streams=[])
        trained = time.perf_counter()
        results = strategy.eval(test_stream)
        forgetting = metric_value(results, STREAM_FORGETTING)
        yield TaskResult(
            index=index,
            row=accuracy_row(results, n_exps),
            stream_forgetting=None if forgetting is None else 100.0 * forgetting,
            train_seconds=trained - began,
            seconds=time.perf_counter() - began,
            metrics=dict(results),
        )
