"""Every figure of the application, drawn for a paper and saved as PNG and PDF.

The figures are ``matplotlib.figure.Figure`` objects on an Agg canvas: this module neither
imports ``matplotlib.pyplot`` nor selects a backend, so it changes nothing for a program that
plots on its own.

- ``accuracy_curve_figure``: accuracy on all seen, old and new classes vs classes seen.
- ``accuracy_matrix_figure``: ``acc[t][j]`` heatmap, task trained x task evaluated.
- ``comparison_figure``: the method against the baselines (one panel) and its ablations (the
  other), each family in its own colours and line styles, coinciding curves drawn once and
  named together ("naive = lwf = ewc").
- ``confusion_matrix_figure``: true x predicted class, classes in task order, task borders,
  class names on the ticks up to 50 classes (task numbers beyond).
- ``aggregate_curve_figure``: mean accuracy on seen classes with a ± std band per row.

``save_figure`` writes ``<stem>.png`` (300 dpi) and ``<stem>.pdf`` (fonts embedded as TrueType,
no creation date: the same figure gives the same bytes), each through a temporary file and a
rename. ``render_pixels`` draws a figure once at ``SCREEN_DPI`` (TensorBoard's image and a
run's PNG preview) and fixes its layout, so that later saves skip the constrained-layout pass.
Tasks are numbered from 1 on the figures, as in papers; ``figure_data`` works out what they show.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from PIL import Image

from ..atomic import write_bytes_atomic
from .figure_data import as_matrix, coinciding, row_percent, x_axis

#: Resolution of the saved PNGs.
DPI = 300
#: Resolution of a figure on screen: its TensorBoard image and a run's PNG previews.
SCREEN_DPI = 100
#: Formats ``save_figure`` writes, in order.
FORMATS = ("png", "pdf")
#: Kinds of entries of ``comparison_figure``: the legend lists them in this order.
GROUPS = ("method", "ablation", "baseline")
GROUP_TITLES = {"method": "method", "ablation": "ablations", "baseline": "baselines"}
#: Lines of ``accuracy_curve_figure``: key of ``curves`` -> (label, colour, style, marker).
RUN_LINES = {
    "all": ("all seen classes", "#0072B2", "-", "o"),
    "old": ("old classes", "#D55E00", "--", "s"),
    "new": ("new classes", "#009E73", ":", "^"),
}
Y_LIMITS = (-3.0, 103.0)  # markers at 0 and 100 stay whole inside the axes
MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">", "p", "h", "*", "d")
#: (dash, gap) of the ablations' dashed lines, in points times the line width.
ABLATION_DASHES = ((3.0, 1.5), (1.2, 1.2), (6.0, 2.0), (2.0, 2.5), (9.0, 3.0))
#: Panels of ``comparison_figure``, left to right: each holds the method and this group.
PANEL_GROUPS = ("baseline", "ablation")
PANEL_TITLES = {"baseline": "baselines", "ablation": "ablations", "method": "method"}
#: Up to this many classes the confusion matrix names each class on its ticks; beyond, tasks.
CLASS_TICKS_MAX = 50


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches at ``SCREEN_DPI`` with constrained
    layout on an Agg canvas (no pyplot, no backend switch)."""
    figure = Figure(figsize=(width, height), dpi=SCREEN_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_files(stem: str) -> Tuple[str, ...]:
    """File names ``save_figure`` writes for ``stem``: ``("<stem>.png", "<stem>.pdf")``."""
    return tuple(f"{stem}.{fmt}" for fmt in FORMATS)


def save_figure(
    figure: Figure, stem: str | Path, dpi: int = DPI, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """Write ``figure`` as ``<stem>.<format>`` for each of ``formats``; returns the paths.

    Each file is rendered in memory and written through a temporary file, fsync and a
    rename (``write_bytes_atomic``): a kill while saving leaves the previous file, never a
    broken one. PDFs get TrueType fonts and no creation date (reproducible bytes).
    """
    stem = Path(stem)
    paths = []
    for fmt in formats:
        buffer = io.BytesIO()
        with matplotlib.rc_context({"pdf.fonttype": 42}):
            figure.savefig(
                buffer,
                format=fmt,
                dpi=dpi,
                metadata={"CreationDate": None} if fmt == "pdf" else None,
            )
        path = stem.parent / f"{stem.name}.{fmt}"
        write_bytes_atomic(buffer.getvalue(), path)
        paths.append(path)
    return paths


def render_pixels(figure: Figure) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels of ``figure`` at its own dpi (``H, W`` = its size in
    inches times the dpi), drawn once on its Agg canvas.

    The draw runs the figure's layout engine; the engine is then removed with the axes where
    it put them, so that saving the figure afterwards (``save_figure``: the 300-dpi PNG and
    the PDF) draws without laying it out again: layout is in inches and points, so the saves
    keep this drawing's layout (laid out anew at 300 dpi, the axes would move by under 1% of
    the figure: text extents differ by hinting). Call it after the last change to the figure.
    """
    figure.canvas.draw()
    figure.set_layout_engine("none")
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def write_png(pixels: np.ndarray, path: Path, dpi: int = SCREEN_DPI) -> Path:
    """``pixels`` (``[H, W, 3]`` uint8) as a PNG stamped with ``dpi``, through a temporary
    file and a rename (``write_bytes_atomic``); returns ``path``."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png", dpi=(dpi, dpi))
    write_bytes_atomic(buffer.getvalue(), path)
    return path


