"""``cliphinge aggregate``: finished runs (seeds, presets) into one table with mean ± std.

Runs are grouped by (config, method): the config is the preset name or config file a run was
started with (``smoke`` for ``--preset smoke``), the method ``cliphinge``. Within a group
every protocol entry but the seed (and what the seed alone decides: the synthetic stream's
seed, the command line) must agree; otherwise the group is refused, naming the entries that
differ. Each row holds the mean and the sample standard deviation (``n - 1``; none with one
run) of AIA, Last, AA and Forgetting, and the accuracy-on-seen-classes curve with its band.

Writes ``summary.md``, ``summary.csv``, ``summary.json`` and ``summary_curve.{png,pdf}``
as one set: all five are written into a temporary folder first and only then swapped in,
so a full disk (or a kill) leaves the previous summary whole, never half old and half new.
A folder given twice (also through another path or a symlink), one whose run is live (its
run lock held: ``--overwrite`` may delete it) and a ``results.json`` that is not a finished
run's are refused, each with one line (``aggregate_inputs`` reads and checks the
folders).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import errno
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import write_text_atomic
from .aggregate_inputs import (
    METRICS,
    AggregateError,
    expand_run_folders,
    read_run,
    refuse_repeated_folders,
)
from .figures import aggregate_curve_figure, save_figure

#: Protocol entries allowed to differ within a row: the seed and what it alone decides, and
#: when each run began.
SEED_KEYS = ("seed", "config.seed", "stream_seed", "command", "created")
#: Protocol entries (and their flattened parts) that may differ too: the git commit of the
#: code (a run records it; the package versions, compared, say what shapes the numbers).
RECORD_PREFIXES = ("git_commit",)
#: The files of one summary, written (and replaced) together.
SUMMARY_FILES = (
    "summary.md",
    "summary.csv",
    "summary.json",
    "summary_curve.png",
    "summary_curve.pdf",
)


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


def _is_record(key: str) -> bool:
    """Whether a flattened protocol key is under ``RECORD_PREFIXES``."""
    return any(key == p or key.startswith((f"{p}.", f"{p}_")) for p in RECORD_PREFIXES)


def differing_keys(protocols: Sequence[Dict[str, Any]]) -> List[str]:
    """Protocol entries (flattened) that differ between runs, the seed's excepted."""
    flat = [flatten(p) for p in protocols]
    keys = sorted(k for k in set().union(*flat) - set(SEED_KEYS) if not _is_record(k))
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
        AggregateError: a folder given twice, a folder without a finished run (or one a live
            run holds), or runs of one row whose protocols differ in more than the seed.
    """
    if not folders:
        raise AggregateError("pass at least one run folder")
    refuse_repeated_folders(folders)
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
        lengths = {str(f): len(r["per_task"]) for f, r in runs}
        if len(set(lengths.values())) > 1:
            raise AggregateError(
                f"runs of {config} / {method} have different numbers of tasks ("
                + ", ".join(f"{f}: {n}" for f, n in lengths.items())
                + "); aggregate runs of one stream"
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
    (``figures.aggregate_curve_figure``) into ``output_dir`` as one set.

    All five go into a temporary folder first (each fsynced), which then takes the place of
    ``output_dir`` in one rename when the folder is new, or in one atomic exchange
    (``renameat2(RENAME_EXCHANGE)``) when it holds nothing but an earlier summary. A folder
    that holds other files too (or where the exchange is not supported) gets the five files
    renamed in one after the other: the other files stay, and no write is left to fail
    between the renames. On any failure the earlier summary stays as it was, whole.

    Raises:
        AggregateError: ``output_dir`` is a file (or below one), or cannot be written
            (full, read-only, ...); one line with the fix.
    """
    shown = Path(output_dir)
    had_summary = False
    staging: Optional[Path] = None
    try:
        target = _output_folder(shown)
        had_summary = target.is_dir() and any((target / n).exists() for n in SUMMARY_FILES)
        staging, exchange = _staging_folder(target)
        for name, text in (
            ("summary.md", summary_markdown(rows)),
            ("summary.csv", summary_csv(rows)),
            ("summary.json", json.dumps({"rows": list(rows)}, indent=2) + "\n"),
        ):
            write_text_atomic(text, staging / name)
        save_figure(aggregate_curve_figure(rows), staging / "summary_curve")
        _fsync_folder(staging)
        _swap_in(staging, target, exchange)
    except OSError as err:
        raise AggregateError(_write_error(err, shown, had_summary)) from None
    finally:
        # the unused new set, or the replaced old one; never a folder with other files
        if staging is not None and staging.is_dir() and _summary_files_only(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return [shown / name for name in SUMMARY_FILES]


def _output_folder(output_dir: Path) -> Path:
    """``output_dir`` with its symlinks resolved; ``AggregateError`` if it is a file or lies
    below one."""
    for path in (output_dir, *output_dir.parents):
        if path.exists():
            if path.is_dir():
                break
            where = "is a file" if path == output_dir else f"lies below the file {path}"
            raise AggregateError(
                f"--output-dir {output_dir} {where}, not a folder; choose another --output-dir"
            )
    return output_dir.resolve()


def _staging_folder(target: Path) -> Tuple[Path, bool]:
    """A new empty temporary folder for the summary: ``(folder, exchange)``.

    Next to ``target`` (``.<name>.<random>.tmp``) when ``target`` is missing or holds nothing
    but summary files (``exchange``: the folder itself is swapped); inside ``target``
    otherwise (the files are swapped), and also when ``target``'s parent is not writable
    or on another file system (``target`` is a mount point).
    """
    mode = 0o777 & ~_umask()
    if not target.exists():
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
    else:
        mode = stat.S_IMODE(target.stat().st_mode)
    if _summary_only(target) and _same_device(target, target.parent):
        try:
            staging = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            )
        except OSError as err:
            if not target.exists() or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        else:
            os.chmod(staging, mode)  # mkdtemp makes it 0700; it becomes the output folder
            return staging, True
    return Path(tempfile.mkdtemp(prefix=".summary.", suffix=".tmp", dir=target)), False


