"""Run checkpoints: plain tensors and Python values, loadable with ``weights_only=True``.

Avalanche's own ``save_checkpoint`` pickles the whole strategy with dill, which fails under
torch 2.14 (DESIGN.md section 6). A checkpoint here holds exactly what a run needs to continue
after experience k as if it had never stopped: the learned parts of the model (prompts, class
Gaussians, stage-2 heads, image adapter, LoRA adapters; the frozen CLIP is rebuilt from the
config), Avalanche's clock and forgetting-metric state, the RNG states, the metric history
and results so far, the CSV line counts, the config and the stream's shape. The file
``checkpoints/exp_<k>.pt`` is written after experience k (0-based) through a temporary file
and a rename; the newest two are kept.
"""
from __future__ import annotations

import errno
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .atomic import kill_point, remove_temp_files, write_atomic
from .model.clip_hinge import CLIPHingeModel
from .model.heads import ImageAdapter, TaskHead

FORMAT_VERSION = 1
_NAME = re.compile(r"^exp_(\d{3})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, or from another run)."""


# ---- model ----------------------------------------------------------------------------------
def model_state(model: CLIPHingeModel) -> Dict[str, Any]:
    """The learned and fitted parts of ``model`` (the frozen CLIP is not saved)."""
    lora = {}
    if model.lora is not None:
        for name in model.lora.adapters:
            lora[name] = {n: p.detach().cpu() for n, p in model.clip.visual.named_parameters()
                          if f".{name}." in n and "lora_" in n}
    return {
        "task_classes": [list(c) for c in model.task_classes],
        "prompts": [p.ctx.detach().cpu() for p in model.prompts],
        "gaussians": {k: v.detach().cpu() for k, v in model.gaussians.state_dict().items()},
        "heads": {k: {n: t.detach().cpu() for n, t in h.state_dict().items()}
                  for k, h in model.heads.items()},
        "head_scales": {k: h.logit_scale for k, h in model.heads.items()},
        "adapter": None if model.adapter is None else {
            k: v.detach().cpu() for k, v in model.adapter.state_dict().items()},
        "lora": lora,
    }


def load_model_state(model: CLIPHingeModel, state: Dict[str, Any]) -> None:
    """Rebuild the tasks of a fresh ``model`` from ``model_state`` output."""
    if model.n_tasks:
        raise CheckpointError("load_model_state needs a fresh model with no tasks")
    device = model.column_of.device
    for classes, ctx in zip(state["task_classes"], state["prompts"]):
        task = model.add_task(classes)
        with torch.no_grad():
            model.prompts[task].ctx.copy_(ctx.to(device))
    model.set_trainable_prompts([])
    gaussians = state["gaussians"]
    model.gaussians.load_state_dict(gaussians)
    for key, head_state in state["heads"].items():
        n_classes, dim = head_state["linear.weight"].shape
        head = TaskHead(torch.zeros(n_classes, dim), state["head_scales"][key]).to(device)
        head.load_state_dict(head_state)
        head.requires_grad_(False)
        model.heads[key] = head
    if state["adapter"] is not None:
        if model.adapter is None:
            model.adapter = ImageAdapter(model.backbone.embed_dim).to(device)
        model.adapter.load_state_dict(state["adapter"])
    for name, params in state["lora"].items():
        model.lora.add(name)
        named = dict(model.clip.visual.named_parameters())
        with torch.no_grad():
            for key, value in params.items():
                named[key].copy_(value.to(device))
                named[key].requires_grad_(False)


# ---- RNG ------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
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
_CLOCK_FIELDS = ("train_iterations", "train_exp_counter", "train_exp_epochs",
                 "train_exp_iterations", "train_epoch_iterations", "total_iterations")


def clock_state(clock) -> Dict[str, int]:
    """Avalanche ``Clock`` counters (they give TensorBoard its x axis)."""
    return {f: int(getattr(clock, f)) for f in _CLOCK_FIELDS}


def set_clock_state(clock, state: Dict[str, int]) -> None:
    """Restore ``clock_state`` output."""
    for field, value in state.items():
        setattr(clock, field, value)


def evaluator_state(evaluator) -> List[Optional[Dict[str, Any]]]:
    """The memory of Avalanche's forgetting/BWT metrics (first and last accuracy per exp)."""
    states = []
    for metric in evaluator.metrics:
        inner = getattr(metric, "forgetting", None)
        if inner is None:
            states.append(None)
            continue
        states.append({"initial": {int(k): float(v) for k, v in inner.initial.items()},
                       "last": {int(k): float(v) for k, v in inner.last.items()},
                       "train_exp_id": getattr(metric, "train_exp_id", None)})
    return states


def set_evaluator_state(evaluator, states: List[Optional[Dict[str, Any]]]) -> None:
    """Restore ``evaluator_state`` output into an evaluator built the same way."""
    for metric, state in zip(evaluator.metrics, states):
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


def save_atomic(obj: Any, path: Path, experience: Optional[int] = None) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file, fsync, rename).

    torch reports a full disk as ``RuntimeError`` (``inline_container.cc ... unexpected
    pos``); it is raised as an ``OSError`` naming ``path``.
    """
    def write(file):
        try:
            torch.save(obj, file)
        except RuntimeError as err:
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            raise OSError(errno.EIO, f"torch.save failed, disk full? ({reason})",
                          str(path)) from None

    write_atomic(path, "wb", write, kill_tag="checkpoint" if experience is not None else None,
                 experience=experience)


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
        reason = (str(err).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an avalanche-cliphinge checkpoint of format "
                              f"{FORMAT_VERSION}")
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
    if not isinstance(model, dict) or not {"task_classes", "prompts", "gaussians", "heads",
                                           "head_scales", "adapter", "lora"} <= set(model):
        return "model lacks some of its parts"
    tasks, prompts = model["task_classes"], model["prompts"]
    if not (isinstance(tasks, list) and len(tasks) == done
            and all(isinstance(t, list) and t and all(map(_is_int, t)) for t in tasks)):
        return f"model.task_classes is not {done} lists of class ids"
    if not (isinstance(prompts, list) and len(prompts) == done and all(
            isinstance(p, torch.Tensor) and p.dim() == 3 and p.shape[0] == len(t)
            for p, t in zip(prompts, tasks))):
        return f"model.prompts is not {done} tensors [classes of the task, n_ctx, width]"
    gaussians = model["gaussians"]
    if not (isinstance(gaussians, dict) and all(isinstance(gaussians.get(k), torch.Tensor)
                                                for k in ("class_ids", "means", "chols"))):
        return "model.gaussians lacks class_ids, means or chols"
    clock = state["clock"]
    if not (isinstance(clock, dict) and set(clock) == set(_CLOCK_FIELDS)
            and all(_is_int(v) and v >= 0 for v in clock.values())):
        return "clock is not Avalanche's counters"
    rng = state["rng"]
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
            and isinstance(rng.get("python"), list) and len(rng["python"]) == 3
            and isinstance(rng["python"][1], list) and len(rng["python"][1]) == 625
            and isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 5
            and isinstance(rng["numpy"][1], torch.Tensor) and rng["numpy"][1].numel() == 624):
        return "rng lacks the python, numpy or torch generator state"
    run = state["run"]
    if not isinstance(run, dict) or not {"matrix", "per_task", "stream_forgetting",
                                         "hard_pairs"} <= set(run):
        return "run lacks the results so far"
    matrix = run["matrix"]
    if not (isinstance(matrix, list) and len(matrix) == done
            and all(isinstance(row, list) and len(row) == len(matrix[0]) >= done
                    for row in matrix)):
        return f"run.matrix is not {done} rows of one accuracy per test experience"
    if any(not isinstance(run[k], list) or len(run[k]) != done
           for k in ("per_task", "stream_forgetting", "hard_pairs")):
        return f"run.per_task, stream_forgetting or hard_pairs do not hold {done} entries"
    rows = state["csv_rows"]
    if not (isinstance(rows, dict) and all(isinstance(k, str) and _is_int(v) and v >= 1
                                           for k, v in rows.items())):
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
            warn(f"warning: {'; '.join(e for _, e in bad)}; resuming from the previous "
                 f"checkpoint {path.name} instead")
        return state
    if bad:
        names = ", ".join(p.name for p, _ in bad)
        raise CheckpointError(f"no usable checkpoint in {folder}: {names} cannot be read "
                              "(corrupt, truncated or not a checkpoint); start again with "
                              "--overwrite")
    return None


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``key: saved -> current`` for every config key whose value differs (the keys in
    ``RUNTIME_KEYS``, which do not change results, are not compared)."""
    keys = sorted((set(saved) | set(current)) - set(RUNTIME_KEYS))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]
