"""Run checkpoints: plain tensors and Python values, loadable with ``weights_only=True``.

Avalanche's own ``save_checkpoint`` pickles the whole strategy with dill, which fails under
torch 2.14 (DESIGN.md section 6). A checkpoint here holds exactly what a run needs to continue
after experience k as if it had never stopped: the learned parts of the model, the class
statistics, the plugins' per-task choices, Avalanche's clock and forgetting-metric state,
the RNG states, the metric history and the results so far.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

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
    model.gaussians.class_ids = gaussians["class_ids"].to(device)
    model.gaussians.means = gaussians["means"].to(device)
    model.gaussians.chols = gaussians["chols"].to(device)
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
def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def checkpoint_path(folder: Path, completed: int) -> Path:
    """``folder/exp_<k>.pt`` for a checkpoint taken after ``completed`` experiences."""
    return Path(folder) / f"exp_{completed:03d}.pt"


def list_checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    """``(completed, path)`` of every checkpoint in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(state: Dict[str, Any], folder: Path, keep: int = 2) -> Path:
    """Write ``state`` atomically as ``exp_<completed>.pt``; keep the newest ``keep`` files."""
    path = checkpoint_path(folder, state["completed"])
    save_atomic({**state, "format": FORMAT_VERSION}, path)
    for _, old in list_checkpoints(folder)[keep:]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read one checkpoint (``weights_only=True``); ``CheckpointError`` if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an avalanche-cliphinge checkpoint of format "
                              f"{FORMAT_VERSION}")
    return state


def load_latest(folder: Path, warn=print) -> Optional[Dict[str, Any]]:
    """The newest readable checkpoint in ``folder``; falls back past corrupt ones (with a
    message through ``warn``). ``None`` when the folder holds none; ``CheckpointError`` when
    every file is unreadable."""
    found = list_checkpoints(folder)
    errors = []
    for _, path in found:
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
            warn(f"{err}; trying the previous checkpoint")
            continue
        return state
    if errors:
        raise CheckpointError(f"no usable checkpoint in {folder}: {errors[-1]}; start again "
                              "with --overwrite")
    return None


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``key: saved -> current`` for every config key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]