def _set_class_axis(axes, seen: Sequence[int], xlabel: str = "number of classes seen") -> None:
    """x ticks at the task boundaries (at most about 20 labelled, the last always), y in
    percent with room for markers at 0 and 100, grid."""
    step = max(1, int(np.ceil(len(seen) / 20)))
    axes.set_xticks(list(seen))
    axes.set_xticklabels(
        [str(v) if (i % step == 0 or i == len(seen) - 1) else "" for i, v in enumerate(seen)]
    )
    axes.set_xlabel(xlabel)
    axes.set_ylim(*Y_LIMITS)
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("accuracy (%)")
    axes.grid(alpha=0.3)


def accuracy_curve_figure(
    seen: Sequence[int],
    curves: Mapping[str, Sequence[Optional[float]]],
    title: str,
    xlabel: str = "number of classes seen",
) -> Figure:
    """Accuracy after each task vs the number of classes seen.

    Args:
        seen: classes seen after each task, ``[n_tasks]`` (``classes_seen``).
        curves: ``{"all" | "old" | "new": [n_tasks] accuracies in percent}``; ``None``
            values (``old`` after the first task) are left out.
        title: method and dataset (``run_title``).
        xlabel: the x axis' label.
    """
    figure = new_figure(5.6, 4.2)
    axes = figure.add_subplot()
    for key, values in curves.items():
        label, colour, style, marker = RUN_LINES[key]
        points = [(x, v) for x, v in zip(seen, values) if v is not None]
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            linestyle=style,
            marker=marker,
            color=colour,
            label=label,
            linewidth=2,
            markersize=6,
            clip_on=False,
            zorder=3,
        )
    _set_class_axis(axes, seen, xlabel)
    axes.set_title(title)
    figure.legend(loc="outside lower center", ncols=len(curves), frameon=False)
    return figure


def run_curve_figure(
    per_task: Sequence[Mapping[str, Any]], classes_per_task: Optional[Sequence[int]], title: str
) -> Figure:
    """``accuracy_curve_figure`` of a run's ``per_task`` records (``grouped_accuracy``):
    all seen, old and new classes against classes seen (the task number without
    ``classes_per_task``)."""
    seen, xlabel = x_axis(len(per_task), classes_per_task)
    curves = {key: [g[key] for g in per_task] for key in RUN_LINES}
    return accuracy_curve_figure(seen, curves, title, xlabel)


def _cell_font(n: int) -> float:
    """Font size (points) of cell text and ticks for an ``n`` x ``n`` grid: 9 up to 4 tasks,
    8 at 10, 6.5 at 20, 5 at 40, never under 3.5."""
    return float(np.clip(10.0 - 1.5 * np.log2(max(n, 1) / 4.0), 3.5, 9.0))


