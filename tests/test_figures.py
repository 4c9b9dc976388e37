"""The paper figures (``app.figures``) and the confusion-matrix plugin (``app.confusion``).

Each figure is saved as PNG and PDF and read back; the drawing is checked on the figure
objects (tick labels, line styles, what stays blank, where the legend sits). The plugin's
counts are checked against numpy on hand-made minibatches and inside a real Avalanche
evaluation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_cliphinge.app import figure_data, figures
from avalanche_cliphinge.app.comparison import ABLATIONS, DEFAULT_STRATEGIES, resolve_entries
from avalanche_cliphinge.app.confusion import ConfusionMatrixPlugin, in_class_order
from avalanche_cliphinge.benchmarks import synthetic
from test_host_sync import HostSyncCounter

TITLE = "CLIPHinge, CIFAR-100 B0 Inc10"
PER_TASK = [
    {"all": 100.0, "old": None, "new": 100.0},
    {"all": 80.0, "old": 70.0, "new": 90.0},
    {"all": 60.0, "old": 50.0, "new": 0.0},
]


def square_matrix(n: int, seed: int = 0):
    """``[n][n]`` accuracies, ``None`` above the diagonal (tasks not trained yet)."""
    rng = np.random.default_rng(seed)
    return [[float(rng.uniform(0, 100)) if j <= t else None for j in range(n)] for t in range(n)]


def comparison_entries():
    """The default entries of ``compare.py`` (18 since the CLIP baselines): ``{name: group}``."""
    return {
        e.name: ("ablation" if e.overrides else "method" if e.kind == "cliphinge" else "baseline")
        for e in resolve_entries(DEFAULT_STRATEGIES, tuple(ABLATIONS))
    }


def comparison(n_tasks: int = 10):
    groups = comparison_entries()
    curves = {name: list(np.linspace(100, 20 + 4 * k, n_tasks)) for k, name in enumerate(groups)}
    return figures.comparison_figure(curves, groups, [10] * n_tasks, TITLE)


def aggregate_rows():
    return [
        {
            "config": "smoke",
            "method": "cliphinge",
            "n": 3,
            "curve": {
                "classes_seen": [4, 6, 8, 10],
                "mean": [100.0, 90.0, 85.0, 80.0],
                "std": [0.0, 3.0, 4.0, 2.0],
            },
        },
        {
            "config": "other",
            "method": "cliphinge",
            "n": 1,
            "curve": {"classes_seen": [4, 6, 8, 10], "mean": [90.0, 70.0, 60.0, 55.0], "std": None},
        },
    ]


FIGURES = {
    "accuracy_curve": lambda: figures.run_curve_figure(PER_TASK, [4, 3, 3], TITLE),
    "accuracy_matrix": lambda: figures.accuracy_matrix_figure(square_matrix(10), TITLE),
    "comparison": comparison,
    "confusion_matrix": lambda: figures.confusion_matrix_figure(
        np.diag(np.arange(1, 13)) + 1, [4, 4, 4], TITLE
    ),
    "aggregate_curve": lambda: figures.aggregate_curve_figure(aggregate_rows()),
}


def outside(legend, axes) -> bool:
    """The legend's box does not overlap the axes' box once drawn (the layout placed both)."""
    axes.figure.canvas.draw()
    renderer = axes.figure.canvas.get_renderer()
    box, frame = legend.get_window_extent(renderer), axes.get_window_extent(renderer)
    return not box.overlaps(frame)


# ---- files --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_is_saved_as_a_300_dpi_png_and_a_pdf(name, tmp_path):
    figure = FIGURES[name]()
    paths = figures.save_figure(figure, tmp_path / name)
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    pixels = matplotlib.image.imread(paths[0])
    width, height = figure.get_size_inches()
    assert pixels.shape[:2] == (round(height * 300), round(width * 300))
    assert pixels[..., :3].std() > 0.1  # not blank (values in [0, 1])
    data = paths[1].read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 5000
    # no creation date: the same data give the same bytes (a resumed run rewrites its plots)
    again = figures.save_figure(FIGURES[name](), tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


@pytest.mark.parametrize("name", list(FIGURES))
def test_one_render_fixes_the_layout_constrained_layout_gives_at_300_dpi(name):
    """``render_pixels`` lays the figure out once at 100 dpi and keeps the axes there: the
    saves that follow (300-dpi PNG, PDF) show the layout of a figure laid out at 300 dpi, to
    the text extents' hinting (under 1% of the figure; without a layout the axes sit at the
    default subplot margins, 11 to 17% away)."""
    fresh, rendered = FIGURES[name](), FIGURES[name]()
    fresh.set_dpi(300)
    fresh.canvas.draw()  # constrained layout at 300 dpi
    pixels = figures.render_pixels(rendered)
    width, height = rendered.get_size_inches()
    assert pixels.shape == (round(height * 100), round(width * 100), 3)
    assert pixels.dtype == np.uint8 and pixels.std() > 10  # not blank
    assert not rendered.get_constrained_layout()
    for a, b in zip(fresh.axes, rendered.axes, strict=True):
        np.testing.assert_allclose(b.get_position().bounds, a.get_position().bounds, atol=1e-2)


# ---- accuracy curve -----------------------------------------------------------------------
def test_accuracy_curve_has_labelled_lines_against_classes_seen_and_nothing_clipped():
    figure = figures.run_curve_figure(PER_TASK, [4, 3, 3], TITLE)
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"all seen classes", "old classes", "new classes"}
    assert list(lines["all seen classes"].get_xdata()) == [4, 7, 10]
    assert list(lines["old classes"].get_xdata()) == [7, 10]  # no old classes after task 1
    assert [t.get_text() for t in axes.get_xticklabels()] == ["4", "7", "10"]
    low, high = axes.get_ylim()
    assert low < 0 and high > 100 and not any(line.get_clip_on() for line in lines.values())
    assert axes.get_title() == TITLE and axes.get_xlabel() == "number of classes seen"
    (legend,) = figure.legends
    assert outside(legend, axes)


def test_run_title_names_method_dataset_layout_and_preset():
    protocol = {
        "stream_dataset": "cifar100",
        "stream_init_class": 10,
        "stream_increment": 10,
        "preset": "cifar100_b0_inc10",
    }
    assert (
        figure_data.run_title(protocol)
        == "CLIPHinge, CIFAR-100 B0 Inc10 (preset cifar100_b0_inc10)"
    )
    assert (
        figure_data.run_title(
            {"stream_dataset": "imagenet-r", "stream_init_class": 40, "stream_increment": 20}
        )
        == "CLIPHinge, ImageNet-R B40 Inc20"
    )


# ---- accuracy matrix ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 20, 40])
def test_matrix_labels_every_task_with_one_decimal_cells(n):
    figure = figures.accuracy_matrix_figure(square_matrix(n), TITLE)
    axes = figure.axes[0]
    expected = [str(k) for k in range(1, n + 1)]
    assert [t.get_text() for t in axes.get_xticklabels()] == expected
    assert [t.get_text() for t in axes.get_yticklabels()] == expected
    cells = axes.texts
    assert len(cells) == n * (n + 1) // 2  # the future cells stay blank
    assert all(re.fullmatch(r"\d{1,3}\.\d", t.get_text()) for t in cells)
    assert cells[0].get_fontsize() == pytest.approx(figures._cell_font(n))


def test_matrix_text_shrinks_and_figure_grows_with_the_number_of_tasks():
    sizes = {n: figures.accuracy_matrix_figure(square_matrix(n)) for n in (10, 20, 40)}
    fonts = [sizes[n].axes[0].texts[0].get_fontsize() for n in (10, 20, 40)]
    widths = [sizes[n].get_size_inches()[0] for n in (10, 20, 40)]
    assert fonts[0] > fonts[1] > fonts[2] >= 3.5
    assert widths[0] < widths[1] < widths[2]


def test_matrix_leaves_none_and_untrained_cells_blank():
    # a run's matrix: zeros for tasks not trained yet, None where nothing was measured
    matrix = [[90.0, 0.0, 0.0], [85.04, None, 0.0]]
    axes = figures.accuracy_matrix_figure(matrix).axes[0]
    assert [(t.get_position(), t.get_text()) for t in axes.texts] == [
        ((0, 0), "90.0"),
        ((0, 1), "85.0"),
    ]
    assert len(axes.get_yticklabels()) == 2 and len(axes.get_xticklabels()) == 3


# ---- comparison ---------------------------------------------------------------------------
def panels(figure):
    """``[(axes, legend)]`` of each panel of a comparison figure, left to right."""
    return [(sub.axes[0], sub.legends[0]) for sub in figure.subfigs]


def test_comparison_gives_every_entry_its_own_colour_and_line_style():
    figure = comparison()
    (base_axes, _), (ablation_axes, _) = panels(figure)
    groups = comparison_entries()
    (method,) = [n for n, g in groups.items() if g == "method"]
    base = {line.get_label(): line for line in base_axes.get_lines()}
    ablations = {line.get_label(): line for line in ablation_axes.get_lines()}
    # the method in both panels, drawn alike; the baselines left, the 5 ablations right
    assert list(base) == [method] + [n for n, g in groups.items() if g == "baseline"]
    assert list(ablations) == [method] + [n for n, g in groups.items() if g == "ablation"]
    assert base[method].get_color() == ablations[method].get_color() == "#000000"
    by_name = {**base, **ablations}
    lines = list(by_name.values())
    n = len(groups)
    assert len(lines) == n
    assert len({line.get_color() for line in lines}) == n
    assert len({(line.get_color(), str(line._unscaled_dash_pattern)) for line in lines}) == n
    assert by_name[method].get_linewidth() > max(
        line.get_linewidth() for n, line in by_name.items() if n != method
    )
    # ablations dashed, baselines solid or dash-dot: two families of patterns
    for name, group in groups.items():
        pattern = by_name[name]._unscaled_dash_pattern[1]
        if group == "ablation":
            assert pattern is not None and len(pattern) == 2, name
        elif group == "baseline":
            assert pattern is None or len(pattern) > 2, name


def test_comparison_panels_share_the_y_axis_with_legends_below_them():
    figure = comparison()
    (left, left_legend), (right, right_legend) = panels(figure)
    assert [left.get_title(), right.get_title()] == ["baselines", "ablations"]
    assert figure.get_suptitle() == TITLE
    assert left.get_ylim() == right.get_ylim() and right.get_shared_y_axes().joined(left, right)
    for axes, legend in ((left, left_legend), (right, right_legend)):
        assert outside(legend, axes)
        # below: the legend's top under the axes' bottom (window coordinates grow upwards)
        renderer = figure.canvas.get_renderer()
        assert legend.get_window_extent(renderer).y1 < axes.get_window_extent(renderer).y0
        assert [t.get_text() for t in legend.get_texts()][0] == "cliphinge"
    # with ablations only: one panel
    only = figures.comparison_figure(
        {"cliphinge": [90.0, 80.0], "cliphinge_no_x": [90.0, 70.0]},
        {"cliphinge": "method", "cliphinge_no_x": "ablation"},
    )
    ((axes, legend),) = panels(only)
    assert axes.get_title() == "ablations"
    assert [t.get_text() for t in legend.get_texts()] == ["cliphinge", "cliphinge_no_x"]


def test_comparison_draws_coinciding_curves_once_named_together():
    """As on the smoke stream: naive, LwF and EWC give the same curve, and so do the no_stage2
    and no_fusion ablations; replay differs from them by 0.01 at one task."""
    flat = [100.0, 33.33, 25.0, 20.0]
    curves = {
        "cliphinge": [100.0, 100.0, 93.33, 94.67],
        "cliphinge_no_stage2": [100.0, 100.0, 94.0, 94.67],
        "cliphinge_no_replay": [100.0, 41.0, 32.5, 21.33],
        "cliphinge_no_fusion": [100.0, 100.0, 94.0, 94.67],
        "naive": flat,
        "lwf": list(flat),
        "replay": [100.0, 33.34, 25.0, 20.0],
        "ewc": list(flat),
    }
    groups = {name: "baseline" for name in ("naive", "lwf", "replay", "ewc")}
    groups.update({name: "ablation" for name in curves if name.startswith("cliphinge_")})
    groups["cliphinge"] = "method"
    figure = figures.comparison_figure(curves, groups, [4, 2, 2, 2], TITLE)
    (base_axes, base_legend), (ablation_axes, ablation_legend) = panels(figure)
    assert [t.get_text() for t in base_legend.get_texts()] == [
        "cliphinge",
        "naive = lwf = ewc",
        "replay",
    ]
    assert [t.get_text() for t in ablation_legend.get_texts()] == [
        "cliphinge",
        "cliphinge_no_stage2 = cliphinge_no_fusion",
        "cliphinge_no_replay",
    ]
    (merged,) = [line for line in base_axes.get_lines() if line.get_label().startswith("naive")]
    assert list(merged.get_xdata()) == [4, 6, 8, 10] and list(merged.get_ydata()) == flat
    assert len(base_axes.get_lines()) == 3 and len(ablation_axes.get_lines()) == 3
    # the merged line keeps the first member's style (naive's), as it has in the 13-entry plot
    styles = dict(zip(curves, figures.entry_styles([groups[n] for n in curves])))
    assert merged.get_color() == styles["naive"]["color"]
    assert merged.get_marker() == styles["naive"]["marker"]


def test_coinciding_groups_equal_curves_in_order():
    curves = {
        "a": [90.0, 50.0],
        "b": [90.0, 50.0 + 1e-4],
        "c": [90.0, 50.0 + 1e-9],
        "d": [90.0],
        "e": [None, 40.0],
        "f": [float("nan"), 40.0],
    }
    assert figure_data.coinciding(curves) == [["a", "c"], ["b"], ["d"], ["e", "f"]]
    assert figure_data.coinciding(curves, tol=1e-3) == [["a", "b", "c"], ["d"], ["e", "f"]]


def test_line_styles_stay_distinct_for_many_entries():
    groups = ["method"] + ["ablation"] * 25 + ["baseline"] * 25
    styles = figures.entry_styles(groups)
    keys = {(s["color"], str(s["linestyle"])) for s in styles}
    assert len(keys) == len(groups)
    assert len({str(s["linestyle"]) for s in styles[1:26]}) == 25
    with pytest.raises(ValueError, match="unknown entry group"):
        figures.entry_styles(["baselines"])


# ---- confusion matrix ---------------------------------------------------------------------
def test_confusion_figure_is_row_normalised_with_task_borders_and_labels():
    counts = np.array(
        [
            [8, 2, 0, 0, 0],
            [1, 3, 0, 0, 0],
            [0, 0, 5, 0, 5],
            [0, 0, 0, 0, 0],  # a class without test samples: blank row
            [0, 1, 0, 0, 3],
        ]
    )
    percent = figure_data.row_percent(counts)
    assert percent[0].tolist() == [80.0, 20.0, 0.0, 0.0, 0.0]
    assert np.isnan(percent[3]).all()
    figure = figures.confusion_matrix_figure(counts, [2, 3], TITLE)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "2"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["1", "2"]
    assert list(axes.get_xticks()) == [0.5, 3.0]  # the centre of each task's block
    across, down = axes.get_lines()  # axhline, axvline at the border between the tasks
    assert list(across.get_ydata()) == list(down.get_xdata()) == [1.5, 1.5]
    assert sorted(t.get_text() for t in axes.texts) == sorted(
        ["80", "20", "25", "75", "50", "50", "25", "75"]
    )
    image = axes.get_images()[0].get_array()
    assert image.mask[3].all() and image[0, 0] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="does not match"):
        figures.confusion_matrix_figure(counts, [2, 2])


def test_confusion_figure_labels_forty_tasks():
    counts = np.eye(200, dtype=np.int64) * 50 + 1
    axes = figures.confusion_matrix_figure(counts, [5] * 40).axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == [str(k) for k in range(1, 41)]
    assert len(axes.get_lines()) == 2 * 39 and not axes.texts


def test_confusion_figure_names_the_classes_of_a_ten_class_stream():
    names = [f"class {c}" for c in "ABCDEFGHIJ"]
    counts = np.eye(10, dtype=np.int64) * 15
    figure = figures.confusion_matrix_figure(counts, [4, 2, 2, 2], TITLE, names)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == names
    assert [t.get_text() for t in axes.get_yticklabels()] == names
    assert list(axes.get_xticks()) == list(range(10))  # one tick per class
    # the tasks stay numbered, above their blocks: centres of classes 0-3, 4-5, 6-7, 8-9
    (top,) = axes.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["1", "2", "3", "4"]
    assert list(top.get_xticks()) == [1.5, 4.5, 6.5, 8.5]
    assert len(axes.get_lines()) == 2 * 3 and len(axes.texts) == 10  # borders, 100 % cells
    with pytest.raises(ValueError, match="9 class names for a confusion of 10 classes"):
        figures.confusion_matrix_figure(counts, [4, 2, 2, 2], TITLE, names[:9])


def test_confusion_figure_labels_tasks_beyond_fifty_classes():
    names = [f"class {c}" for c in range(60)]
    counts = np.eye(60, dtype=np.int64) * 15
    axes = figures.confusion_matrix_figure(counts, [10] * 6, TITLE, names).axes[0]
    labels = [str(t) for t in range(1, 7)]
    assert [t.get_text() for t in axes.get_xticklabels()] == labels
    assert [t.get_text() for t in axes.get_yticklabels()] == labels
    assert list(axes.get_xticks()) == [4.5, 14.5, 24.5, 34.5, 44.5, 54.5]
    assert not axes.child_axes
    # 50 classes still get their names, and the figure grows to hold them
    fifty = figures.confusion_matrix_figure(counts[:50, :50], [10] * 5, TITLE, names[:50])
    assert [t.get_text() for t in fifty.axes[0].get_yticklabels()] == names[:50]
    assert fifty.get_size_inches()[1] > 5.4


# ---- aggregate ----------------------------------------------------------------------------
def test_aggregate_curve_has_a_band_per_row_with_a_spread():
    figure = figures.aggregate_curve_figure(aggregate_rows())
    axes = figure.axes[0]
    assert len(axes.get_lines()) == 2 and len(axes.collections) == 1  # n=1: no band
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(100.0) and band[:, 1].min() == pytest.approx(78.0)
    assert outside(figure.legends[0], axes)


# ---- no backend switch, no pyplot ---------------------------------------------------------
DRAW_ALL = """
import json, sys, types
import matplotlib
import numpy as np
{before}
chosen = matplotlib.get_backend(auto_select=False)
import torch  # what a run has loaded before its figures: torch, and pyplot, which
import matplotlib.pyplot  # importing Avalanche loads without choosing a backend