def _same_device(a: Path, b: Path) -> bool:
    """``a`` (when it exists) and ``b`` are on one file system (``a`` is no mount point)."""
    return not a.exists() or a.stat().st_dev == b.stat().st_dev


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _summary_only(target: Path) -> bool:
    """``target`` is missing, or a folder of summary files only that is not (above) the
    working directory (swapping that would leave this process in a deleted folder)."""
    if not target.exists():
        return True
    cwd = Path.cwd().resolve()
    return target != cwd and target not in cwd.parents and _summary_files_only(target)


def _summary_files_only(folder: Path) -> bool:
    return all(entry.name in SUMMARY_FILES for entry in folder.iterdir())


def _swap_in(staging: Path, target: Path, exchange: bool) -> None:
    """Put the complete set in ``staging`` in place of the summary in ``target``."""
    if exchange and not target.exists():
        try:
            os.rename(staging, target)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # another process created the folder meanwhile: swap the files in
        else:
            _fsync_folder(target.parent, swapped=True)
            return
    if exchange and target.exists() and _exchange(staging, target):
        _fsync_folder(target.parent, swapped=True)
        if _summary_only(staging):
            return  # staging now holds the earlier summary, removed by the caller
        _exchange(staging, target)  # a file appeared meanwhile: put the folder back
    for name in SUMMARY_FILES:
        os.replace(staging / name, target / name)
    _fsync_folder(target, swapped=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); ``False`` where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EBUSY):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_folder(folder: Path, swapped: bool = False) -> None:
    """fsync ``folder`` (its entries); once the new set is ``swapped`` in, a failure no
    longer matters to what readers see and is not reported as a failed write."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not swapped:
            raise


#: What to do about a failed write of the summary, by ``errno``.
WRITE_FIXES = {
    errno.ENOSPC: "free some space, then run aggregate again",
    errno.EDQUOT: "free space within your quota, then run aggregate again",
    errno.EFBIG: "free space or raise the file size limit (ulimit -f), then run aggregate again",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a writable folder",
    errno.EPERM: "choose a writable folder",
}


def _write_error(err: OSError, output_dir: Path, had_summary: bool) -> str:
    """One line: the folder, the system's reason, what is left, what to do."""
    reason = err.strerror or str(err)
    left = "the summary already there is unchanged; " if had_summary else ""
    fix = WRITE_FIXES.get(err.errno, "check the disk, then run aggregate again")
    return f"cannot write to --output-dir {output_dir} ({reason}); {left}{fix}"


def main(argv: Optional[List[str]] = None) -> int:
    """``cliphinge aggregate RUN_DIR... --output-dir DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="cliphinge aggregate",
        description="Mean ± std over finished runs, one row per (config, method).",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        help="output folders of finished runs, or a folder of them (the seed_* folders of "
        "--seeds): each finished run in its subfolders, one level down",
    )
    parser.add_argument("--output-dir", required=True, help="where the summary files go")
    args = parser.parse_args(argv)
    try:
        folders, notes = expand_run_folders([Path(p) for p in args.runs])
        for note in notes:
            print(note)
        rows = aggregate(folders)
        written = write_summary(rows, Path(args.output_dir))
    except (AggregateError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_markdown(rows).split("\n\n")[2])
    print(f"wrote {', '.join(p.name for p in written)} in {args.output_dir}")
    return 0
