"""The CLIP baselines a comparison needs, as Avalanche strategies (issue 28).

Each is a keyword-only Avalanche strategy with ``CLIPHingeStrategy``'s input handling, class
names, evaluator and loggers. ``upper_bound`` tells a comparison which are upper bounds
(trained on every class at once: their own rows, no forgetting).

- ``CoOp``: one learnable context shared by every class, trained task after task.
- ``JointTraining``: the method trained on every class as one task (upper bound).
- ``JointLinearProbe``: a linear probe on frozen CLIP features of every class (upper bound).
- ``learned_parameters(model)``: the scalars a model learned (outside the frozen CLIP).
- ``SimpleCIL``: a prototype (mean frozen image feature) per class, cosine classifier.
- ``RAPF``: a linear adapter on frozen image features, Gaussian replay, a hinge on hard text
  pairs and the decomposed fusion of the adapter (``rapf_fusion``), with RAPF's released
  values (``rapf_config``).
- ``FrozenFeatureStrategy``, ``FrozenCLIPModel``, ``ClassMeans``: the base of the strategies
  on frozen CLIP features.
"""

from .coop import CoOp, learned_parameters
from .joint import JointLinearProbe, JointTraining, joint_experience
from .frozen_base import FrozenFeatureStrategy
from .frozen_model import ClassMeans, FrozenCLIPModel
from .rapf import RAPF, rapf_config, rapf_fusion
from .simplecil import SimpleCIL

__all__ = [
    "CoOp",
    "learned_parameters",
    "JointLinearProbe",
    "JointTraining",
    "joint_experience",
    "ClassMeans",
    "FrozenCLIPModel",
    "FrozenFeatureStrategy",
    "RAPF",
    "SimpleCIL",
    "rapf_config",
    "rapf_fusion",
]
