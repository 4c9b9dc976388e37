"""Class-incremental metrics against a 3x3 accuracy matrix worked out by hand.

Tasks have unequal test sets (10, 20 and 30 samples), so the accuracy over the seen classes
is the size-weighted mean of the per-task accuracies, not their plain mean.
"""

import json

import numpy as np
import pytest
from PIL import Image

from avalanche_cliphinge.app.results import cil_metrics, format_results, grouped_accuracy

SIZES = [10, 20, 30]
# acc[t][j] (percent): after training task t, on the test classes of task j.
MATRIX = [
    [90.0, 0.0, 0.0],
    [95.0, 80.0, 0.0],
    [60.0, 50.0, 90.0],
]


def test_grouped_accuracy_after_each_task_is_size_weighted():
    # After task 0 only task 0 is seen: all = old-less = 90.
    assert grouped_accuracy(MATRIX[0], SIZES, 0) == {
        "all": 90.0,
        "tasks": [90.0],
        "old": None,
        "new": 90.0,
    }
    # After task 1: all = (95*10 + 80*20) / (10+20) = (950 + 1600) / 30 = 85
    # (the plain mean (95 + 80) / 2 = 87.5 would be wrong); old = task 0 = 95; new = 80.
    g1 = grouped_accuracy(MATRIX[1], SIZES, 1)
    assert g1["all"] == pytest.approx(85.0)
    assert g1["old"] == pytest.approx(95.0)
    assert g1["new"] == 80.0
    assert g1["tasks"] == [95.0, 80.0]
    # After task 2: all = (60*10 + 50*20 + 90*30) / 60 = (600 + 1000 + 2700) / 60 = 4300 / 60
    # = 71.666...; old = (600 + 1000) / 30 = 53.333...; new = 90.
    g2 = grouped_accuracy(MATRIX[2], SIZES, 2)
    assert g2["all"] == pytest.approx(4300 / 60)
    assert g2["old"] == pytest.approx(1600 / 30)
    assert g2["new"] == 90.0
    assert g2["tasks"] == [60.0, 50.0, 90.0]


def test_cil_metrics_of_the_full_matrix():
    m = cil_metrics(MATRIX, SIZES)
    # AIA = mean of A_t = (90 + 85 + 71.666...) / 3 = (270/3 + 255/3 + 215/3) / 3 = 740 / 9.
    assert m["AIA"] == pytest.approx(740 / 9)
    # AA = plain mean over tasks of the last row = (60 + 50 + 90) / 3 = 200 / 3.
    assert m["AA"] == pytest.approx(200 / 3)
    # Last = A_2 = 4300 / 60.
    assert m["Last"] == pytest.approx(4300 / 60)
    # Forgetting = mean over j < 2 of (best acc on task j before the last task - last acc):
    # task 0: max(90, 95) - 60 = 35; task 1: 80 - 50 = 30; mean = 32.5.
    assert m["Forgetting"] == pytest.approx(32.5)
    assert set(m) == {"AIA", "AA", "Last", "Forgetting"}


def test_cil_metrics_of_a_partial_run_can_show_negative_forgetting():
    # Two rows of three columns (a run stopped after task 1).
    m = cil_metrics(MATRIX[:2], SIZES)
    # AIA = (90 + 85) / 2; AA = (95 + 80) / 2; Last = A_1 = 85.
    assert m["AIA"] == pytest.approx(87.5)
    assert m["AA"] == pytest.approx(87.5)
    assert m["Last"] == pytest.approx(85.0)
    # Task 0 improved from 90 to 95: forgetting 90 - 95 = -5 (backward transfer).
    assert m["Forgetting"] == pytest.approx(-5.0)


def test_forgetting_ignores_evaluations_before_a_task_was_learned():
    # acc[0][1] = 85 is task 1 measured before it was trained (a class-incremental model
    # cannot score unseen classes, so real runs give 0 here). Forgetting of task 1 must be
    # 80 - 50 = 30 (only t >= 1 counts), not 85 - 50 = 35.
    matrix = [row[:] for row in MATRIX]
    matrix[0][1] = 85.0
    assert cil_metrics(matrix, SIZES)["Forgetting"] == pytest.approx((35 + 30) / 2)


def test_single_task_has_zero_forgetting():
    m = cil_metrics([[70.0]], [5])
    assert m == {"AIA": 70.0, "AA": 70.0, "Last": 70.0, "Forgetting": 0.0}


def test_report_lists_every_task_and_the_protocol_but_not_the_config():
    per_task = [grouped_accuracy(MATRIX[t], SIZES, t) for t in range(3)]
    text = format_results(
        per_task,
        cil_metrics(MATRIX, SIZES),
        12.5,
        {"model": "cliphinge-tiny", "seed": 3, "config": {"lr": 1}},
    )
    assert "task  2: all  71.67 | old  53.33 | new  90.00 |  60.00  50.00  90.00" in text
    assert "AIA (avg incremental acc) 82.22" in text
    assert "Avalanche StreamForgetting (first - last) 12.50" in text
    assert "model: cliphinge-tiny" in text and "seed: 3" in text
    assert "config" not in text
    json.dumps(per_task)  # results.json stores these as they are


@pytest.mark.slow
def test_a_runs_plots_are_written_as_png_and_pdf(tmp_path):
    from avalanche_cliphinge.app.run_folder import PLOT_FILES
    from avalanche_cliphinge.app.run_record import RunState
    from avalanche_cliphinge.app.run_reports import PREVIEW_DPI, write_plots as _write_plots

    run = RunState(
        matrix=MATRIX, per_task=[grouped_accuracy(MATRIX[t], SIZES, t) for t in range(3)]
    )
    protocol = {
        "stream_dataset": "cifar100",
        "stream_init_class": 2,
        "stream_increment": 2,
        "stream_classes_per_experience": [2, 2, 2],
        "preset": "demo",
    }
    # before the last task: PNG previews at PREVIEW_DPI, no PDF
    figures = _write_plots(tmp_path, run, protocol=protocol, final=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PLOT_FILES[:4:2])
    for name, (figure, pixels) in zip(PLOT_FILES[:4:2], figures.values()):
        with Image.open(tmp_path / name) as image:
            inches = figure.get_size_inches()
            assert image.size == tuple(round(v * PREVIEW_DPI) for v in inches)
            assert image.info["dpi"] == pytest.approx((PREVIEW_DPI, PREVIEW_DPI), abs=0.01)
            # the preview holds the pixels TensorBoard gets
            assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
    figures = _write_plots(tmp_path, run, protocol=protocol)
    assert list(figures) == ["results/accuracy_matrix", "results/accuracy_curve"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PLOT_FILES[:4])  # no temp
    figures = _write_plots(tmp_path, run, protocol=protocol, confusion=np.eye(6) * 5)
    assert "results/confusion_matrix" in figures
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PLOT_FILES)
    for name in PLOT_FILES[::2]:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 900  # 300 dpi
    curve = figures["results/accuracy_curve"].figure.axes[0]
    assert curve.get_title() == "CLIPHinge, CIFAR-100 B0 Inc2 (preset demo)"
    assert [t.get_text() for t in curve.get_xticklabels()] == ["2", "4", "6"]
