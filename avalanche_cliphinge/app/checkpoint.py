"""Run checkpoints: plain tensors and Python values, loadable with ``weights_only=True``.

Avalanche's own ``save_checkpoint`` pickles the whole strategy with dill, which fails under
torch 2.14 (optimizer classes pickled by value). A checkpoint here holds exactly what a run
needs to continue after experience k as if it had never stopped: the learned parts of the
model (prompts, class Gaussians, stage-2 heads, image adapter, LoRA adapters; the frozen CLIP
is rebuilt from the config), Avalanche's clock and forgetting-metric state, the RNG states, the metric history
and results so far, the CSV line counts, the config and the stream's shape. The file
``checkpoints/exp_<k>.pt`` is written after experience k (0-based) through a temporary file
and a rename; the newest two are kept.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import remove_temp_files, save_atomic
from ..errors import CheckpointError, load_failure
from ..kill_points import kill_point
from ..metrics import SeenClassesStreamAccuracy

# a checkpoint's "model" entry is the saved-model format's learned state
from ..model.saving import learned_state as model_state  # noqa: F401
from ..model.saving import restore_learned_state as load_model_state  # noqa: F401

FORMAT_VERSION = 1
_NAME = re.compile(r"^exp_(\d{3})\.pt$")


# ---- RNG ------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- Avalanche state ------------------------------------------------------------------------
_CLOCK_FIELDS = (
    "train_iterations",
    "train_exp_counter",
    "train_exp_epochs",
    "train_exp_iterations",
    "train_epoch_iterations",
    "total_iterations",
)


def clock_state(clock) -> Dict[str, int]:
    """Avalanche ``Clock`` counters (they give TensorBoard its x axis)."""
    return {f: int(getattr(clock, f)) for f in _CLOCK_FIELDS}


def set_clock_state(clock, state: Dict[str, int]) -> None:
    """Restore ``clock_state`` output."""
    for field, value in state.items():
        setattr(clock, field, value)


def evaluator_state(evaluator) -> List[Optional[Dict[str, Any]]]:
    """The memory of Avalanche's forgetting/BWT metrics (first and last accuracy per exp)
    and the classes trained so far of ``SeenClassesStreamAccuracy``."""
    states = []
    for metric in evaluator.metrics:
        inner = getattr(metric, "forgetting", None)
        if isinstance(metric, SeenClassesStreamAccuracy):
            states.append({"seen": sorted(int(c) for c in metric.seen)})
            continue
        if inner is None:
            states.append(None)
            continue
        states.append(
            {
                "initial": {int(k): float(v) for k, v in inner.initial.items()},
                "last": {int(k): float(v) for k, v in inner.last.items()},
                "train_exp_id": getattr(metric, "train_exp_id", None),
            }
        )
    return states


def set_evaluator_state(evaluator, states: List[Optional[Dict[str, Any]]]) -> None:
    """Restore ``evaluator_state`` output into an evaluator built the same way."""
    for metric, state in zip(evaluator.metrics, states):
        if isinstance(metric, SeenClassesStreamAccuracy) and state and "seen" in state:
            metric.seen = set(state["seen"])
            continue
        if state is None or getattr(metric, "forgetting", None) is None:
            continue
        metric.forgetting.initial = dict(state["initial"])
        metric.forgetting.last = dict(state["last"])
        metric.train_exp_id = state["train_exp_id"]


# ---- files ----------------------------------------------------------------------------------
#: Config keys that change how fast a run goes, not its numbers: a resume may change them.
RUNTIME_KEYS = ("num_workers", "feature_cache_dir", "feature_cache_max_gb")
#: What every checkpoint holds (``load_checkpoint`` refuses a file without one of them).
REQUIRED_KEYS = ("completed", "config", "model", "clock", "evaluator", "rng", "run", "csv_rows")


def checkpoint_path(folder: Path, experience: int) -> Path:
    """``folder/exp_<k>.pt``: the checkpoint taken after training and evaluating experience
    ``k`` (0-based, as Avalanche's ``Exp<k>`` metric names)."""
    return Path(folder) / f"exp_{experience:03d}.pt"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint file name (``exp_<k>.pt``)."""
    return bool(_NAME.match(name))


def list_checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    """``(experience, path)`` of every checkpoint in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(state: Dict[str, Any], folder: Path, keep: int = 2) -> Path:
    """Write ``state`` atomically as ``exp_<completed - 1>.pt``; keep the newest ``keep``.

    The older file goes only after the new one is complete, so a crash at any moment
    leaves at least one whole checkpoint. Temporary files of a killed save are removed.
    """
    folder = Path(folder)
    experience = state["completed"] - 1
    path = checkpoint_path(folder, experience)
    remove_temp_files(folder, is_checkpoint_name)
    save_atomic({**state, "format": FORMAT_VERSION}, path, experience=experience)
    kill_point("checkpoint", experience)
    prune_checkpoints(folder, keep)
    return path


def prune_checkpoints(folder: Path, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` checkpoints (a save killed after its rename left
    one too many)."""
    for _, old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read one checkpoint (``weights_only=True``); ``CheckpointError`` naming the file if it
    is unreadable, truncated, or not a checkpoint of this package."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({load_failure(err)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not an avalanche-cliphinge checkpoint of format {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {', '.join(missing)})")
    problem = _structure_problem(state)
    match = _NAME.match(Path(path).name)
    if problem is None and match and int(match.group(1)) + 1 != state["completed"]:
        problem = f"completed={state['completed']} in a file named {Path(path).name}"
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged or forged ({problem})")
    state["path"] = str(path)
    return state


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _structure_problem(state: Dict[str, Any]) -> Optional[str]:
    """The first field of a loaded checkpoint that does not have the shape ``save_checkpoint``
    writes, or ``None``. Checked before anything of the checkpoint is used."""
    done = state["completed"]
    if not _is_int(done) or done < 1:
        return f"completed={done!r} is not a positive experience count"
    if not isinstance(state["config"], dict):
        return f"config is a {type(state['config']).__name__}, not a mapping of keys"
    model = state["model"]
    if not isinstance(model, dict) or not {
        "task_classes",
        "prompts",
        "gaussians",
        "heads",
        "head_scales",
        "adapter",
        "lora",
    } <= set(model):
        return "model lacks some of its parts"
    tasks, prompts = model["task_classes"], model["prompts"]
    if not (
        isinstance(tasks, list)
        and len(tasks) == done
        and all(isinstance(t, list) and t and all(map(_is_int, t)) for t in tasks)
    ):
        return f"model.task_classes is not {done} lists of class ids"
    if not (
        isinstance(prompts, list)
        and len(prompts) == done
        and all(
            isinstance(p, torch.Tensor) and p.dim() == 3 and p.shape[0] == len(t)
            for p, t in zip(prompts, tasks)
        )
    ):
        return f"model.prompts is not {done} tensors [classes of the task, n_ctx, width]"
    gaussians = model["gaussians"]
    if not (
        isinstance(gaussians, dict)
        and all(isinstance(gaussians.get(k), torch.Tensor) for k in ("class_ids", "means"))
    ):
        return "model.gaussians lacks class_ids or means"
    clock = state["clock"]
    if not (
        isinstance(clock, dict)
        and set(clock) == set(_CLOCK_FIELDS)
        and all(_is_int(v) and v >= 0 for v in clock.values())
    ):
        return "clock is not Avalanche's counters"
    rng = state["rng"]
    if not (
        isinstance(rng, dict)
        and isinstance(rng.get("torch"), torch.Tensor)
        and isinstance(rng.get("python"), list)
        and len(rng["python"]) == 3
        and isinstance(rng["python"][1], list)
        and len(rng["python"][1]) == 625
        and isinstance(rng.get("numpy"), list)
        and len(rng["numpy"]) == 5
        and isinstance(rng["numpy"][1], torch.Tensor)
        and rng["numpy"][1].numel() == 624
    ):
        return "rng lacks the python, numpy or torch generator state"
    run = state["run"]
    if not isinstance(run, dict) or not {
        "matrix",
        "per_task",
        "stream_forgetting",
        "hard_pairs",
    } <= set(run):
        return "run lacks the results so far"
    matrix = run["matrix"]
    if not (
        isinstance(matrix, list)
        and len(matrix) == done
        and all(isinstance(row, list) and len(row) == len(matrix[0]) >= done for row in matrix)
    ):
        return f"run.matrix is not {done} rows of one accuracy per test experience"
    if any(
        not isinstance(run[k], list) or len(run[k]) != done
        for k in ("per_task", "stream_forgetting", "hard_pairs")
    ):
        return f"run.per_task, stream_forgetting or hard_pairs do not hold {done} entries"
    rows = state["csv_rows"]
    if not (
        isinstance(rows, dict)
        and all(isinstance(k, str) and _is_int(v) and v >= 1 for k, v in rows.items())
    ):
        return "csv_rows is not a line count per CSV file"
    if not isinstance(state["evaluator"], list):
        return "evaluator is not a list of metric states"
    return None


def load_latest(folder: Path, warn: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """The newest readable checkpoint in ``folder`` (its file name under ``"path"``).

    A corrupt or truncated newest file is skipped with a message through ``warn`` and the
    previous one is used. Returns ``None`` when the folder holds no checkpoint; raises
    ``CheckpointError`` when every checkpoint is unreadable.
    """
    found = list_checkpoints(folder)
    bad: List[Tuple[Path, str]] = []
    for _, path in found:
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            bad.append((path, str(err)))
            continue
        if bad:
            warn(
                f"warning: {'; '.join(e for _, e in bad)}; resuming from the previous "
                f"checkpoint {path.name} instead"
            )
        return state
    if bad:
        names = ", ".join(p.name for p, _ in bad)
        raise CheckpointError(
            f"no usable checkpoint in {folder}: {names} cannot be read "
            "(corrupt, truncated or not a checkpoint); start again with "
            "--overwrite"
        )
    return None


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``key: saved -> current`` for every config key whose value differs (the keys in
    ``RUNTIME_KEYS``, which do not change results, are not compared)."""
    keys = sorted((set(saved) | set(current)) - set(RUNTIME_KEYS))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
