"""A trained ``CLIPHingeModel`` as one file: save it, load it anywhere, predict with it.

The file holds what training produced (prompts, class Gaussians, stage-2 heads, image adapter,
LoRA adapters), the class names and task order, the config and the backbone's identity
(architecture, weights tag or file and its SHA-256). The frozen CLIP weights are not in it,
except random ones (``pretrained=None``), which no tag or file could rebuild. Everything is
plain tensors and Python values, so ``torch.load(weights_only=True)`` reads it.

``CLIPHingeModel.save`` and ``CLIPHingeModel.load`` use it; it knows the model only by the
attributes it reads and writes, so the model's module imports this one and not the reverse.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import torch
from torch import nn

from ..atomic import save_atomic
from ..config import CLIPHingeConfig
from ..errors import load_failure
from .backbone import CLIPBackbone, load_clip
from .heads import ImageAdapter, TaskHead

#: Written into every saved model; ``read_saved_model`` refuses other values.
MODEL_FORMAT = "avalanche-cliphinge model 1"


class SavedModelError(ValueError):
    """A saved-model file that cannot be used (another format, other weights, damaged)."""


#: open_clip's notice when it builds an architecture without weights (a root-logger warning).
_RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RANDOM_INIT_NOTICE)


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning while a saved model's backbone is built.

    Loading a saved model builds the architecture without weights and then fills it (from
    the file, or from a TorchScript archive), so the notice would be false. Only that message
    is dropped, and only meanwhile; every other log record passes.
    """
    root = logging.getLogger()  # open_clip logs through logging.warning: the root logger
    quiet = _DropRandomInitNotice()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _ids_without_names(task_classes, names) -> List[int]:
    """The learned class ids (``task_classes``: ids per task) that ``names`` has no name for."""
    return sorted({int(c) for classes in task_classes for c in classes} - set(names))


def learned_state(model: nn.Module) -> Dict[str, Any]:
    """The learned and fitted parts of ``model`` (a ``CLIPHingeModel``) as CPU tensors (the
    frozen CLIP is not saved).

    Keys: ``task_classes`` (class ids per task), ``prompts`` (``[n_classes_of_task, n_ctx,
    width]`` per task), ``gaussians``, ``heads`` and ``head_scales`` (stage 2), ``adapter``,
    ``lora`` (per-task adapter weights).
    """
    lora = {}
    if model.lora is not None:
        for name in model.lora.adapters:
            lora[name] = {
                n: p.detach().cpu()
                for n, p in model.clip.visual.named_parameters()
                if f".{name}." in n and "lora_" in n
            }
    return {
        "task_classes": [list(c) for c in model.task_classes],
        "prompts": [p.ctx.detach().cpu() for p in model.prompts],
        "gaussians": {k: v.detach().cpu() for k, v in model.gaussians.state_dict().items()},
        "heads": {
            k: {n: t.detach().cpu() for n, t in h.state_dict().items()}
            for k, h in model.heads.items()
        },
        "head_scales": {k: h.logit_scale for k, h in model.heads.items()},
        "adapter": None
        if model.adapter is None
        else {k: v.detach().cpu() for k, v in model.adapter.state_dict().items()},
        "lora": lora,
    }


def restore_learned_state(model: nn.Module, state: Dict[str, Any]) -> None:
    """Rebuild the tasks of a fresh ``model`` (a ``CLIPHingeModel`` with no tasks yet) from
    ``learned_state`` output."""
    if model.n_tasks:
        raise SavedModelError("restoring a trained state needs a fresh model with no tasks")
    device = model.column_of.device
    for classes, ctx in zip(state["task_classes"], state["prompts"]):
        task = model.add_task(classes)
        with torch.no_grad():
            model.prompts[task].ctx.copy_(ctx.to(device))
    model.set_trainable_prompts([])
    # assign: the loaded factors become the model's (not copied: held once)
    model.gaussians.load_state_dict(state["gaussians"], assign=True)
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


