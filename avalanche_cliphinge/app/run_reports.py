"""A run's reports besides results.json: its figures (PNG and PDF, or PNG previews before the
last task), the results as TensorBoard and W&B points (scalars, figures, HParams), and the
results as printed lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence

import numpy as np

from ..config import CLIPHingeConfig
from ..wandb_logger import WandBLogger
from .figures import (
    SCREEN_DPI,
    accuracy_matrix_figure,
    confusion_matrix_figure,
    render_pixels,
    run_curve_figure,
    save_figure,
    write_png,
)
from .figure_data import run_title
from .results import format_results
from .run_record import RunState

#: Resolution of the PNG previews written after each task before the last (the pixels
#: TensorBoard gets).
PREVIEW_DPI = SCREEN_DPI


def write_plots(
    output_dir: Path,
    run: RunState,
    *,
    protocol: Optional[Dict[str, Any]] = None,
    confusion=None,
    class_names: Optional[Sequence[str]] = None,
    final: bool = True,
) -> Dict[str, RenderedFigure]:
    """The run's figures as PNG (300 dpi) and PDF, each atomic (``figures.save_figure``):
    ``accuracy_matrix``, ``accuracy_curve`` and, when ``confusion`` is given,
    ``confusion_matrix``. Returns ``{TensorBoard tag: RenderedFigure}``.

    Each figure is drawn once at ``PREVIEW_DPI`` (``figures.render_pixels``: its TensorBoard
    image), which also fixes its layout for the saves. Before the last task (``final``
    false) the files are previews, those pixels as PNG, no PDF (rendering a 300-dpi PNG and
    a PDF of each figure after every task took most of a small run's time); the last task
    writes the full set.

    Args:
        protocol: the run's protocol (results.json's): the title (method, dataset, preset)
            and the classes per task (x axis: classes seen; without it: the task number).
        confusion: ``[C, C]`` counts of the last evaluation in the stream's class order
            (``ConfusionMatrixPlugin.matrix(named_benchmark.class_order)``), or ``None``.
        class_names: the class names in that order, for the confusion matrix's ticks.
    """
    protocol = protocol or {}
    title = run_title(protocol)
    sizes = protocol.get("stream_classes_per_experience")
    figures = {
        "results/accuracy_matrix": accuracy_matrix_figure(run.matrix, title),
        "results/accuracy_curve": run_curve_figure(run.per_task, sizes, title),
    }
    if confusion is not None:
        figures["results/confusion_matrix"] = confusion_matrix_figure(
            confusion, sizes or [len(confusion)], title, class_names
        )
    rendered = {}
    for tag, figure in figures.items():
        stem = output_dir / tag.split("/")[-1]
        rendered[tag] = RenderedFigure(figure, render_pixels(figure))
        if final:
            save_figure(figure, stem)
        else:
            write_png(rendered[tag].pixels, stem.parent / f"{stem.name}.png", PREVIEW_DPI)
    return rendered


class RenderedFigure(NamedTuple):
    """A run's figure and its pixels at ``PREVIEW_DPI`` (``[H, W, 3]`` uint8)."""

    figure: Any
    pixels: np.ndarray


def log_results(
    tb_logger,
    figures: Dict[str, RenderedFigure],
    metrics: Dict[str, float],
    run: RunState,
    clock,
    wandb_logger: Optional[WandBLogger] = None,
) -> None:
    """The results so far as TensorBoard scalars and images (flushed), and as W&B values and
    images under the same names when ``wandb_logger`` is given.

    Stepped, as every scalar the package adds, by Avalanche's ``clock.train_iterations``
    (the stage-1 minibatches trained so far): they overlay Avalanche's own curves.
    """
    writer = tb_logger.writer
    step = clock.train_iterations
    scalars = {
        **{f"results/{name}": value for name, value in metrics.items()},
        "results/accuracy_seen_classes": run.per_task[-1]["all"],
        "results/task": len(run.per_task) - 1,
    }
    # the pixels SummaryWriter.add_figure would draw, drawn once by write_plots
    for tag, rendered in figures.items():
        writer.add_image(tag, rendered.pixels, global_step=step, dataformats="HWC")
    for name, value in scalars.items():
        writer.add_scalar(name, value, global_step=step)
    writer.flush()
    if wandb_logger is not None:
        pixels = {tag: rendered.pixels for tag, rendered in figures.items()}
        wandb_logger.log_values(scalars, step, images=pixels)


def log_hparams(writer, config: CLIPHingeConfig, metrics: Dict[str, float], step: int) -> None:
    """TensorBoard's HParams: every config key (lists and ``None`` as JSON text) with the
    final AIA, AA, Last and Forgetting (``hparam/<name>``), so the runs of a sweep sort in
    the HParams tab. Written once, when the run finishes, into the run's event file."""
    from torch.utils.tensorboard.summary import hparams

    values = {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in config.to_dict().items()
    }
    finals = {f"hparam/{k}": float(v) for k, v in metrics.items()}
    # into the run's own event file (SummaryWriter.add_hparams would open a second one)
    file_writer = writer._get_file_writer()
    for summary in hparams(values, finals):
        file_writer.add_summary(summary, step)
    for tag, value in finals.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


def print_summary(results: Dict[str, Any], out=None) -> None:
    """Print results.txt-style lines for a finished (or partial) run (to ``out``, default
    the current ``sys.stdout``)."""
    out = out or sys.stdout
    metrics = results["metrics"]
    out.write(
        format_results(
            results["per_task"],
            metrics,
            results["avalanche_stream_forgetting"],
            {
                k: v
                for k, v in results["protocol"].items()
                if k in ("model", "pretrained", "class_order", "seed", "device")
            },
        )
    )
    out.write(
        f"wall time {results['wall_seconds']:.1f} s (training {results['train_seconds']:.1f} s)\n"
    )
