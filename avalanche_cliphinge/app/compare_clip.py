"""The CLIP baselines of a comparison (issue 28): building them, counting what each learned,
describing them in the protocol.

``build_clip_baseline`` makes the ``avalanche_cliphinge.baselines`` strategy of a
``comparison.CLIP_BASELINES`` name around the comparison's loaded CLIP and its feature cache,
``count_trainable`` counts the scalars any entry learned (the table's "trainable parameters")
and ``clip_baselines_protocol`` says what each ran with.

RAPF runs with its released values (``baselines.rapf_config``) on the datasets RAPF released
configs for (CIFAR-100, ImageNet-R); on any other stream (the smoke stream, an image folder)
with its method values (replay volume, Euclidean hard pairs, threshold, hinge samples, margin,
fusion) but the comparison's schedule (batch, epochs, learning rates and their decay), as every
other entry: RAPF's batch of 100 for 15 epochs would give a smoke task of 60 images one step
per epoch.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..config import CLIPHingeConfig
from ..feature_cache import FeatureCache
from ..model.backbone import CLIPBackbone
from ..baselines import RAPF, CoOp, JointLinearProbe, JointTraining, SimpleCIL, learned_parameters
from ..baselines.joint import joint_config
from ..baselines.rapf import RAPF_RELEASED, rapf_config, rapf_release
from ..strategy import CLIPHingeStrategy, build_model
from .comparison import CLIP_BASELINES, CompareError

#: the datasets RAPF released configs for: there RAPF runs with them
RAPF_DATASETS = frozenset(key[0] for key in RAPF_RELEASED)
#: the config keys of the schedule RAPF takes from the comparison elsewhere
SCHEDULE_KEYS = (
    "batch_size",
    "init_epochs",
    "epochs",
    "init_lr",
    "lr",
    "lr_decay_epochs",
    "lr_decay_factor",
    "weight_decay",
)


def rapf_settings(config: CLIPHingeConfig) -> Tuple[CLIPHingeConfig, bool]:
    """``(config, released)`` for ``RAPF``: the comparison's config with RAPF's released values
    on its datasets; elsewhere ``rapf_config`` with the comparison's schedule (``released``
    false, the keys applied here)."""
    if config.dataset in RAPF_DATASETS:
        return config, True
    schedule = {key: getattr(config, key) for key in SCHEDULE_KEYS}
    return rapf_config(config).replace(**schedule), False


def build_clip_baseline(
    name: str,
    *,
    config: CLIPHingeConfig,
    class_names,
    backbone: CLIPBackbone,
    evaluator,
    device: str | torch.device,
    feature_cache: Optional[FeatureCache] = None,
):
    """The ``avalanche_cliphinge.baselines`` strategy of a ``CLIP_BASELINES`` name, around the
    comparison's ``backbone`` and ``feature_cache``.

    ``simplecil``, ``rapf`` (``rapf_settings``) and ``joint_probe`` take the backbone;
    ``coop`` and ``joint`` a model built around it (``joint`` on a copy when LoRA is on: it is
    injected in place).
    """
    common = dict(
        class_names=class_names, evaluator=evaluator, device=device, feature_cache=feature_cache
    )
    if name == "rapf":
        cfg, released = rapf_settings(config)
        return RAPF(config=cfg, released=released, backbone=backbone, **common)
    frozen = {"simplecil": SimpleCIL, "joint_probe": JointLinearProbe}
    if name in frozen:
        return frozen[name](config=config, backbone=backbone, **common)
    if name == "coop":
        model = CoOp.build_model(config, class_names, device, backbone=backbone)
        return CoOp(config=config, model=model, **common)
    if name == "joint":
        cfg = joint_config(config)
        if cfg.use_lora_in_second_stage and cfg.second_stage_epochs > 0:
            backbone = copy.deepcopy(backbone)
        model = build_model(cfg, class_names, device, backbone=backbone)
        return JointTraining(config=config, model=model, **common)
    raise CompareError(f"no CLIP baseline named '{name}'")


def count_trainable(strategy) -> int:
    """Scalars ``strategy`` learned: its own ``trainable_parameters()`` (the CLIP baselines),
    ``baselines.learned_parameters`` of a ``CLIPHingeStrategy``'s model (prompts, heads,
    adapter, LoRA; not the frozen CLIP), else the parameters of its model that require
    gradients (the Avalanche baselines' head; zero-shot CLIP has none)."""
    own = getattr(strategy, "trainable_parameters", None)
    if callable(own):
        return int(own())
    if isinstance(strategy, CLIPHingeStrategy):
        return int(learned_parameters(strategy.model))
    return int(sum(p.numel() for p in strategy.model.parameters() if p.requires_grad))


def clip_baselines_protocol(names: Sequence[str], config: CLIPHingeConfig) -> Dict[str, str]:
    """What each CLIP baseline of the comparison is and the settings it ran with."""
    described = {name: CLIP_BASELINES[name] for name in names}
    if "rapf" in described:
        cfg, released = rapf_settings(config)
        rapf = rapf_config(cfg) if released else cfg
        described["rapf"] += (
            (
                ""
                if released
                else "; RAPF released no config for this stream: its method "
                "values with the comparison's schedule"
            )
            + f" (batch {rapf.batch_size}, {rapf.epochs} epochs, lr {rapf.lr}, "
            f"{rapf.samples_per_old_class} replayed features x {rapf.replay_classes_per_step} "
            f"old classes per step, hard pairs at Euclidean distance < "
            f"{rapf.text_hard_pair_threshold}, {rapf.hinge_samples_per_pair} hinge samples per "
            f"pair, mix_bias {rapf_release(config)[2]})"
        )
    if "coop" in described:
        described["coop"] += (
            f" (n_ctx {config.n_ctx}, ctx_init {config.ctx_init!r}; the config's epochs and lr)"
        )
    described["input"] = (
        "the image stream, with the comparison's CLIP and one feature cache per seed shared "
        "with the CLIPHinge entries; upper bounds train once on the merged training stream and "
        "are evaluated once (no AIA, no forgetting)"
    )
    return described
