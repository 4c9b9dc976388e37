"""The run folders ``cliphinge aggregate`` is given: read, checked, expanded.

A folder's ``results.json`` must be a finished run's, whole (``check_results``); a folder a
live run holds (its run lock: ``live_holder``) and a folder given twice, by whatever path,
are refused; a folder of runs (``--seeds``' ``seed_*`` folders) stands for its finished
runs (``expand_run_folders``). Each refusal is an ``AggregateError`` of one line.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .run_lock import LOCK_NAME

#: The metrics of a finished run's results, averaged in each row of the summary.
METRICS = ("AIA", "Last", "AA", "Forgetting")


class AggregateError(ValueError):
    """Runs that cannot be put in one table (unfinished, unreadable, mixed protocols)."""


def read_run(folder: Path) -> Dict[str, Any]:
    """``results.json`` of a finished run in ``folder``, checked (``check_results``).

    Raises ``AggregateError`` when the folder is missing, holds no results or an unfinished
    run, or when a live process holds the folder's run lock (a run that may rewrite it or,
    with ``--overwrite``, delete it).
    """
    folder = Path(folder)
    path = folder / "results.json"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise AggregateError(f"{folder} {what}; pass the output folders of finished runs")
    holder = live_holder(folder)
    if holder:
        raise AggregateError(
            f"{folder} is held by a live run ({holder}) that may rewrite or delete its "
            "results; wait for it to end, or leave it out"
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AggregateError(
            f"{folder} holds no results.json; pass the output folders of finished runs"
        ) from None
    except ValueError as err:
        raise AggregateError(f"{path} is not readable JSON ({type(err).__name__})") from None
    except OSError as err:
        raise AggregateError(
            f"cannot read {path} ({err.strerror or err}); make it readable or leave it out"
        ) from None
    if not isinstance(results, dict):
        raise AggregateError(
            f"{path} holds a JSON {_json_kind(results)}, not a run's results (an object with "
            "finished, protocol, metrics and per_task); pass the output folder of a "
            "cliphinge run"
        )
    if not results.get("finished"):
        done = results.get("completed_tasks")
        raise AggregateError(
            f"{folder} holds an unfinished run"
            f"{f' ({done} tasks)' if isinstance(done, int) else ''}; finish it with --resume "
            "or leave it out"
        )
    problems = check_results(results)
    if problems:
        raise AggregateError(
            f"{path} {'; '.join(problems)}; pass the output folder of a finished cliphinge run "
            "(a damaged one: run it again with --overwrite)"
        )
    return results


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_results(results: Dict[str, Any]) -> List[str]:
    """What a finished run's ``results`` lack for a row: ``[]`` when nothing, else phrases
    such as ``lacks protocol, metrics`` or ``has metrics.AIA = "x", not a finite number``."""
    missing = [k for k in ("protocol", "metrics", "per_task") if k not in results]
    problems = [f"lacks {', '.join(missing)}"] if missing else []
    protocol = results.get("protocol", {})
    if not isinstance(protocol, dict):
        problems.append(f"has protocol = {json.dumps(protocol)[:40]}, not an object")
    metrics = results.get("metrics", {})
    if not isinstance(metrics, dict):
        problems.append(f"has metrics = {json.dumps(metrics)[:40]}, not an object")
    elif "metrics" in results:
        absent = [m for m in METRICS if m not in metrics]
        if absent:
            problems.append(f"lacks metrics.{', metrics.'.join(absent)}")
        problems += [
            f"has metrics.{m} = {json.dumps(metrics[m])[:40]}, not a finite number"
            for m in METRICS
            if m in metrics and not _is_number(metrics[m])
        ]
    per_task = results.get("per_task", [])
    if "per_task" in results and not (
        isinstance(per_task, list)
        and per_task
        and all(isinstance(t, dict) and _is_number(t.get("all")) for t in per_task)
    ):
        problems.append(
            "has per_task that is not a list of tasks with a finite accuracy 'all' each"
        )
    return problems


def live_holder(folder: Path) -> Optional[str]:
    """Who holds ``folder``'s run lock (``run_lock``: an ``flock`` on the folder and on its
    ``.lock``) now, as ``PID 123, started ...``; ``None`` when no live process does (no
    lock, or the lock of a run that ended or was killed).

    Each lock is tried as a shared lock and dropped at once: a run starting in that instant
    is refused as if another run were starting, and this reader never blocks.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    held = False
    for path in (Path(folder), Path(folder) / LOCK_NAME):
        try:
            fd = os.open(path, flags)
        except OSError:
            continue  # no .lock: no run ever held it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held = True
        except OSError:
            pass  # no locks on this file system: no run can hold one here
        finally:
            os.close(fd)
    if not held:
        return None
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
        host = info.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        return f"PID {int(info['pid'])}{where}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its PID not in {LOCK_NAME}: it is starting"


def refuse_repeated_folders(folders: Sequence[Path]) -> None:
    """``AggregateError`` when one folder is given twice, by whatever path (``runs/a``,
    ``runs/./a``, a symlink to it): the same device and inode."""
    seen: Dict[Tuple[int, int], str] = {}
    for folder in map(str, folders):
        try:
            info = os.stat(folder)
        except OSError:
            continue  # read_run names what is wrong with it
        key = (info.st_dev, info.st_ino)
        if key in seen:
            first = seen[key]
            again = "" if first == folder else f" (again as {folder})"
            raise AggregateError(
                f"{first} is given twice{again}; pass each run folder once (a run counted "
                "twice weighs double in mean ± std)"
            )
        seen[key] = folder


def expand_run_folders(paths: Sequence[Path]) -> Tuple[List[Path], List[str]]:
    """The run folders meant by ``paths``, and one line for each parent folder expanded.

    A folder holding ``results.json`` (or not a folder) is taken as it is (``read_run``
    checks it). A folder without one whose subfolders hold runs (``--seeds``' ``seed_*``
    folders, a folder of runs) stands for its subfolders, one level down, sorted by name:
    each finished run among them is taken, and the others (unfinished, live, damaged) are
    left out and named in its line.
    """
    folders: List[Path] = []
    notes: List[str] = []
    for path in map(Path, paths):
        if not path.is_dir() or (path / "results.json").exists():
            folders.append(path)
            continue
        try:
            children = sorted(c for c in path.iterdir() if (c / "results.json").exists())
        except OSError:
            children = []
        if not children:
            folders.append(path)  # read_run says it holds no results.json
            continue
        found, left_out = [], []
        for child in children:
            try:
                read_run(child)
            except AggregateError as err:
                left_out.append(str(err).split("; ")[0])
            else:
                found.append(child)
        if not found:
            raise AggregateError(
                f"{path} holds no results.json and none of its subfolders a finished run ("
                + "; ".join(left_out)
                + "); pass the output folders of finished runs"
            )
        folders += found
        note = (
            f"{path}: {len(found)} finished run{'' if len(found) == 1 else 's'} "
            f"({', '.join(c.name for c in found)})"
        )
        if left_out:
            note += f"; left out: {'; '.join(left_out)}"
        notes.append(note)
    return folders, notes
