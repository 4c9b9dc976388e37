"""The upper bounds: the method and a linear probe trained on every class at once (issue 28).

``joint_experience`` merges a stream's training experiences into one experience holding every
class; ``joint_config`` gives a config the one-task layout it needs. ``JointTraining`` is
``CLIPHingeStrategy`` trained on that experience (the method's prompts of every class learned
as one task); ``JointLinearProbe`` a linear classifier on the frozen CLIP image features of all
classes. Both train once, on the whole training stream, and are evaluated like the others on
the whole test stream; their ``upper_bound`` attribute tells a comparison to report them in
their own rows and to leave them out of forgetting.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from avalanche.benchmarks import DatasetExperience
from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream
from avalanche.benchmarks.utils.utils import concat_datasets
from torch import Tensor, nn

from ..config import CLIPHingeConfig, ConfigError
from ..model.backbone import CLIPBackbone
from ..model.class_names import ClassNames
from ..strategy import CLIPHingeStrategy
from ..strategy_inputs import classes_of
from .coop import learned_parameters
from .frozen_base import FrozenFeatureStrategy
from .frozen_model import ClassMeans, FrozenCLIPModel


def joint_experience(experiences) -> DatasetExperience:
    """One training experience with every item of ``experiences`` (an experience, a list of
    them or a stream), in stream order.

    Its ``classes_in_this_experience`` are every class of them (sorted ids); its stream, named
    as theirs, refers to their benchmark (its class count is checked against the config). Each
    item keeps its dataset's transforms, class id and task label.

    Raises:
        ConfigError: no experience, or an experience without a dataset.
    """
    exps = [experiences] if hasattr(experiences, "dataset") else list(experiences)
    if not exps or not all(hasattr(e, "dataset") for e in exps):
        raise ConfigError(
            "joint training needs the training experiences (a stream or a list of "
            "experiences with datasets), e.g. benchmark.train_stream"
        )
    merged = DatasetExperience(dataset=concat_datasets([e.dataset for e in exps]))
    origin = getattr(exps[0], "origin_stream", None)
    EagerCLStream(  # sets the experience's origin_stream and current_experience (0)
        getattr(origin, "name", "train"), [merged], benchmark=getattr(origin, "benchmark", None)
    )
    classes: List[int] = sorted({int(c) for e in exps for c in classes_of(e)})
    merged.classes_in_this_experience = classes
    merged.classes_seen_so_far = list(classes)
    merged.previous_classes = []
    merged.future_classes = []
    return merged


def joint_config(config: CLIPHingeConfig) -> CLIPHingeConfig:
    """``config`` with a one-task layout: every class of its layout in task 0
    (``init_class = n_classes``, ``total_tasks = 1``), or, for a layout left to the stream,
    the one experience taken as it comes (``init_class``, ``total_tasks`` unset)."""
    if not isinstance(config, CLIPHingeConfig):
        raise ConfigError(
            f"config must be a CLIPHingeConfig, got {type(config).__name__}; "
            "use CLIPHingeConfig.from_json(path)"
        )
    if config.layout_is_set:
        return config.replace(init_class=config.n_classes, total_tasks=1)
    return config.replace(init_class=None, total_tasks=None)


def _already_trained(name: str) -> ConfigError:
    return ConfigError(
        f"{name} trains once, on the whole training stream; build a new {name} to train again"
    )


class JointTraining(CLIPHingeStrategy):
    """The method trained on every class at once: an upper bound of ``CLIPHingeStrategy``.

    ``train(stream)`` merges the stream's training experiences into one (``joint_experience``)
    and trains ``CLIPHingeStrategy`` on it with the run's config made one task
    (``joint_config``): one task of every class (``model.task_classes == [all classes]``),
    its prompts trained with cross-entropy over all classes for ``init_epochs``, then the
    plugins the config asks for as on a first task (no class is old: replay and the hinges
    have nothing to do; stage 2 runs when ``second_stage_start_task`` is 0). Not a paper's
    method: the usual joint ("offline") upper bound of continual learning, as Avalanche's
    ``JointTraining``. It trains once; ``eval`` is the method's on any stream.

    Args: ``CLIPHingeStrategy``'s (``config`` passes through ``joint_config``).
    """

    #: trained on all classes at once: reported in its own rows, left out of forgetting
    upper_bound = True

    def __init__(self, *, config: CLIPHingeConfig, class_names: ClassNames, **kwargs):
        super().__init__(config=joint_config(config), class_names=class_names, **kwargs)

    def train(self, experiences, eval_streams=None, **kwargs):
        """Train on every experience of ``experiences`` at once (a stream, a list of
        experiences or one experience); ``eval_streams`` and the result as Avalanche's."""
        if self.model.n_tasks:
            raise _already_trained(type(self).__name__)
        return super().train(joint_experience(experiences), eval_streams, **kwargs)

    def trainable_parameters(self) -> int:
        """Scalars the method learned (prompts, heads, adapter, LoRA); 0 before training."""
        return learned_parameters(self.model)


