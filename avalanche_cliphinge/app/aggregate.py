"""``cliphinge aggregate``: finished runs (seeds, presets) into one table with mean ± std.

Runs are grouped by (config, method): the config is the preset name or config file a run was
started with (``smoke`` for ``--preset smoke``), the method ``cliphinge``. Within a group
every protocol entry but the seed (and what the seed alone decides: the synthetic stream's
seed, the command line) must agree; otherwise the group is refused, naming the entries that differ. Each row holds the mean and
the sample standard deviation (``n - 1``; none with one run) of AIA, Last, AA and Forgetting,
and the accuracy-on-seen-classes curve with its band.

Writes ``summary.md``, ``summary.csv``, ``summary.json`` and ``summary_curve.{png,pdf}``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import write_text_atomic
from .figures import aggregate_curve_figure, save_figure

METRICS = ("AIA", "Last", "AA", "Forgetting")
#: Protocol entries allowed to differ within a row: the seed and what it alone decides.
SEED_KEYS = ("seed", "config.seed", "stream_seed", "command")


class AggregateError(ValueError):
    """Runs that cannot be put in one table (unfinished, unreadable, mixed protocols)."""


def read_run(folder: Path) -> Dict[str, Any]:
    """``results.json`` of a finished run in ``folder``."""
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AggregateError(
            f"{folder} holds no results.json; pass the output folders of finished runs"
        ) from None
    except (ValueError, OSError) as err:
        raise AggregateError(f"{path} is not readable JSON ({type(err).__name__})") from None
    if not results.get("finished"):
        raise AggregateError(
            f"{folder} holds an unfinished run ({results.get('completed_tasks')}"
            " tasks); finish it with --resume or leave it out"
        )
    return results


def flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"config": {"lr": 1}}`` -> ``{"config.lr": 1}``."""
    flat: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_key(results: Dict[str, Any]) -> Tuple[str, str]:
    """(config, method) of a run: the row it belongs to (``--preset smoke`` runs: smoke)."""
    protocol = results["protocol"]
    config = (
        protocol.get("preset") or protocol.get("config_file") or protocol.get("stream", "config")
    )
    return Path(str(config)).stem, protocol.get("method", "cliphinge")


def differing_keys(protocols: Sequence[Dict[str, Any]]) -> List[str]:
    """Protocol entries (flattened) that differ between runs, the seed's excepted."""
    flat = [flatten(p) for p in protocols]
    keys = sorted(set().union(*flat) - set(SEED_KEYS))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def aggregate(folders: Sequence[Path]) -> List[Dict[str, Any]]:
    """One row per (config, method) over the finished runs in ``folders``.

    Returns rows with ``config``, ``method``, ``n``, ``seeds``, ``runs``, ``<metric>_mean`` /
    ``<metric>_std`` for each of ``METRICS``, and ``curve``: ``classes_seen`` (after each
    task) with the ``mean`` and ``std`` of the accuracy on seen classes.

    Raises:
        AggregateError: a folder without a finished run, or runs of one row whose protocols
            differ in more than the seed.
    """
    if not folders:
        raise AggregateError("pass at least one run folder")
    groups: Dict[Tuple[str, str], List[Tuple[Path, Dict[str, Any]]]] = {}
    for folder in folders:
        results = read_run(Path(folder))
        groups.setdefault(run_key(results), []).append((Path(folder), results))
    rows = []
    for (config, method), runs in groups.items():
        differing = differing_keys([r["protocol"] for _, r in runs])
        if differing:
            raise AggregateError(
                f"runs of {config} / {method} differ in more than the seed: "
                f"{', '.join(differing[:6])}{' ...' if len(differing) > 6 else ''}; "
                "aggregate them separately"
            )
        row: Dict[str, Any] = {
            "config": config,
            "method": method,
            "n": len(runs),
            "seeds": [r["protocol"].get("seed") for _, r in runs],
            "runs": [str(f) for f, _ in runs],
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(
                [r["metrics"][metric] for _, r in runs]
            )
        curves = np.asarray([[t["all"] for t in r["per_task"]] for _, r in runs])
        sizes = runs[0][1]["protocol"].get("stream_classes_per_experience")
        row["curve"] = {
            # classes seen after each task; the task number when the stream did not record it
            "classes_seen": (
                [int(v) for v in np.cumsum(sizes)] if sizes else list(range(1, curves.shape[1] + 1))
            ),
            "mean": curves.mean(0).tolist(),
            "std": curves.std(0, ddof=1).tolist() if len(runs) > 1 else None,
        }
        rows.append(row)
    return rows


def _cell(mean: float, std: Optional[float]) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def summary_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The table of ``summary.md``."""
    lines = [
        "| config | method | n | " + " | ".join(METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for row in rows:
        cells = [_cell(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        lines.append(
            f"| {row['config']} | {row['method']} | {row['n']} | " + " | ".join(cells) + " |"
        )
    return (
        "# Summary\n\nMean ± sample standard deviation (n - 1) over n runs; percent. AIA = "
        "mean accuracy on seen classes over tasks, Last = after the last task, AA = mean of "
        "the per-task accuracies after the last task, Forgetting = mean over old tasks of "
        "(best earlier - last).\n\n" + "\n".join(lines) + "\n\n"
        "![accuracy on seen classes](summary_curve.png)\n"
    )


def summary_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """``summary.csv``: one line per row, empty std with a single run."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["config", "method", "n", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    )
    for row in rows:
        writer.writerow(
            [row["config"], row["method"], row["n"], " ".join(str(s) for s in row["seeds"])]
            + [
                ("" if row[f"{m}_{s}"] is None else f"{row[f'{m}_{s}']:.4f}")
                for m in METRICS
                for s in ("mean", "std")
            ]
        )
    return out.getvalue()


def write_summary(rows: Sequence[Dict[str, Any]], output_dir: Path) -> List[Path]:
    """Write ``summary.md``, ``.csv``, ``.json`` and ``summary_curve.png`` / ``.pdf``
    (``figures.aggregate_curve_figure``), each through a temporary file and a rename."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("summary.md", summary_markdown(rows)),
        ("summary.csv", summary_csv(rows)),
        ("summary.json", json.dumps({"rows": list(rows)}, indent=2) + "\n"),
    ):
        write_text_atomic(text, output_dir / name)
        written.append(output_dir / name)
    written += save_figure(aggregate_curve_figure(rows), output_dir / "summary_curve")
    return written


def main(argv: Optional[List[str]] = None) -> int:
    """``cliphinge aggregate RUN_DIR... --output-dir DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="cliphinge aggregate",
        description="Mean ± std over finished runs, one row per (config, method).",
    )
    parser.add_argument("runs", nargs="+", help="output folders of finished runs")
    parser.add_argument("--output-dir", required=True, help="where the summary files go")
    args = parser.parse_args(argv)
    try:
        rows = aggregate([Path(p) for p in args.runs])
        written = write_summary(rows, Path(args.output_dir))
    except (AggregateError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_markdown(rows).split("\n\n")[2])
    print(f"wrote {', '.join(p.name for p in written)} in {args.output_dir}")
    return 0
