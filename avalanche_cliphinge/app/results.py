"""Class-incremental metrics from the accuracy matrix and the results report (the plots:
``figures``).

``acc[t][j]`` is the accuracy (percent) on the test classes of task ``j`` after training task
``t``, as Avalanche's ``Top1_Acc_Exp`` measures it on test experience ``j``. Definitions (as
in docs/experiments.md): ``A_t`` = accuracy over all classes seen after task t (the
size-weighted mean of ``acc[t][:t+1]``); AIA = mean_t A_t ("Avg" in papers); Last = A_T;
AA = mean_j acc[T][j]; Forgetting = mean_{j<T} (max_{j<=t<T} acc[t][j] - acc[T][j]).
Avalanche's ``StreamForgetting`` (accuracy right after learning minus the last) is different
and is reported under its own name. An upper bound, trained once on every class, has one row:
``upper_bound_metrics`` (Last and AA; no AIA, no forgetting).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


def grouped_accuracy(row: Sequence[float], sizes: Sequence[int], task: int) -> Dict[str, object]:
    """Accuracies after training ``task`` from one row of the matrix.

    Args:
        row: ``acc[task][j]`` for every test experience ``j`` (percent).
        sizes: number of test samples of each experience.
        task: index of the task just trained.

    Returns:
        ``{"all": A_t, "tasks": [acc[task][0..task]], "old": size-weighted accuracy over tasks
        before ``task`` (None for task 0), "new": acc[task][task]}``.
    """
    acc = np.asarray(row[: task + 1], dtype=float)
    n = np.asarray(sizes[: task + 1], dtype=float)
    old = float((acc[:-1] * n[:-1]).sum() / n[:-1].sum()) if task > 0 else None
    return {
        "all": float((acc * n).sum() / n.sum()),
        "tasks": acc.tolist(),
        "old": old,
        "new": float(acc[-1]),
    }


def cil_metrics(matrix: Sequence[Sequence[float]], sizes: Sequence[int]) -> Dict[str, float]:
    """AIA, AA, Last and Forgetting (percent) of a square-or-taller accuracy matrix.

    Args:
        matrix: ``[tasks_trained][test_experiences]`` accuracies in percent; row t is the
            evaluation after task t (only rows trained so far need to be present).
        sizes: test samples per experience.
    """
    acc = np.asarray(matrix, dtype=float)
    last = acc.shape[0] - 1
    curve = [grouped_accuracy(acc[t], sizes, t)["all"] for t in range(last + 1)]
    forgetting = 0.0
    if last > 0:
        # Best accuracy on task j over the evaluations after it was learned and before the
        # last (j <= t < T); rows t < j, before task j was trained, do not count.
        learned = np.tril(np.ones((last, last), dtype=bool))
        best = np.where(learned, acc[:last, :last], -np.inf).max(axis=0)
        forgetting = float(np.mean(best - acc[last, :last]))
    return {
        "AIA": float(np.mean(curve)),
        "AA": float(np.mean(acc[last, : last + 1])),
        "Last": curve[-1],
        "Forgetting": forgetting,
    }


def upper_bound_metrics(row: Sequence[float], sizes: Sequence[int]) -> Dict[str, Optional[float]]:
    """The metrics of an upper bound: one evaluation after training on every class at once.

    Args:
        row: ``[test_experiences]`` accuracies in percent of that one evaluation.
        sizes: test samples per experience.

    Returns:
        ``Last`` = size-weighted accuracy over every test experience, ``AA`` = their mean;
        ``AIA`` and ``Forgetting`` ``None``: there is no sequence of tasks to average over
        and nothing learned earlier to forget.
    """
    acc = np.asarray(row, dtype=float)
    n = np.asarray(sizes, dtype=float)
    if acc.shape != n.shape or not len(acc):
        raise ValueError(f"expected one accuracy per test experience, got {len(acc)} for {len(n)}")
    return {
        "AIA": None,
        "AA": float(acc.mean()),
        "Last": float((acc * n).sum() / n.sum()),
        "Forgetting": None,
    }


def format_results(
    per_task: List[Dict[str, object]],
    metrics: Dict[str, float],
    stream_forgetting: Optional[float],
    protocol: Dict[str, object],
) -> str:
    """The short report: grouped accuracy after every task, the summary and the protocol
    (without the config)."""
    lines = ["Grouped accuracy (%) after each task: all seen classes | old | new | per task"]
    for t, g in enumerate(per_task):
        old = "  -  " if g["old"] is None else f"{g['old']:6.2f}"
        tasks = " ".join(f"{a:6.2f}" for a in g["tasks"])
        lines.append(
            f"task {t:2d}: all {g['all']:6.2f} | old {old} | new {g['new']:6.2f} | {tasks}"
        )
    lines += [
        "",
        "Summary (%):",
        f"  AIA (avg incremental acc) {metrics['AIA']:.2f}",
        f"  AA  (avg acc after last)  {metrics['AA']:.2f}",
        f"  Last                      {metrics['Last']:.2f}",
        f"  Forgetting (max - last)   {metrics['Forgetting']:.2f}",
    ]
    if stream_forgetting is not None:
        lines.append(f"  Avalanche StreamForgetting (first - last) {stream_forgetting:.2f}")
    lines += ["", "Protocol:"]
    for key, value in protocol.items():
        if key != "config":
            lines.append(f"  {key}: {value}")
    return "\n".join(lines) + "\n"


def format_report(summary: Dict[str, object]) -> str:
    """``results.txt``: everything ``results.json`` holds, for reading.

    The grouped accuracy per task, the summary metrics, the accuracy matrix (``-`` for tasks
    not trained yet), Avalanche's stream accuracy over seen classes, the hard pairs with class
    names, the times and the protocol with the full config.
    """
    text = format_results(
        summary["per_task"],
        summary["metrics"],
        summary["avalanche_stream_forgetting"],
        summary["protocol"],
    )
    head, protocol = text.split("\nProtocol:\n")
    matrix = summary["accuracy_matrix"]
    lines = [
        head.rstrip("\n"),
        "",
        "Accuracy matrix (%): row = task trained, column = task evaluated",
    ]
    width = len(matrix[0]) if matrix else 0
    lines.append("        " + " ".join(f"{j:>6d}" for j in range(width)))
    for t, row in enumerate(matrix):
        lines.append(
            f"task {t:2d} " + " ".join("     -" if a is None else f"{a:6.2f}" for a in row)
        )
    seen = summary.get("seen_stream_accuracy") or []
    if any(v is not None for v in seen):
        lines += [
            "",
            "Top1_Acc_Stream_SeenClasses (%) after each task: "
            + " ".join("-" if v is None else f"{100 * v:.2f}" for v in seen),
        ]
    lines += ["", "Hard pairs (old class -> new class, similarity) chosen at each task:"]
    for t, pairs in enumerate(summary["hard_pairs"]):
        for kind in ("text", "image"):
            chosen = pairs.get(kind, [])
            lines.append(f"  task {t:2d} {kind}: {len(chosen) or 'none'}")
            lines += [f"    {_pair_text(p)}" for p in chosen]
    lines += [
        "",
        f"Time: training {summary['train_seconds']:.1f} s, training and evaluation "
        f"{summary['wall_seconds']:.1f} s",
        "",
        "Protocol:",
        protocol.rstrip("\n"),
    ]
    config = summary["protocol"].get("config")
    if config:
        lines += ["  config:"] + [f"    {k}: {v}" for k, v in config.items()]
    return "\n".join(lines) + "\n"


def _pair_text(pair) -> str:
    """``old_name (id) -> new_name (id) 0.87`` for a named pair; ``old -> new`` for a bare
    ``[old, new, similarity]`` list of an older results file."""
    if isinstance(pair, dict):
        return (
            f"{pair['old_name']} ({pair['old']}) -> {pair['new_name']} ({pair['new']}) "
            f"{pair['similarity']:.3f}"
        )
    return f"{pair[0]} -> {pair[1]}"
