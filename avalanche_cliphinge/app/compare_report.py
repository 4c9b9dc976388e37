"""What a comparison writes: the table (Markdown, CSV, JSON), the report and the figure.

``summarize`` gives one row per entry (values per seed), ``markdown_table`` and
``format_report`` show mean ± std, ``write_outputs`` writes ``comparison.{md,csv,json}`` and
``accuracy_vs_task.{png,pdf}``; ``prepare_output`` keeps two comparisons out of one folder.
Upper bounds (trained once on every class) come last, marked ``(upper bound)`` in the
Markdown table and the figure and ``upper_bound`` in the CSV and JSON; their AIA and
forgetting are empty (``-``, ``""``, ``null``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .compare_runs import Comparison
from .comparison import CompareError
from .figure_data import stream_title
from .figures import comparison_figure, figure_files, save_figure


# ---- table ----------------------------------------------------------------------------------
COLUMNS = (
    ("AIA", "AIA"),
    ("Last", "Last"),
    ("AA", "AA"),
    ("Forgetting", "Forgetting (max - last)"),
    ("stream_forgetting", "Avalanche StreamForgetting"),
    ("train_seconds", "train time (s)"),
    ("peak_memory_mib", "peak memory (MiB)"),
    ("trainable_parameters", "trainable parameters"),
)
#: what the Markdown table and the figure add to an upper bound's name
UPPER_BOUND_MARK = " (upper bound)"


def summarize(comparison: Comparison) -> List[Dict[str, Any]]:
    """Per entry, in entry order with the upper bounds last: ``{column: [value per seed]}``
    plus ``entry``, ``seeds``, ``upper_bound`` and the mean ``curve`` (one value for an upper
    bound)."""
    rows = []
    for entry in comparison.entries:
        runs = [r for r in comparison.runs if r.entry == entry.name]
        row: Dict[str, Any] = {
            "entry": entry.name,
            "seeds": [r.seed for r in runs],
            "upper_bound": any(r.upper_bound for r in runs),
        }
        for key, _ in COLUMNS:
            row[key] = [r.metrics[key] if key in r.metrics else getattr(r, key) for r in runs]
        row["curve"] = np.mean([r.curve for r in runs], axis=0).tolist()
        rows.append(row)
    return sorted(rows, key=lambda row: row["upper_bound"])


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (``None`` for one value or missing values)."""
    if not values or any(v is None for v in values):
        return None, None
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def format_cell(values: Sequence[Optional[float]], digits: int = 2) -> str:
    """``"84.43"``, ``"84.43 ± 1.20"`` over seeds, or ``"-"`` when there is no value."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_count(values: Sequence[Optional[float]]) -> str:
    """``"262,144"`` (the same on every seed), ``"mean ± std"`` otherwise, ``"-"`` if none."""
    if not values or any(v is None for v in values):
        return "-"
    if len(set(values)) == 1:
        return f"{int(values[0]):,}"
    return format_cell(values, 0)


def entry_label(row: Dict[str, Any]) -> str:
    """The row's name, ``(upper bound)`` added for an upper bound."""
    return row["entry"] + (UPPER_BOUND_MARK if row.get("upper_bound") else "")


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The comparison as a markdown table (percent metrics, seconds, MiB, parameter counts)."""
    digits = {"train_seconds": 1, "peak_memory_mib": 0}
    header = "| entry | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [
            format_count(row[key])
            if key == "trainable_parameters"
            else format_cell(row[key], digits.get(key, 2))
            for key, _ in COLUMNS
        ]
        lines.append(f"| {entry_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(comparison: Comparison, output_dir: str | Path) -> Dict[str, Path]:
    """``comparison.md``, ``comparison.csv``, ``comparison.json`` and
    ``accuracy_vs_task.{png,pdf}`` (``figures.comparison_figure``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(comparison)
    paths = {
        name: output_dir / name
        for name in (
            "comparison.md",
            "comparison.csv",
            "comparison.json",
            *figure_files("accuracy_vs_task"),
        )
    }
    kinds = {
        e.name: ("ablation" if e.overrides else "method" if e.kind == "cliphinge" else "baseline")
        for e in comparison.entries
    }
    # an upper bound's one evaluation is a point at the last task: NaN before it
    n_tasks = len(comparison.runs[0].test_sizes) if comparison.runs else 1
    curves = {
        entry_label(row): [float("nan")] * (n_tasks - 1) + row["curve"]
        if row["upper_bound"]
        else row["curve"]
        for row in rows
    }
    groups = {entry_label(row): kinds[row["entry"]] for row in rows}
    stream = comparison.protocol.get("stream", {})
    title = stream_title(stream, "CLIPHinge vs baselines") + (
        f", mean over {len(comparison.seeds)} seeds" if len(comparison.seeds) > 1 else ""
    )
    save_figure(
        comparison_figure(
            curves,
            groups,
            stream.get("classes_per_experience"),
            title,
        ),
        output_dir / "accuracy_vs_task",
    )
    with open(paths["comparison.csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["entry", "n_seeds", "upper_bound"]
        for key, _ in COLUMNS:
            header += [f"{key}_mean", f"{key}_std"]
        writer.writerow(header)
        for row in rows:
            line = [row["entry"], len(row["seeds"]), str(row["upper_bound"]).lower()]
            for key, _ in COLUMNS:
                mean, std = mean_std(row[key])
                if key == "trainable_parameters" and mean is not None and not std:
                    mean = int(round(mean))  # a count, whole on every seed
                line += [
                    "" if mean is None else round(mean, 4),
                    "" if std is None else round(std, 4),
                ]
            writer.writerow(line)
    paths["comparison.md"].write_text(format_report(comparison, rows))
    paths["comparison.json"].write_text(
        json.dumps(
            {
                "table": [{k: v for k, v in row.items()} for row in rows],
                "runs": [dataclasses.asdict(run) for run in comparison.runs],
                "protocol": comparison.protocol,
                "wall_seconds": comparison.wall_seconds,
            },
            indent=2,
        )
        + "\n"
    )
    return paths


def format_report(comparison: Comparison, rows: Sequence[Dict[str, Any]]) -> str:
    """The markdown report: table, plot, what the columns mean, protocol."""
    seeds = comparison.seeds
    spread = f"mean ± sample std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [
        "# Comparison",
        "",
        f"Class-incremental, evaluated on the whole test stream after every task; {spread}.",
        "",
        markdown_table(rows),
        "![accuracy on seen classes vs classes seen](accuracy_vs_task.png) "
        "([PDF](accuracy_vs_task.pdf))",
        "",
        "- AIA = mean over tasks of the accuracy on all classes seen so far; Last = that "
        "accuracy after the last task; AA = mean of the per-task accuracies after the last "
        "task; Forgetting = mean over old tasks of (best earlier accuracy - last accuracy) "
        "(as in docs/experiments.md). Avalanche StreamForgetting = accuracy right after learning "
        "minus the last accuracy, averaged over experiences: a different quantity.",
        "- train time: wall seconds inside `strategy.train`; `-` = no training (zero-shot). "
        "Zero-shot and the Avalanche baselines train on features extracted once and shared "
        "(extraction time in the protocol); CLIPHinge and the CLIP baselines (SimpleCIL, "
        "CoOp, RAPF, joint) share one feature cache per seed: the first of them to meet an "
        "experience pays its encoder pass.",
        "- trainable parameters: scalars the entry learned, counted after training (prompts, "
        "heads, adapters, LoRA; never the frozen CLIP; SimpleCIL's prototypes are statistics: "
        "0). (upper bound): trained once on every class at once and evaluated once, so Last "
        "and AA only; AIA and forgetting do not apply (`-`).",
        "- peak memory: CUDA max_memory_allocated per run on a GPU; on a CPU the process's "
        "peak RSS so far (it can only grow from one row to the next).",
        "",
        "## Protocol",
        "",
        "```text",
    ]
    for key, value in comparison.protocol.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    lines += [f"wall time: {comparison.wall_seconds:.1f} s", "```", ""]
    return "\n".join(lines)


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse to mix two comparisons in one folder unless ``overwrite``."""
    names = (
        "comparison.md",
        "comparison.csv",
        "comparison.json",
        *figure_files("accuracy_vs_task"),
        "tb",
        "logs",
    )
    present = [n for n in names if (output_dir / n).exists()]
    if present and not overwrite:
        raise CompareError(
            f"{output_dir} already holds a comparison ({', '.join(present)}); "
            "pass --overwrite or choose another --output-dir"
        )
    for name in present:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