def accuracy_matrix_figure(
    matrix: Sequence[Sequence[Optional[float]]], title: Optional[str] = None
) -> Figure:
    """Heatmap of ``acc[t][j]`` (percent): task trained (rows) x task evaluated (columns).

    Args:
        matrix: ``[tasks trained][tasks]`` accuracies; ``None`` (or missing) entries and the
            cells of tasks not trained yet (``j > t``) stay blank.
        title: the heading above ``"accuracy (%)"`` (``run_title``), or none.

    Every task is labelled on both axes; cell text has one decimal, its size shrinks with the
    number of tasks (and the figure grows), so 40 tasks stay legible.
    """
    acc = as_matrix(matrix)
    rows, cols = acc.shape
    acc[np.triu(np.ones((rows, cols), dtype=bool), k=1)] = np.nan
    font = _cell_font(max(rows, cols))
    cell = max(font * 3.0 / 72.0 + 0.05, 0.2)  # inches: room for "100.0"
    figure = new_figure(max(4.2, cell * cols + 1.9), max(3.4, cell * rows + 1.3))
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = axes.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap=cmap, aspect="equal")
    for t, j in zip(*np.nonzero(np.isfinite(acc))):
        axes.text(
            j,
            t,
            f"{acc[t, j]:.1f}",
            ha="center",
            va="center",
            fontsize=font,
            color="white" if acc[t, j] < 55 else "black",
        )
    ticks = max(font + 1.0, 5.0)
    axes.set_xticks(range(cols), [str(j + 1) for j in range(cols)], fontsize=ticks)
    axes.set_yticks(range(rows), [str(t + 1) for t in range(rows)], fontsize=ticks)
    axes.tick_params(length=0)
    axes.set_xlabel("task evaluated")
    axes.set_ylabel("task trained")
    heading = "accuracy (%) on each task after each task"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8, label="accuracy (%)")
    return figure


