"""avalanche-cliphinge: CLIP prompts, Gaussian replay and hard-pair hinge losses for
class-incremental learning, as an Avalanche strategy with plugins."""

from .config import CLIPHingeConfig, ConfigError
from .gaussian import ClassGaussians, class_gaussian_stats, make_positive_definite, rapf_shrink_cov
from .losses import fuse_logits, hinge_loss, select_hard_pairs
from .metrics import DeviceEpochAccuracy, DeviceEpochLoss
from .model import TINY_MODEL, BackboneError, CLIPBackbone, CLIPHingeModel, load_clip
from .plugins import GaussianReplayPlugin, HardPairHingePlugin, SecondStagePlugin
from .strategy import CLIPHingeStrategy, StepState, build_model, default_plugins
from .streams import StreamInputError, class_names_for, stream_transforms, task_layout

__version__ = "0.1.0"

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
