"""What ``cliphinge compare`` puts side by side: the strategies, their registry and settings.

CLIPHingeStrategy beside Avalanche's own strategies, the CLIP baselines a paper is compared
against (SimpleCIL, CoOp, RAPF, joint upper bounds) and zero-shot CLIP, on one stream.

Entries:

- ``zeroshot``: CLIP with the fixed template (``prompt_template``) over the classes seen so far;
  no training (an Avalanche strategy with zero epochs, ``ZeroShotCLIPStrategy``).
- Avalanche baselines (``BASELINES``: ``naive``, ``lwf``, ``ewc``, ``replay``, ``gdumb``,
  ``icarl``), imported from ``avalanche.training`` and built with their keyword-only
  constructors, on ``FrozenCLIPClassifier`` = frozen image encoder + Avalanche's
  ``IncrementalClassifier`` on the L2-normalised image features; the optimizer sees the head only.
- CLIP baselines (``CLIP_BASELINES``: ``simplecil``, ``coop``, ``rapf`` and the upper bounds
  ``joint``, ``joint_probe``), the strategies of ``avalanche_cliphinge.baselines`` on the image
  stream, sharing the loaded CLIP and the CLIPHinge entries' feature cache; the upper bounds
  train once on the whole stream and are reported in their own rows, without forgetting.
- ``cliphinge`` and its ablations (``ABLATIONS``): ``CLIPHingeStrategy`` with config overrides.

Adding a strategy that trains on the frozen features: one factory in ``BASELINES``
(``factory(BaselineContext) -> strategy``); its name becomes a ``--strategies`` choice. The
factories import torch and Avalanche when they run, not here: ``cliphinge compare --help`` and
a refused request read this module without them.

The comparison's modules, one job each: this one (names, entries, baseline settings);
``compare_features`` (the models on frozen CLIP features and the feature stream they train on);
``compare_runs`` (one entry on one seed, every entry on every seed, the protocol);
``compare_clip`` (the CLIP baselines: building them, counting learned parameters);
``compare_report`` (table, CSV, JSON, Markdown, the figure, the output folder); ``compare_cli``
(the command: ``cliphinge compare`` and ``experiments/compare.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch
    from avalanche.training.templates import SupervisedTemplate

ZEROSHOT = "zeroshot"
CLIPHINGE = "cliphinge"

#: CLIPHinge ablations: config overrides on top of the run's config.
ABLATIONS: Dict[str, Dict[str, Any]] = {
    "no_replay": {"samples_per_old_class": 0},
    "no_hinge": {"text_use_hinge_loss": False, "use_image_hinge_loss": False},
    "no_stage2": {"second_stage_epochs": 0},
    # alpha = 0 scores exactly the stage-1 CLIP logits (clip + 0 * head); stage 2 still trains.
    "no_fusion": {"second_stage_fusion_weight": 0.0},
    "no_replay_no_hinge": {
        "samples_per_old_class": 0,
        "text_use_hinge_loss": False,
        "use_image_hinge_loss": False,
    },
}


class CompareError(ValueError):
    """A comparison request that cannot run (unknown names, bad settings, busy folder)."""


# ---- baselines ------------------------------------------------------------------------------
@dataclass
class BaselineSettings:
    """Settings of the Avalanche baselines; untuned common defaults.

    Change them with ``--set baseline.<key>=<value>`` (``baseline.lr=0.05``).

    Attributes:
        epochs: training epochs per experience (``None``: the config's ``epochs``).
        batch_size: training minibatch size (``None``: the config's ``batch_size``).
        optimizer: ``"adam"`` or ``"sgd"``, over the head's parameters only.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty of the optimizer.
        lwf_alpha: LwF's distillation weight.
        lwf_temperature: LwF's softmax temperature.
        ewc_lambda: EWC's penalty weight.
        memory_per_class: Replay, GDumb and iCaRL keep ``memory_per_class * n_classes``
            samples (20 per class: the 2,000 exemplars usual on CIFAR-100).
    """

    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 100.0
    memory_per_class: int = 20

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise CompareError(
                f"baseline.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"
            )
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CompareError(f"baseline.{key} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise CompareError(f"baseline.lr must be > 0, got {self.lr!r}")
        if not isinstance(self.memory_per_class, int) or self.memory_per_class < 1:
            raise CompareError(
                f"baseline.memory_per_class must be an integer >= 1, got {self.memory_per_class!r}"
            )

    def with_overrides(self, assignments: Dict[str, Any]) -> "BaselineSettings":
        """A copy with ``{key: value}`` applied; unknown keys name the closest one."""
        known = [f.name for f in dataclasses.fields(self)]
        for key in assignments:
            if key not in known:
                raise CompareError(
                    f"--set: unknown baseline setting 'baseline.{key}'"
                    + did_you_mean(key, known, prefix="baseline.")
                )
        return BaselineSettings(**{**dataclasses.asdict(self), **assignments})


@dataclass
class BaselineContext:
    """What a baseline factory gets: Avalanche's common keyword arguments and the stream size.

    ``common`` holds ``model``, ``optimizer``, ``criterion``, ``train_mb_size``,
    ``train_epochs``, ``eval_mb_size``, ``device`` and ``evaluator``.
    """

    common: Dict[str, Any]
    settings: BaselineSettings
    n_classes: int

    @property
    def memory(self) -> int:
        """Buffer size of the rehearsal strategies."""
        return self.settings.memory_per_class * self.n_classes

    def optimizer(self, params) -> torch.optim.Optimizer:
        """The baselines' optimizer over ``params``."""
        import torch

        s = self.settings
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _naive(ctx: BaselineContext) -> SupervisedTemplate:
    from avalanche.training import Naive

    return Naive(**ctx.common)


def _lwf(ctx: BaselineContext) -> SupervisedTemplate:
    from avalanche.training import LwF

    return LwF(**ctx.common, alpha=ctx.settings.lwf_alpha, temperature=ctx.settings.lwf_temperature)


def _ewc(ctx: BaselineContext) -> SupervisedTemplate:
    from avalanche.training import EWC

    return EWC(**ctx.common, ewc_lambda=ctx.settings.ewc_lambda)


def _replay(ctx: BaselineContext) -> SupervisedTemplate:
    from avalanche.training import Replay

    return Replay(**ctx.common, mem_size=ctx.memory)


def _gdumb(ctx: BaselineContext) -> SupervisedTemplate:
    from avalanche.training import GDumb

    return GDumb(**ctx.common, mem_size=ctx.memory)


def _icarl(ctx: BaselineContext) -> SupervisedTemplate:
    from avalanche.training import ICaRL
    from torch import nn

    # Avalanche's iCaRL keeps a copy of the model with fixed shapes (its distillation loss), so
    # it gets a fixed linear head over every class; it classifies by nearest class mean.
    kwargs = dict(ctx.common)
    model = kwargs.pop("model")
    del kwargs["criterion"]  # iCaRL brings its own loss
    classifier = nn.Linear(model.classifier.classifier.in_features, ctx.n_classes)
    kwargs["optimizer"] = ctx.optimizer(classifier.parameters())
    return ICaRL(
        feature_extractor=model.feature_extractor,
        classifier=classifier,
        memory_size=ctx.memory,
        buffer_transform=None,
        fixed_memory=True,
        **kwargs,
    )


#: Avalanche strategies by entry name: ``factory(BaselineContext) -> strategy``. Add one here
#: (or at run time, before ``main``) to make it a ``--strategies`` name; a factory imports its
#: strategy when it runs, so that this module stays free of torch and Avalanche.
BASELINES: Dict[str, Callable[[BaselineContext], SupervisedTemplate]] = {
    "naive": _naive,
    "lwf": _lwf,
    "ewc": _ewc,
    "replay": _replay,
    "gdumb": _gdumb,
    "icarl": _icarl,
}

#: The CLIP baselines of ``avalanche_cliphinge.baselines`` (issue 28) by entry name, with what
#: each is; they run on the image stream (``compare_clip.build_clip_baseline`` builds them).
CLIP_BASELINES: Dict[str, str] = {
    "simplecil": "SimpleCIL: a prototype (mean frozen image feature) per class, cosine "
    "classifier, no training",
    "coop": "CoOp: one learnable context shared by every class, trained task after task, "
    "no replay, no hinge",
    "rapf": "RAPF (ECCV'24): linear adapter on frozen image features, Gaussian replay, hinge "
    "on hard text pairs, decomposed fusion; RAPF's released values on CIFAR-100 and "
    "ImageNet-R",
    "joint": "upper bound: CLIPHingeStrategy trained once on every class as one task",
    "joint_probe": "upper bound: a linear probe on frozen image features of every class, "
    "trained once",
}

DEFAULT_STRATEGIES = (
    ZEROSHOT,
    "naive",
    "lwf",
    "ewc",
    "replay",
    "gdumb",
    "icarl",
    "simplecil",
    "coop",
    "rapf",
    CLIPHINGE,
    "joint",
    "joint_probe",
)


# ---- entries --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One line of the comparison.

    Attributes:
        name: the row label and folder name (``naive``, ``cliphinge_no_replay``).
        kind: ``"zeroshot"``, ``"baseline"`` (Avalanche's, on extracted features), ``"clip"``
            (``CLIP_BASELINES``, on the image stream) or ``"cliphinge"``.
        overrides: CLIPHinge config overrides (ablations).
    """

    name: str
    kind: str
    overrides: Tuple[Tuple[str, Any], ...] = ()


def strategy_names() -> Tuple[str, ...]:
    """Every ``--strategies`` name: zero-shot, the registered Avalanche baselines, the CLIP
    baselines, CLIPHinge."""
    return (ZEROSHOT, *BASELINES, *CLIP_BASELINES, CLIPHINGE)


def resolve_entries(
    strategies: Sequence[str] = DEFAULT_STRATEGIES, ablations: Sequence[str] = tuple(ABLATIONS)
) -> List[Entry]:
    """Entries for the named strategies and CLIPHinge ablations (order: as listed, ablations
    last). Names are case-insensitive; an unknown one raises ``CompareError`` naming the closest.
    """
    entries: List[Entry] = []
    for raw in strategies:
        name = raw.strip().lower()
        if name not in strategy_names():
            raise CompareError(
                f"unknown strategy '{raw}'"
                + did_you_mean(name, strategy_names())
                + f" (choose from {', '.join(strategy_names())})"
            )
        kind = (
            "zeroshot"
            if name == ZEROSHOT
            else "cliphinge"
            if name == CLIPHINGE
            else "clip"
            if name in CLIP_BASELINES
            else "baseline"
        )
        entries.append(Entry(name, kind))
    for raw in ablations:
        name = raw.strip().lower()
        if name not in ABLATIONS:
            raise CompareError(
                f"unknown ablation '{raw}'"
                + did_you_mean(name, ABLATIONS)
                + f" (choose from {', '.join(ABLATIONS)}, or none)"
            )
        entries.append(Entry(f"{CLIPHINGE}_{name}", "cliphinge", tuple(ABLATIONS[name].items())))
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CompareError(f"entries named twice: {', '.join(repeated)}; list each once")
    if not entries:
        raise CompareError(
            "nothing to compare: give at least one --strategies name or --ablations name"
        )
    return entries


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """``"; did you mean '<prefix><closest choice>'?"``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""