def _dashes(group: str, k: int):
    """The ``k``-th line style of ``group``'s family, all different: baselines are solid,
    then dash-dot patterns; ablations dashed patterns; the method solid."""
    if group == "method" or (group != "ablation" and k == 0):
        return "-"
    if group == "ablation":
        dash, gap = ABLATION_DASHES[k % len(ABLATION_DASHES)]
        return (0, (dash, gap + 1.5 * (k // len(ABLATION_DASHES))))
    dots = 1 + (k - 1) % 3
    return (0, (4.0 + 2.5 * ((k - 1) // 3), 2.0) + (1.0, 2.0) * dots)


def entry_styles(groups: Sequence[str]) -> List[Dict[str, Any]]:
    """Line properties (``color``, ``linestyle``, ``marker``, ...) for entries of ``groups``
    (``"method"``, ``"ablation"`` or ``"baseline"`` each), every (colour, line style) pair
    different at any number of entries.

    The method is black, bold and solid; ablations take warm colours (``YlOrRd``), dashed
    lines and hollow markers; baselines cool colours (``viridis``), solid and dash-dot lines
    and filled markers. Within a family the colours are spread evenly over the colour map.
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown entry group(s) {unknown}; use {', '.join(GROUPS)}")
    counts = {g: list(groups).count(g) for g in GROUPS}
    seen = {g: 0 for g in GROUPS}
    styles = []
    for group in groups:
        k, n = seen[group], counts[group]
        seen[group] += 1
        if group == "method":
            # several "method" entries (more than one CLIPHinge config): greys, solid
            grey = 0.55 * k / max(n - 1, 1)
            styles.append(
                {
                    "color": matplotlib.colors.to_hex((grey, grey, grey)),
                    "linestyle": "-" if k == 0 else _dashes("baseline", k),
                    "marker": "o",
                    "linewidth": 2.6,
                    "markersize": 6,
                    "zorder": 5,
                }
            )
            continue
        low, high, cmap = (0.42, 1.0, "YlOrRd") if group == "ablation" else (0.0, 0.8, "viridis")
        position = low + (high - low) * (k / (n - 1) if n > 1 else 0.5)
        colour = matplotlib.colors.to_hex(matplotlib.colormaps[cmap](position))
        style = {
            "color": colour,
            "linestyle": _dashes(group, k),
            "marker": MARKERS[k % len(MARKERS)],
            "linewidth": 1.6,
            "markersize": 5,
            "zorder": 4 if group == "ablation" else 3,
        }
        if group == "ablation":
            style.update(marker="o" if k % 2 == 0 else "D", markerfacecolor="white")
        styles.append(style)
    return styles


def comparison_figure(
    curves: Mapping[str, Sequence[float]],
    groups: Mapping[str, str],
    classes_per_task: Optional[Sequence[int]] = None,
    title: str = "Accuracy on seen classes",
) -> Figure:
    """Accuracy on seen classes after each task: the method against the baselines in one
    panel, against its ablations in the other.

    Args:
        curves: ``{entry: [n_tasks] accuracies in percent}``, drawn in this order.
        groups: ``{entry: "method" | "ablation" | "baseline"}``; styles from ``entry_styles``
            (the same entry looks the same in both panels).
        classes_per_task: the stream's classes per task (x = classes seen), or ``None``
            (x = task number).
        title: method and dataset, above both panels.

    A panel is left out when its group has no entry (one panel holds the method alone when
    there is nothing else). Curves of one panel that coincide (``coinciding``: naive, LwF and
    EWC on a frozen encoder, for instance) are drawn once, in the first one's style, and
    named together in the legend: ``"naive = lwf = ewc"``. Each panel's legend sits below it.
    """
    names = list(curves)
    styles = dict(zip(names, entry_styles([groups[n] for n in names])))
    n_tasks = max(len(v) for v in curves.values())
    seen, xlabel = x_axis(n_tasks, classes_per_task)
    method = [n for n in names if groups[n] == "method"]
    panels = [
        (group, method + [n for n in names if groups[n] == group])
        for group in PANEL_GROUPS
        if any(groups[n] == group for n in names)
    ] or [("method", method)]
    figure = new_figure(4.6 * len(panels) + 0.4, 5.4)
    figure.suptitle(title)
    first_axes = None
    for k, (subfigure, (group, members)) in enumerate(
        zip(figure.subfigures(1, len(panels), squeeze=False)[0], panels)
    ):
        axes = subfigure.add_subplot(sharey=first_axes)
        first_axes = first_axes or axes
        entries = coinciding({n: curves[n] for n in members})
        for same in entries:
            values = curves[same[0]]
            axes.plot(
                seen[: len(values)],
                values,
                label=" = ".join(same),
                clip_on=False,
                **styles[same[0]],
            )
        _set_class_axis(axes, seen, xlabel)
        if k > 0:
            axes.set_ylabel("")
            axes.tick_params(labelleft=False)
        else:
            axes.set_ylabel("accuracy on seen classes (%)")
        axes.set_title(PANEL_TITLES[group], fontsize=10)
        subfigure.legend(
            loc="outside lower center",
            ncols=1 if len(entries) < 5 else 2,
            fontsize=7.5,
            frameon=False,
            handlelength=3.2,
        )
    return figure


def confusion_matrix_figure(
    confusion: np.ndarray,
    classes_per_task: Sequence[int],
    title: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
) -> Figure:
    """Final confusion matrix over the stream's classes, grouped by task.

    Args:
        confusion: ``[C, C]`` counts, ``confusion[true, predicted]``, classes in the stream's
            class order (task by task; ``ConfusionMatrixPlugin.matrix(class_order)``).
        classes_per_task: classes of each task, summing to ``C``.
        title: method and dataset, or none.
        class_names: the ``C`` class names in the same order as the rows, or none.

    Rows are normalised to percent; the colour scale is square-root so that small
    confusions show. White lines mark the task boundaries. Up to ``CLASS_TICKS_MAX`` (50)
    classes with ``class_names``, every class is named on both axes (the figure grows with
    the classes and the longest name) and the tasks are numbered above their blocks;
    otherwise each task is labelled at its block on both axes. Up to 20 classes the non-zero
    cells also hold the percentage.
    """
    counts = np.asarray(confusion)
    n = counts.shape[0]
    if counts.shape != (n, n) or sum(classes_per_task) != n:
        raise ValueError(
            f"confusion of shape {counts.shape} does not match "
            f"{sum(classes_per_task)} classes in {len(classes_per_task)} tasks"
        )
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a confusion of {n} classes")
    named = class_names is not None and n <= CLASS_TICKS_MAX
    percent = row_percent(counts)
    name_font = float(np.clip(_cell_font(n), 5.0, 8.0))
    if named:
        side = max(4.3, n * name_font * 1.45 / 72.0)  # inches: one tick label per row
        names_in = max(len(str(name)) for name in class_names) * name_font * 0.6 / 72.0
        figure = new_figure(side + names_in + 1.9, side + names_in + 1.5)
    else:
        figure = new_figure(6.2, 5.4)
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = axes.imshow(
        np.ma.masked_invalid(percent),
        cmap=cmap,
        norm=PowerNorm(0.5, 0, 100),
        interpolation="nearest",
        aspect="equal",
    )
    ends = np.cumsum(classes_per_task)
    for end in ends[:-1]:
        axes.axhline(end - 0.5, color="white", linewidth=0.8)
        axes.axvline(end - 0.5, color="white", linewidth=0.8)
    if n <= 20:
        font = _cell_font(n) - 1.0
        for i, j in zip(*np.nonzero(np.nan_to_num(percent) > 0)):
            axes.text(
                j,
                i,
                f"{percent[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=font,
                color="white" if percent[i, j] < 30 else "black",
            )
    centres = ends - np.asarray(classes_per_task) / 2.0 - 0.5
    font = _cell_font(len(classes_per_task)) + 0.5
    tasks = [str(t + 1) for t in range(len(classes_per_task))]
    if named:
        names = [str(name) for name in class_names]
        axes.set_xticks(range(n), names, fontsize=name_font, rotation=90)
        axes.set_yticks(range(n), names, fontsize=name_font)
        top = axes.secondary_xaxis("top")
        top.set_xticks(centres, tasks, fontsize=font)
        top.tick_params(length=0)
        top.set_xlabel("task", fontsize=8)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
    else:
        axes.set_xticks(centres, tasks, fontsize=font)
        axes.set_yticks(centres, tasks, fontsize=font)
        axes.set_xlabel("predicted class, grouped by task")
        axes.set_ylabel("true class, grouped by task")
    axes.tick_params(length=0)
    heading = "confusion after the last task (% of each true class)"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    bar = figure.colorbar(image, ax=axes, shrink=0.8, label="% of the true class (sqrt scale)")
    bar.set_ticks([0, 1, 5, 10, 25, 50, 75, 100])
    return figure


def aggregate_curve_figure(
    rows: Sequence[Mapping[str, Any]],
    title: str = "Accuracy on seen classes, mean ± std over seeds",
) -> Figure:
    """Mean accuracy on seen classes vs classes seen with a ± std band, one line per row.

    Args:
        rows: ``aggregate.aggregate`` rows: ``config``, ``method``, ``n`` and ``curve`` with
            ``classes_seen``, ``mean`` and ``std`` (``[n_tasks]`` each; ``std`` ``None``
            for a single run).
        title: the heading.
    """
    figure = new_figure(6.8, 4.2)
    axes = figure.add_subplot()
    styles = entry_styles(["baseline"] * len(rows))
    for row, style in zip(rows, styles):
        curve = row["curve"]
        x, mean = np.asarray(curve["classes_seen"]), np.asarray(curve["mean"])
        axes.plot(
            x,
            mean,
            label=f"{row['config']} / {row['method']} (n={row['n']})",
            clip_on=False,
            **style,
        )
        if curve["std"] is not None:
            std = np.asarray(curve["std"])  # the band stops at 0 and 100 (percent)
            axes.fill_between(
                x,
                np.clip(mean - std, 0, 100),
                np.clip(mean + std, 0, 100),
                color=style["color"],
                alpha=0.2,
                linewidth=0,
            )
    _set_class_axis(axes, rows[0]["curve"]["classes_seen"])
    axes.set_ylabel("accuracy on seen classes (%)")
    axes.set_title(title)
    figure.legend(loc="outside lower center", ncols=min(len(rows), 3), fontsize=8, frameon=False)
    return figure
