"""The method's Avalanche plugins, one behaviour each."""

from .gaussian_replay import GaussianReplayPlugin
from .hard_pair_hinge import HardPairHingePlugin
from .second_stage import SecondStagePlugin

__all__ = ["GaussianReplayPlugin", "HardPairHingePlugin", "SecondStagePlugin"]
