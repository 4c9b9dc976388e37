"""The run's progress on standard output, drawn at epoch and experience boundaries only.

``cliphinge run`` shows a bar per training experience advanced at each epoch's end (its
postfix: the epoch's loss and accuracy) and a bar per evaluation advanced at each test
experience's end (its postfix: that experience's accuracy); by default also the metric
lines of Avalanche's ``TextLogger`` after each epoch and evaluation. No callback of a step
(``after_training_iteration``, ``after_eval_iteration``): Avalanche's ``InteractiveLogger``
redraws its bar after every step, which costs Python work per step and keeps the evaluator
in the captured step's per-step callbacks (``runner_checks.plugin_needs``).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from avalanche.logging import TextLogger
from tqdm import tqdm

#: Metric name prefixes shown in the bars' postfix: ``{postfix key: prefix}``.
TRAIN_POSTFIX = {"loss": "Loss_Epoch/", "acc": "Top1_Acc_Epoch/"}
EVAL_POSTFIX = {"acc": "Top1_Acc_Exp/"}


class _Lines:
    """A text stream that keeps what is written to it until ``take``."""

    def __init__(self):
        self._parts: List[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        text, self._parts = "".join(self._parts), []
        return text


class _Discard:
    """A text stream that drops what is written to it."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class EpochProgress(TextLogger):
    """Progress bars fed per epoch and per evaluated experience, and optionally the metric
    lines, on standard output.

    Training: a bar per experience, ``stage 1, task <k>``, over its epochs, advanced at each
    epoch's end with the epoch's loss and accuracy (``Loss_Epoch``, ``Top1_Acc_Epoch``).
    Evaluation: a bar over the evaluated stream's experiences, advanced at each one's end
    with its accuracy (``Top1_Acc_Exp``; ``-`` for an experience not trained yet). Bars are
    cleared when they end with ``metric_lines=False`` and kept otherwise.

    Args:
        metric_lines: also print Avalanche's ``TextLogger`` lines (phase starts and ends,
            ``Epoch N ended.`` and each metric's value after each epoch and evaluated
            experience), above the bars. ``False``: the bars only (``--progress-only``;
            the run's ``log.txt`` keeps the lines).
    """

    def __init__(self, metric_lines: bool = True):
        super().__init__(file=_Lines() if metric_lines else _Discard())
        self.leave = metric_lines
        self._bar: Optional[tqdm] = None

    # ---- training ---------------------------------------------------------------------------
    def before_training_exp(self, strategy, metric_values, **kwargs):
        self._lines(TextLogger.before_training_exp, strategy, metric_values, **kwargs)
        epochs = getattr(strategy, "train_epochs", None)
        if epochs:
            self._open(f"stage 1, task {_experience(strategy)}", epochs, "epoch")

    def after_training_epoch(self, strategy, metric_values, **kwargs):
        postfix = self._postfix(TRAIN_POSTFIX)  # before the lines are printed and cleared
        self._lines(TextLogger.after_training_epoch, strategy, metric_values, **kwargs)
        self._advance(postfix)

    def after_training_exp(self, strategy, metric_values, **kwargs):
        self._close()
        self._lines(TextLogger.after_training_exp, strategy, metric_values, **kwargs)

    # ---- evaluation -------------------------------------------------------------------------
    def before_eval(self, strategy, metric_values, **kwargs):
        self._lines(TextLogger.before_eval, strategy, metric_values, **kwargs)
        try:
            total = len(strategy.current_eval_stream)
        except TypeError:  # an iterable without a length: the bar counts up
            total = None
        self._open("evaluation", total, "exp")

    def after_eval_exp(self, strategy, metric_values, **kwargs):
        postfix = self._postfix(EVAL_POSTFIX)
        trained = getattr(getattr(strategy, "clock", None), "train_exp_counter", None)
        if trained is not None and not _experience(strategy) < trained:
            postfix = {key: "-" for key in postfix}  # its classes are not trained yet: no 0%
        self._lines(TextLogger.after_eval_exp, strategy, metric_values, **kwargs)
        self._advance(postfix)

    def after_eval(self, strategy, metric_values, **kwargs):
        self._close()
        self._lines(TextLogger.after_eval, strategy, metric_values, **kwargs)

    def before_training(self, strategy, metric_values, **kwargs):
        self._lines(TextLogger.before_training, strategy, metric_values, **kwargs)

    def after_training(self, strategy, metric_values, **kwargs):
        self._lines(TextLogger.after_training, strategy, metric_values, **kwargs)

    def before_eval_exp(self, strategy, metric_values, **kwargs):
        self._lines(TextLogger.before_eval_exp, strategy, metric_values, **kwargs)

    # ---- output -----------------------------------------------------------------------------
    def _lines(self, callback, strategy, metric_values, **kwargs) -> None:
        """``TextLogger``'s ``callback``, its lines printed above the bars in one redraw."""
        callback(self, strategy, metric_values, **kwargs)
        if isinstance(self.file, _Lines):
            text = self.file.take()
            if text:
                tqdm.write(text.rstrip("\n"), file=sys.stdout)

    def _open(self, desc: str, total: Optional[int], unit: str) -> None:
        self._close()
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            leave=self.leave,
            file=sys.stdout,
            position=0,
            mininterval=0,
        )

    def _advance(self, postfix: Dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)  # drawn at once: mininterval=0

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _postfix(self, prefixes: Dict[str, str]) -> Dict[str, str]:
        """The last value of each metric named by ``prefixes``, formatted for the bar."""
        shown = {}
        for key, prefix in prefixes.items():
            for name, (_, _, value) in self.metric_vals.items():
                if name.startswith(prefix):
                    shown[key] = _format(key, value)
                    break
        return shown


def _experience(strategy) -> int:
    """The index of the strategy's current experience (-1 without one)."""
    return getattr(getattr(strategy, "experience", None), "current_experience", -1)


def _format(key: str, value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{100 * number:.1f}%" if key == "acc" else f"{number:.4f}"
