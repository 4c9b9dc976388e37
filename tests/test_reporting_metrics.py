"""The package's Avalanche metrics and the one run loop, with Avalanche's Naive as yardstick."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avalanche.training import Naive
from torch import nn

from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.app.loop import (
    SEEN_ACCURACY,
    MissingMetricError,
    accuracy_row,
    train_and_evaluate,
)

TRAIN = "train_phase/train_stream/Task000"
#: make_evaluator() without loggers: Avalanche warns that nothing is logged
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


@pytest.fixture(scope="module")
def naive_run(synthetic_stream, synthetic_data):
    """Naive (a linear head on raw pixels, SGD) over the 3-experience synthetic stream, with
    the package's evaluator; returns the strategy, its TaskResults and the model after each
    task."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(synthetic_data["test_x"][0].numel(), 6))
    evaluation = make_evaluator()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=2,
        eval_mb_size=32,
        evaluator=evaluation.plugin,
    )
    results, predictions = [], []
    for task in train_and_evaluate(
        strategy, synthetic_stream.train_stream, synthetic_stream.test_stream
    ):
        results.append(task)
        with torch.no_grad():
            predictions.append(model(synthetic_data["test_x"]).argmax(1).numpy())
    return strategy, results, predictions


def test_seen_classes_accuracy_counts_only_the_trained_classes(naive_run, synthetic_data):
    _, results, predictions = naive_run
    labels = synthetic_data["test_y"].numpy()
    for t, (task, pred) in enumerate(zip(results, predictions)):
        seen = labels < 2 * (t + 1)  # experience k holds classes 2k and 2k + 1
        expected = float(np.mean(pred[seen] == labels[seen]))
        assert task.metrics[SEEN_ACCURACY + "/Task000"] == pytest.approx(expected, abs=1e-9)
        whole = float(np.mean(pred == labels))
        assert task.metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"] == pytest.approx(
            whole, abs=1e-9
        )


def test_the_loop_reads_avalanches_row_and_times(naive_run, synthetic_data):
    _, results, predictions = naive_run
    labels = synthetic_data["test_y"].numpy()
    for task, pred in zip(results, predictions):
        expected = [
            100 * float(np.mean(pred[labels // 2 == j] == labels[labels // 2 == j]))
            for j in range(3)
        ]
        assert task.row == pytest.approx(expected, abs=1e-9)
        assert 0 < task.train_seconds <= task.seconds
    assert [task.index for task in results] == [0, 1, 2]


def test_learning_rate_and_loss_terms_are_per_epoch_and_absent_terms_emit_nothing(naive_run):
    strategy, _, _ = naive_run
    history = strategy.evaluator.get_all_metrics()
    lr = history[f"LR_Epoch/{TRAIN}"]
    assert lr[1] == [0.05] * 6  # 3 experiences x 2 epochs
    assert len(history[f"Loss_Epoch/{TRAIN}"][1]) == 6
    # Naive writes no loss terms into a step state: no Loss_Epoch_<term> at all, not zeros
    assert not [k for k in history if k.startswith("Loss_Epoch_")]
    assert not [k for k in history if k.startswith("Loss_Stage2_Epoch")]


def test_a_missing_experience_accuracy_is_an_error_that_says_what_to_add():
    with pytest.raises(
        MissingMetricError,
        match=r"no Top1_Acc_Exp/eval_phase/test_stream/"
        r"\.\.\./Exp001; give the strategy an "
        r"evaluator with accuracy_metrics",
    ):
        accuracy_row({"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.5}, 2)
    assert accuracy_row({"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.25}, 1) == [25.0]
