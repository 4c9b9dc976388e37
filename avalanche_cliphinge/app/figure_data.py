"""What the figures show, worked out from a run's records before anything is drawn.

Classes seen after each task and the x axis they make, the titles of a run's figures from
its protocol, ragged rows of accuracies as a matrix, a confusion matrix's rows in percent,
and which curves coincide (drawn once). Plain numbers and strings: no matplotlib here
(``figures`` draws them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: Readable names of the stream's ``dataset`` entries.
DATASET_NAMES = {
    "cifar100": "CIFAR-100",
    "imagenet-r": "ImageNet-R",
    "synthetic coloured patterns": "synthetic patterns",
}
#: Curves closer than this everywhere (percentage points) are one line (``coinciding``).
COINCIDE_TOL = 1e-6


def classes_seen(classes_per_task: Sequence[int]) -> List[int]:
    """Classes seen after each task, ``[n_tasks]``: the running sum of ``classes_per_task``
    (``[n_tasks]``)."""
    return [int(v) for v in np.cumsum(classes_per_task)]


def stream_title(stream: Mapping[str, Any], method: str = "CLIPHinge") -> str:
    """``"CLIPHinge, CIFAR-100 B0 Inc10"`` from a stream's protocol (``dataset``,
    ``init_class``, ``increment``); what is missing is left out."""
    dataset = stream.get("dataset")
    parts = [method] if dataset is None else [f"{method}, {DATASET_NAMES.get(dataset, dataset)}"]
    init, increment = stream.get("init_class"), stream.get("increment")
    if init is not None and increment is not None:
        parts.append(f"B{0 if init == increment else init} Inc{increment}")
    return " ".join(parts)


def run_title(protocol: Mapping[str, Any], method: str = "CLIPHinge") -> str:
    """Title of a run's figures from its ``results.json`` protocol: method, dataset, task
    layout and the preset or config file (``"CLIPHinge, CIFAR-100 B0 Inc10 (preset ...)"``)."""
    stream = {
        key[len("stream_") :]: value for key, value in protocol.items() if key.startswith("stream_")
    }
    title = stream_title(stream, method)
    if protocol.get("preset"):
        return f"{title} (preset {protocol['preset']})"
    if protocol.get("config_file"):
        return f"{title} ({Path(str(protocol['config_file'])).stem})"
    return title


def x_axis(n_tasks: int, classes_per_task: Optional[Sequence[int]]) -> Tuple[List[int], str]:
    """x values and label: classes seen after each task, else the task number."""
    if classes_per_task is not None:
        return classes_seen(classes_per_task)[:n_tasks], "number of classes seen"
    return list(range(1, n_tasks + 1)), "tasks trained"


def as_matrix(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    """Rows of possibly different lengths with ``None`` -> float ``[rows, max length]``,
    NaN where nothing was measured."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for t, row in enumerate(rows):
        out[t, : len(row)] = [np.nan if v is None else float(v) for v in row]
    return out


def row_percent(confusion: np.ndarray) -> np.ndarray:
    """``[C, C]`` counts -> percent of each row (true class); NaN rows without samples."""
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * counts / totals, np.nan)


def coinciding(
    curves: Mapping[str, Sequence[Optional[float]]], tol: float = COINCIDE_TOL
) -> List[List[str]]:
    """Names of ``curves`` grouped by equal curves, each group and its members in the order
    of ``curves``: two curves are equal when they have the same length and every value
    differs by at most ``tol`` (``None``/NaN equal only ``None``/NaN).

    >>> coinciding({"a": [90.0, 50.0], "b": [90.0, 60.0], "c": [90.0, 50.0]})
    [['a', 'c'], ['b']]
    """
    values = {
        name: np.asarray([np.nan if v is None else float(v) for v in curve], dtype=float)
        for name, curve in curves.items()
    }
    found: List[List[str]] = []
    for name, curve in values.items():
        for members in found:
            other = values[members[0]]
            if other.shape == curve.shape and bool(
                np.all((np.abs(other - curve) <= tol) | (np.isnan(other) & np.isnan(curve)))
            ):
                members.append(name)
                break
        else:
            found.append([name])
    return found