def save_model(model: nn.Module, path: str | Path, config: CLIPHingeConfig) -> Path:
    """Write ``model`` (a ``CLIPHingeModel`` built from ``config``) to ``path`` atomically
    (``atomic.save_atomic``).

    Returns the path written.

    Raises:
        SavedModelError: a learned class id has no name, or the model has fewer class names
            than ``config``'s layout has classes (the file could not be loaded or used).
    """
    missing = _ids_without_names(model.task_classes, model.names)
    if missing:
        raise SavedModelError(
            f"cannot save {path}: class ids {missing} were learned but have no name (the "
            f"model has {len(model.names)} names); give the model a name for every class id"
        )
    if config.layout_is_set and len(model.names) < config.n_classes:
        raise SavedModelError(
            f"cannot save {path}: the model has {len(model.names)} class names but its config "
            f"has init_class + increment * (total_tasks - 1) = {config.n_classes} classes; "
            "build it with a name for every class id of the stream"
        )
    backbone = model.backbone
    payload = {
        "format": MODEL_FORMAT,
        "config": config.to_dict(),
        "class_names": dict(model.names),
        "backbone": {
            "model_name": backbone.model_name,
            "pretrained": backbone.pretrained,
            "weights_sha256": backbone.weights_sha256,
            "activation": backbone.activation,
        },
        "learned": learned_state(model),
        "frozen_clip": None
        if backbone.pretrained is not None
        else {k: v.detach().cpu() for k, v in model.clip.state_dict().items() if "lora_" not in k},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(payload, path)
    return path


class SavedModel(NamedTuple):
    """What ``read_saved_model`` found in a file: the model is ``build_model(config,
    class_names, backbone=backbone)`` with ``restore_learned_state(model, learned)``."""

    config: CLIPHingeConfig
    class_names: Dict[int, str]
    backbone: CLIPBackbone
    learned: Dict[str, Any]


def read_saved_model(
    path: str | Path, device: str | torch.device = "cpu", pretrained: Optional[str] = None
) -> SavedModel:
    """The parts of a model saved by ``save_model``, checked, its frozen CLIP loaded on
    ``device`` (``CLIPHingeModel.load`` builds the model from them).

    Args:
        path: the saved file (a run writes ``final_model.pt``).
        device: where to put it.
        pretrained: where to find the frozen CLIP weights when they are not where the
            training run found them (another machine): a tag or a file; a file must have the
            SHA-256 recorded at training time.

    Raises:
        SavedModelError: not a saved model, weights other than those trained with, or
            learned class ids without a name (a file from an older version, or edited).
    """
    path = Path(path)
    if not path.is_file():
        raise SavedModelError(
            f"saved model {path} does not exist; a finished run writes "
            "final_model.pt in its output folder"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged file, not a torch file...
        raise SavedModelError(
            f"{path} is not a readable saved model ({load_failure(err)}); pass "
            "final_model.pt of a run"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise SavedModelError(
            f"{path} is not a saved CLIPHinge model (expected format "
            f"'{MODEL_FORMAT}'); pass final_model.pt of a run"
        )
    config = CLIPHingeConfig.from_dict(payload["config"], source=str(path))
    names = payload["class_names"]
    if not isinstance(names, dict) or not all(
        isinstance(k, int) and isinstance(v, str) for k, v in names.items()
    ):
        raise SavedModelError(
            f"{path} is damaged: its class names are not {{class id: name}}; pass "
            "final_model.pt of a run"
        )
    missing = _ids_without_names(payload["learned"]["task_classes"], names)
    if missing:
        raise SavedModelError(
            f"{path}: class ids {missing} were learned but the file has no name for them "
            f"({len(names)} names); it was written by an older version or edited: save the "
            "trained model again with a name for every class"
        )
    identity = payload["backbone"]
    if payload["frozen_clip"] is not None:
        with _quiet_random_init():  # the weights come from the file, just below
            backbone = load_clip(identity["model_name"], None, device=device)
        backbone.model.load_state_dict(payload["frozen_clip"])
    else:
        with _quiet_random_init():  # a TorchScript archive fills a model built without weights
            backbone = load_clip(
                identity["model_name"],
                pretrained or identity["pretrained"],
                device=device,
                allow_activation_mismatch=config.allow_activation_mismatch,
            )
        recorded = identity["weights_sha256"]
        if recorded is not None and backbone.weights_sha256 != recorded:
            raise SavedModelError(
                f"{backbone.pretrained} has SHA-256 {backbone.weights_sha256}, but {path} was "
                f"trained on weights with {recorded}; pass the same file with pretrained=..."
            )
    return SavedModel(config, names, backbone, payload["learned"])