class Trap(types.ModuleType):
    def __getattr__(self, name):
        raise AssertionError(f"pyplot.{{name}} used")


def use(*args, **kwargs):
    raise AssertionError("matplotlib.use called")


sys.modules["matplotlib.pyplot"] = matplotlib.pyplot = Trap("matplotlib.pyplot")
matplotlib.use = use
from avalanche_cliphinge.app import figures
made = [figures.run_curve_figure([{{"all": 90.0, "old": None, "new": 90.0}}], [10], "t"),
        figures.accuracy_matrix_figure([[90.0]], "t"),
        figures.comparison_figure({{"a": [90.0], "b": [80.0]}}, {{"a": "method", "b": "baseline"}}),
        figures.confusion_matrix_figure(np.eye(4), [2, 2], "t"),
        figures.aggregate_curve_figure([{{"config": "c", "method": "m", "n": 2, "curve": {{
            "classes_seen": [10], "mean": [90.0], "std": [1.0]}}}}])]
for k, figure in enumerate(made):
    figures.save_figure(figure, {folder!r} + f"/figure{{k}}")
print(json.dumps([chosen, matplotlib.get_backend(auto_select=False)]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("before", ["", "matplotlib.use('svg')"])
def test_drawing_neither_switches_the_backend_nor_uses_pyplot(before, tmp_path):
    # pyplot and matplotlib.use are replaced by traps before figures is imported: any use
    # of either while importing, drawing or saving fails the subprocess.
    code = DRAW_ALL.format(before=before, folder=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert chosen == after == (None if not before else "svg")
    assert len(list(tmp_path.glob("*.png"))) == len(list(tmp_path.glob("*.pdf"))) == 5


# ---- the confusion-matrix plugin ----------------------------------------------------------
def fake_strategy(scores, labels):
    return SimpleNamespace(
        device=torch.device("cpu"), mb_output=torch.tensor(scores), mb_y=torch.tensor(labels)
    )


def test_plugin_counts_true_x_predicted_like_numpy():
    plugin = ConfusionMatrixPlugin(n_classes=4)
    rng = np.random.default_rng(3)
    batches = [
        (rng.normal(size=(5, 2)), rng.integers(0, 2, 5)),  # 2 classes seen so far
        (rng.normal(size=(6, 4)), rng.integers(0, 4, 6)),
        (rng.normal(size=(3, 4)), np.array([3, 3, 0])),
    ]
    expected = np.zeros((4, 4), dtype=np.int64)
    plugin.before_eval(fake_strategy(*batches[0]))
    for scores, labels in batches:
        np.add.at(expected, (labels, scores.argmax(1)), 1)
        plugin.after_eval_iteration(fake_strategy(scores, labels))
    assert plugin.matrix().tolist() == expected.tolist()
    order = [2, 0, 3, 1]
    assert plugin.matrix(order).tolist() == expected[order][:, order].tolist()
    assert in_class_order(expected, order)[1, 3] == expected[0, 1]
    # a new evaluation starts from zero
    plugin.before_eval(fake_strategy(*batches[0]))
    assert plugin.matrix().sum() == 0


def test_plugin_hand_made_example():
    plugin = ConfusionMatrixPlugin(n_classes=3)
    plugin.before_eval(fake_strategy([[0.0]], [0]))
    # predictions 1, 0, 2, 2 for labels 0, 0, 2, 1
    plugin.after_eval_iteration(
        fake_strategy([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], [0, 0, 2, 1])
    )
    assert plugin.matrix().tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_plugin_disabled_counts_nothing_and_wider_scores_are_refused():
    plugin = ConfusionMatrixPlugin(n_classes=2, enabled=False)
    plugin.before_eval(fake_strategy([[0.0, 1.0]], [1]))
    plugin.after_eval_iteration(fake_strategy([[0.0, 1.0]], [1]))
    assert plugin.matrix().tolist() == [[0, 0], [0, 0]]
    plugin.enabled = True
    with pytest.raises(ValueError, match="scores 3 classes"):
        plugin.after_eval_iteration(fake_strategy([[0.0, 1.0, 2.0]], [1]))
    with pytest.raises(ValueError, match="n_classes"):
        ConfusionMatrixPlugin(0)


def test_plugin_step_never_reads_the_device_back():
    plugin = ConfusionMatrixPlugin(n_classes=4)
    strategy = fake_strategy(np.eye(4)[[0, 1, 1, 3]], [0, 1, 2, 3])
    plugin.before_eval(strategy)
    with HostSyncCounter() as counter:
        plugin.after_eval_iteration(strategy)
    assert counter.events == []


class Unit(nn.Module):
    """uint8 pixels -> float in [0, 1]."""

    def forward(self, x):
        return x.float() / 255


def test_plugin_in_an_avalanche_evaluation_matches_the_model_on_the_test_stream():
    named_benchmark = synthetic(
        n_classes=6,
        init_class=2,
        increment=2,
        train_per_class=2,
        test_per_class=5,
        class_order=[4, 1, 5, 0, 3, 2],
    )
    torch.manual_seed(0)
    # the stream serves uint8 images: the model reads them as [0, 1] floats
    model = nn.Sequential(Unit(), nn.Flatten(), nn.Linear(3 * 32 * 32, 6))
    plugin = ConfusionMatrixPlugin(n_classes=6)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=8,
        eval_mb_size=7,
        device="cpu",
        plugins=[plugin],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    strategy.eval(named_benchmark.benchmark.test_stream)
    expected = np.zeros((6, 6), dtype=np.int64)
    with torch.no_grad():
        for experience in named_benchmark.benchmark.test_stream:
            for x, y, *_ in torch.utils.data.DataLoader(experience.dataset.eval(), batch_size=30):
                np.add.at(expected, (y.numpy(), model(x).argmax(1).numpy()), 1)
    assert plugin.matrix().tolist() == expected.tolist()
    assert plugin.matrix().sum() == 30
    ordered = plugin.matrix(named_benchmark.class_order)
    assert ordered.sum(1).tolist() == [5] * 6
    assert ordered[0, 0] == expected[4, 4]