class LinearProbeModel(FrozenCLIPModel):
    """Frozen CLIP + a linear layer over every class id of the stream.

    ``seen_scores(f) = (W normalize(f) + b)[:, learned columns]``, ``[b, n_seen]``, with
    ``W [n_outputs, dim]`` and ``b [n_outputs]`` (``head``) starting at zero (multinomial
    logistic regression); classes not learned get ``UNSEEN_SCORE``. Statistics: class means
    (``ClassMeans``, what ``StrategyInputs`` fits; the probe does not read them).

    Args: ``FrozenCLIPModel``'s, but ``statistics``.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        class_names: ClassNames,
        *,
        prompt_template: str = "a good photo of a {}.",
        resize_on_device: bool = False,
    ):
        super().__init__(
            backbone,
            class_names,
            ClassMeans(backbone.embed_dim),
            prompt_template=prompt_template,
            resize_on_device=resize_on_device,
        )
        self.head = nn.Linear(backbone.embed_dim, self.n_outputs)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def seen_scores(self, features: Tensor) -> Tensor:
        """``[b, dim]`` frozen features -> ``[b, n_seen]`` probe logits in column order."""
        scores = self.head(F.normalize(features.float(), dim=-1))
        return scores[:, self.class_of_column]


class JointLinearProbe(FrozenFeatureStrategy):
    """A linear probe on frozen CLIP image features, trained on every class at once: the
    upper bound of a classifier on the frozen encoder (the "linear probe" protocol of Radford
    et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML
    2021, arXiv 2103.00020, there a logistic regression fitted by L-BFGS).

    ``train(stream)`` merges the training experiences into one (``joint_experience``),
    encodes them once through the feature cache and trains ``LinearProbeModel``'s layer
    (zero-initialised) with cross-entropy over all classes: Adam at ``init_lr`` with the
    step decay ``lr_decay_epochs``, ``init_epochs`` epochs of ``batch_size`` minibatches
    (the config's; ``train_epochs`` / ``train_mb_size`` override them). Simplified from the
    paper: Adam on minibatches of L2-normalised features instead of L-BFGS with a tuned L2
    penalty (``weight_decay`` is the config's). It trains once.

    Args: ``FrozenFeatureStrategy``'s (``config`` passes through ``joint_config``).
    """

    #: trained on all classes at once: reported in its own rows, left out of forgetting
    upper_bound = True

    def __init__(self, *, config: CLIPHingeConfig, class_names: ClassNames, **kwargs):
        super().__init__(config=joint_config(config), class_names=class_names, **kwargs)

    def make_model(self, backbone: CLIPBackbone, class_names) -> LinearProbeModel:
        return LinearProbeModel(
            backbone,
            class_names,
            prompt_template=self.config.prompt_template,
            resize_on_device=self.config.resize_on_device,
        )

    def train(self, experiences, eval_streams=None, **kwargs):
        """Train on every experience of ``experiences`` at once (a stream, a list of
        experiences or one experience); ``eval_streams`` and the result as Avalanche's."""
        if self.model.n_tasks:
            raise _already_trained(type(self).__name__)
        return super().train(joint_experience(experiences), eval_streams, **kwargs)
