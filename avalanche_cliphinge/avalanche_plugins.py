"""Avalanche's own plugins on ``CLIPHingeStrategy``: the ones refused, and what the others read.

Two kinds of plugin cannot apply to the method and are refused in one line
(``refuse_plugins``, when the strategy is built and when training starts):

- ``GDumbPlugin`` retrains a copy of the untrained model on its memory at every experience:
  the method's state (prompts, class Gaussians, heads) lives in the model and would be thrown
  away with it.
- Regularisers of what earlier experiences learned (``EWCPlugin``,
  ``SynapticIntelligencePlugin``, ``MASPlugin``, ``LwFPlugin``) while nothing an earlier
  experience trained can change again (``update_old_text_prompts`` and ``use_image_adapter``
  both false): their term would be exactly 0 at every step.

The others read the strategy's data where a plugin on ``Naive`` reads model-ready data, and
the strategy serves them the model's input there:

- ``strategy.experience.dataset`` during ``after_training_exp`` (the storage policies of
  ``ReplayPlugin``, EWC's and MAS's importances, AGEM's and GEM's memories) is the
  experience's training data as CLIP's input (``experience_with_dataset``), so a memory filled
  from a PIL stream holds images the model reads;
- a multi-dataset loader a plugin builds in ``before_training_exp`` (``ReplayPlugin``'s
  ``ReplayDataLoader``) keeps its sampling, and its datasets become frozen features
  (``FeatureRows``) when stage 1 may use the feature cache.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from avalanche.training.plugins import (
    EWCPlugin,
    GDumbPlugin,
    LwFPlugin,
    MASPlugin,
    SynapticIntelligencePlugin,
)
from torch import Tensor
from torch.utils.data import Dataset

from .config import CLIPHingeConfig, ConfigError

#: Plugins whose only effect is to hold back what earlier experiences trained.
REGULARISERS = (EWCPlugin, SynapticIntelligencePlugin, MASPlugin, LwFPlugin)


def refuse_plugins(plugins: Iterable[object], config: CLIPHingeConfig) -> None:
    """Raise ``ConfigError`` (one line: the plugin, why, what instead) for a plugin that cannot
    apply to ``CLIPHingeStrategy`` with ``config``; return quietly otherwise."""
    frozen_past = not (config.update_old_text_prompts or config.use_image_adapter)
    for plugin in plugins:
        name = type(plugin).__name__
        if isinstance(plugin, GDumbPlugin):
            raise ConfigError(
                f"{name} cannot apply to CLIPHingeStrategy: it retrains a copy of the "
                "untrained model on its memory at every experience, throwing away the "
                "prompts, class Gaussians and heads learned so far; for a class-balanced "
                "memory use ReplayPlugin(mem_size, storage_policy=ClassBalancedBuffer(mem_size))"
            )
        if isinstance(plugin, REGULARISERS) and frozen_past:
            raise ConfigError(
                f"{name} would do nothing on CLIPHingeStrategy: with "
                "update_old_text_prompts=false and use_image_adapter=false nothing trained "
                "in an earlier experience trains again, so its loss term is always 0; set "
                "update_old_text_prompts=true (or use_image_adapter=true), or drop the plugin"
            )


def experience_with_dataset(experience, dataset):
    """A shallow copy of ``experience`` whose ``dataset`` serves the items of ``dataset``.

    Every other attribute (``current_experience``, ``origin_stream``, the classes) is the
    experience's own. The items are read through ``dataset`` even from Avalanche's subsets and
    concatenations of the copy's dataset (a storage policy's buffer), which otherwise drop a
    transform set with ``replace_current_transform_group``. An experience class that keeps its
    data elsewhere than Avalanche's ``_dataset`` is returned unchanged. The copy's
    ``source_experience`` is ``experience`` (an evaluator keeps one logging view for both).
    """
    if dataset is None or "_dataset" not in vars(experience):
        return experience
    tasks = getattr(dataset, "targets_task_labels", None)
    view = copy.copy(experience)
    view.source_experience = experience
    view._dataset = _make_taskaware_classification_dataset(
        _ItemsAsRead(dataset),
        targets=[int(t) for t in dataset.targets],
        task_labels=0 if tasks is None else [int(t) for t in tasks],
    )
    return view


class _ItemsAsRead(Dataset):
    """``(image, label)`` of each item of ``dataset``, read through its transforms."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return item[0], item[1]


class FeatureRows(Dataset):
    """``(feature [dim], label, task label)`` items: a dataset as frozen image features.

    Kept on the CPU, so a plugin's loader may use worker processes; the strategy moves each
    minibatch to its device.

    Args:
        features: ``[n, dim]`` frozen-encoder features.
        labels: ``[n]`` class ids.
        task_labels: ``[n]`` task labels (default: 0).
    """

    def __init__(self, features: Tensor, labels: Tensor, task_labels: Optional[Tensor] = None):
        self.features = features.detach().float().cpu()
        self.labels = labels.detach().long().cpu()
        self.task_labels = (
            torch.zeros_like(self.labels) if task_labels is None else task_labels.long().cpu()
        )
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.features[index], self.labels[index], self.task_labels[index]
