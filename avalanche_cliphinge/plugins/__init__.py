"""The method's Avalanche plugins, one behaviour each, and the set a config asks for."""

from typing import List

from avalanche.training.plugins import SupervisedPlugin

from ..config import CLIPHingeConfig
from .gaussian_replay import GaussianReplayPlugin
from .hard_pair_hinge import HardPairHingePlugin
from .second_stage import SecondStagePlugin

__all__ = ["GaussianReplayPlugin", "HardPairHingePlugin", "SecondStagePlugin", "default_plugins"]


def default_plugins(config: CLIPHingeConfig) -> List[SupervisedPlugin]:
    """The plugins the config asks for: replay, hinge and stage 2 (each only when enabled)."""
    plugins: List[SupervisedPlugin] = []
    if config.samples_per_old_class > 0:
        plugins.append(
            GaussianReplayPlugin(
                samples_per_old_class=config.samples_per_old_class,
                classes_per_step=config.replay_classes_per_step,
                seed=config.seed,
            )
        )
    if config.text_use_hinge_loss or config.use_image_hinge_loss:
        plugins.append(HardPairHingePlugin.from_config(config))
    if config.second_stage_epochs > 0:
        plugins.append(SecondStagePlugin.from_config(config))
    return plugins
