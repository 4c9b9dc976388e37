"""avalanche-cliphinge: CLIP prompts, Gaussian replay and hard-pair hinge losses for
class-incremental learning, as an Avalanche strategy with plugins.

The public names below are imported from their modules on first use (PEP 562), so that
``import avalanche_cliphinge`` and the ``cliphinge`` command's help, ``presets`` and
``predict`` do not pay for importing Avalanche (about 15 s of CPU on a small machine)
until something needs it. ``from avalanche_cliphinge import CLIPHingeStrategy`` works as
with eager imports.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# Avalanche imports qpsolvers for GEM, which warns at import when none of its optional solvers
# imports; the method needs none (GEMPlugin fails at its first projection without one)
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)

#: public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "CLIPHingeConfig": "config",
    "ConfigError": "config",
    "ClassGaussians": "gaussian",
    "class_gaussian_stats": "gaussian_stats",
    "make_positive_definite": "gaussian_stats",
    "rapf_shrink_cov": "gaussian_stats",
    "fuse_logits": "fusion",
    "hinge_loss": "losses",
    "select_hard_pairs": "hard_pairs",
    "TINY_MODEL": "model",
    "BackboneError": "model",
    "CLIPBackbone": "model",
    "CLIPHingeModel": "model",
    "load_clip": "model",
    "GaussianReplayPlugin": "plugins",
    "HardPairHingePlugin": "plugins",
    "SecondStagePlugin": "plugins",
    "CLIPHingeStrategy": "strategy",
    "build_model": "model",
    "default_plugins": "strategy",
    "DeviceEpochAccuracy": "metrics",
    "DeviceEpochLoss": "metrics",
    "StepState": "step_state",
    "StreamInputError": "streams",
    "class_names_for": "streams",
    "stream_transforms": "streams",
    "task_layout": "streams",
}

__all__ = [
    "CLIPHingeConfig",
    "ConfigError",
    "ClassGaussians",
    "class_gaussian_stats",
    "make_positive_definite",
    "rapf_shrink_cov",
    "fuse_logits",
    "hinge_loss",
    "select_hard_pairs",
    "TINY_MODEL",
    "BackboneError",
    "CLIPBackbone",
    "CLIPHingeModel",
    "load_clip",
    "GaussianReplayPlugin",
    "HardPairHingePlugin",
    "SecondStagePlugin",
    "CLIPHingeStrategy",
    "build_model",
    "default_plugins",
    "DeviceEpochAccuracy",
    "DeviceEpochLoss",
    "StepState",
    "StreamInputError",
    "class_names_for",
    "stream_transforms",
    "task_layout",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is asked for."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .config import CLIPHingeConfig, ConfigError
    from .gaussian import ClassGaussians
    from .gaussian_stats import class_gaussian_stats, make_positive_definite, rapf_shrink_cov
    from .fusion import fuse_logits
    from .hard_pairs import select_hard_pairs
    from .losses import hinge_loss
    from .metrics import DeviceEpochAccuracy, DeviceEpochLoss
    from .model import (
        TINY_MODEL,
        BackboneError,
        CLIPBackbone,
        CLIPHingeModel,
        build_model,
        load_clip,
    )
    from .plugins import GaussianReplayPlugin, HardPairHingePlugin, SecondStagePlugin
    from .step_state import StepState
    from .strategy import CLIPHingeStrategy, default_plugins
    from .streams import StreamInputError, class_names_for, stream_transforms, task_layout
