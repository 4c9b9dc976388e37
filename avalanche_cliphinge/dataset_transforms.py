"""The transforms under a stream's datasets: walked, checked, frozen.

``walk_transforms`` opens ``Compose``, Avalanche's transform groups and nested datasets down
to the leaf transforms; ``find_random_transform`` (behind the feature cache) and
``foreign_normalize`` (a ``Normalize`` CLIP cannot read) look through them;
``freeze_transforms`` freezes a dataset's transforms keeping every group of the tree (a
benchmark's class-id remapping included).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

#: Transforms that draw random numbers, besides every class whose name starts with "Random".
RANDOM_TRANSFORMS = frozenset(
    {
        "ColorJitter",
        "GaussianBlur",
        "AutoAugment",
        "RandAugment",
        "TrivialAugmentWide",
        "AugMix",
        "ElasticTransform",
        "MixUp",
        "CutMix",
        "ScaleJitter",
    }
)


def walk_transforms(source, _depth: int = 0, _seen: Optional[set] = None) -> Iterator[object]:
    """Every leaf transform applied to the items of ``source``.

    ``source`` is a transform (``Compose`` and Avalanche's wrappers are opened), an Avalanche
    dataset (its current and frozen transform groups, through every nested dataset), or a
    torch dataset with a ``transform`` attribute (through ``Subset.dataset``).
    """
    seen = set() if _seen is None else _seen
    if source is None or id(source) in seen or _depth > 16:
        return
    seen.add(id(source))
    groups = getattr(source, "transform_groups", None)
    if isinstance(groups, dict):  # Avalanche TransformGroups: the active group
        yield from walk_transforms(groups.get(source.current_group), _depth + 1, seen)
        return
    children: List[object] = []
    for name in ("_flat_data", "_frozen_transform_groups", "_transform_groups"):
        if hasattr(source, name):
            children.append(getattr(source, name))
    children += list(getattr(source, "_datasets", None) or [])
    nested = getattr(source, "transforms", None)
    if isinstance(nested, (list, tuple)):
        children += list(nested)
    for name in ("transform", "dataset"):
        value = getattr(source, name, None)
        if value is not None and not isinstance(value, (str, int, float)):
            children.append(value)
    if callable(source) and not isinstance(source, torch.utils.data.Dataset):
        yield source
    for child in children:
        yield from walk_transforms(child, _depth + 1, seen)


def is_random_transform(transform) -> bool:
    """Whether ``transform`` is one of torchvision's random transforms (by class name)."""
    name = type(transform).__name__
    return name.startswith("Random") or name in RANDOM_TRANSFORMS


def find_random_transform(dataset, probes: int = 3) -> Optional[str]:
    """Name of a random transform of ``dataset``, or ``None`` when its items are reproducible.

    A known random torchvision transform among its transforms is named at once; otherwise
    ``probes`` items (first, middle, last) are read twice and compared, which catches any
    other transform whose output changes between two reads of the same item.
    """
    for step in walk_transforms(dataset):
        if is_random_transform(step):
            return repr(step).replace("\n", " ")
    n = len(dataset)
    for index in sorted({0, n // 2, n - 1} if n else set())[:probes]:
        first, second = dataset[index][0], dataset[index][0]
        if not _same_item(first, second):
            return "the stream's transform (an item read twice came out different)"
    return None


def _same_item(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):
        return a.size == b.size and a.tobytes() == b.tobytes()
    return a is b or a == b


def foreign_normalize(dataset, mean: Sequence[float], std: Sequence[float]) -> Optional[str]:
    """The repr of a ``Normalize`` among ``dataset``'s transforms whose statistics differ from
    CLIP's ``mean``/``std`` (the stream would then serve pixels CLIP cannot read), or ``None``."""
    for step in walk_transforms(dataset):
        if isinstance(step, transforms.Normalize):
            same = torch.allclose(
                torch.as_tensor(step.mean, dtype=torch.float64),
                torch.as_tensor(mean, dtype=torch.float64),
                atol=1e-6,
            ) and torch.allclose(
                torch.as_tensor(step.std, dtype=torch.float64),
                torch.as_tensor(std, dtype=torch.float64),
                atol=1e-6,
            )
            if not same:
                return repr(step)
    return None


def _transform_nodes(node, depth: int = 0, seen: Optional[set] = None) -> Iterator[object]:
    """``node`` and every dataset under it in Avalanche's dataset tree, each once."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen or depth > 64:
        return
    seen.add(id(node))
    yield node
    yield from _transform_nodes(getattr(node, "_flat_data", None), depth + 1, seen)
    for child in getattr(node, "_datasets", None) or []:
        yield from _transform_nodes(child, depth + 1, seen)


def freeze_transforms(dataset):
    """``dataset.freeze_transforms()`` that keeps every group of every dataset in the tree.

    Avalanche 0.6 keeps a benchmark's class-id remapping (``class_ids_from_zero_from_first_exp``,
    ``class_ids_from_zero_in_each_exp``) as a frozen target transform in a
    ``DefaultTransformGroups``, a ``defaultdict`` holding only the groups read so far. Freezing
    adds the groups with ``{**groups}``, which drops the unread ones: the ``eval`` group of a
    test experience then serves the original class ids while ``dataset.targets`` says the
    remapped ones. Every group name of the tree is read first (the dict gains the value it
    already returned for it), so the frozen dataset serves the ids of ``dataset.targets``.
    """
    from avalanche.benchmarks.utils.transform_groups import DefaultTransformGroups

    nodes = list(_transform_nodes(dataset))
    groups = [
        g
        for node in nodes
        for g in (
            getattr(node, "_frozen_transform_groups", None),
            getattr(node, "_transform_groups", None),
        )
        if g is not None and hasattr(g, "transform_groups")
    ]
    names = {"train", "eval"}
    for g in groups:
        names |= set(g.transform_groups) | {g.current_group}
    for g in groups:
        if isinstance(g, DefaultTransformGroups):
            for name in names:
                g.transform_groups[name]  # a defaultdict: reading stores the default
    return dataset.freeze_transforms()
