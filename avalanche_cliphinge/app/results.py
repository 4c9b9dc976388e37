"""Class-incremental metrics from the accuracy matrix and the results report (the plots:
``figures``).

``acc[t][j]`` is the accuracy (percent) on the test classes of task ``j`` after training task
``t``, as Avalanche's ``Top1_Acc_Exp`` measures it on test experience ``j``. Definitions
(the README's metrics): ``A_t`` = accuracy over all classes seen after task t (the size-weighted
mean of ``acc[t][:t+1]``); AIA = mean_t A_t ("Avg" in papers); Last = A_T;
AA = mean_j acc[T][j]; Forgetting = mean_{j<T} (max_{j<=t<T} acc[t][j] - acc[T][j]).
Avalanche's ``StreamForgetting`` (accuracy right after learning minus the last) is different
and is reported under its own name.
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
    acc = np.asarray(row[:task + 1], dtype=float)
    n = np.asarray(sizes[:task + 1], dtype=float)
    old = float((acc[:-1] * n[:-1]).sum() / n[:-1].sum()) if task > 0 else None
    return {"all": float((acc * n).sum() / n.sum()), "tasks": acc.tolist(), "old": old,
            "new": float(acc[-1])}


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
    return {"AIA": float(np.mean(curve)), "AA": float(np.mean(acc[last, :last + 1])),
            "Last": curve[-1], "Forgetting": forgetting}


def format_results(per_task: List[Dict[str, object]], metrics: Dict[str, float],
                   stream_forgetting: Optional[float], protocol: Dict[str, object]) -> str:
    """The text report: grouped accuracy after every task, then the summary and protocol."""
    lines = ["Grouped accuracy (%) after each task: all seen classes | old | new | per task"]
    for t, g in enumerate(per_task):
        old = "  -  " if g["old"] is None else f"{g['old']:6.2f}"
        tasks = " ".join(f"{a:6.2f}" for a in g["tasks"])
        lines.append(f"task {t:2d}: all {g['all']:6.2f} | old {old} | new {g['new']:6.2f} | "
                     f"{tasks}")
    lines += ["", "Summary (%):",
              f"  AIA (avg incremental acc) {metrics['AIA']:.2f}",
              f"  AA  (avg acc after last)  {metrics['AA']:.2f}",
              f"  Last                      {metrics['Last']:.2f}",
              f"  Forgetting (max - last)   {metrics['Forgetting']:.2f}"]
    if stream_forgetting is not None:
        lines.append(f"  Avalanche StreamForgetting (first - last) {stream_forgetting:.2f}")
    lines += ["", "Protocol:"]
    for key, value in protocol.items():
        if key != "config":
            lines.append(f"  {key}: {value}")
    return "\n".join(lines) + "\n"
