"""Split a folder of class subfolders into a class-incremental stream.

Two layouts: ``root/<class>/*.jpg`` (a folder per class; each class's images split into train
and test by a seeded per-class draw) and ``root/{train,test}/<class>/*.jpg`` (a fixed split).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..folders import PER_CLASS, TRAIN_TEST, find_image_folder_layout
from .common import (
    ImageFileDataset,
    NamedBenchmark,
    check_class_order,
    check_task_split,
    default_transform,
    describe_stream,
    list_images,
    make_nc_benchmark,
)

#: Share of each class's images used for training when the folder holds no split.
TRAIN_FRACTION = 0.8


def _per_class_split(root: Path, folders: Sequence[str], seed: int, train_fraction: float):
    """``{side: ImageFileDataset}`` of a folder per class: each class's files, sorted by name,
    permuted by ``RandomState([seed, crc32(folder name)])``; the first
    ``floor(train_fraction * n + 0.5)`` (at least 1, at most n - 1) train, the rest test."""
    files = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for label, name in enumerate(folders):
        images = list_images(root / name)
        if not images:
            raise ValueError(
                f"{root / name} holds no .jpg/.jpeg/.png image; every class needs images "
                "(add some or remove the folder)."
            )
        n = len(images)
        n_train = math.floor(train_fraction * n + 0.5)
        n_train = min(max(n_train, 1), n - 1) if n >= 2 else n
        # seeded by the folder name too: a class's split does not depend on the others
        chosen = np.random.RandomState([seed, zlib.crc32(name.encode())]).permutation(n)
        train = set(chosen[:n_train].tolist())
        for i, path in enumerate(images):
            side = "train" if i in train else "test"
            files[side].append(path)
            labels[side].append(label)
    return {side: ImageFileDataset(files[side], labels[side]) for side in files}


def split_image_folder(
    root: Union[str, Path],
    *,
    init_class: int,
    increment: int,
    class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
    seed: int = 0,
    train_fraction: float = TRAIN_FRACTION,
) -> NamedBenchmark:
    """Class-incremental stream over a folder of class subfolders.

    Args:
        root: a folder of class subfolders, `root/<class>/*` (jpg, jpeg or png; each class's
            images split into train and test, see `seed`), or a folder holding
            `train/<class>/*` and `test/<class>/*`, the same class folders on both sides (a
            fixed split).
        init_class: classes in the first task.
        increment: classes in every later task.
        class_order: the class ids in task order; `None` -> ascending ids.
        train_transform: applied to training images (PIL RGB); `None` -> `ToTensor()`.
        eval_transform: applied to test images; `None` -> `ToTensor()`.
        seed: seed of the per-class split (folder per class only): each class's files, sorted
            by name, are permuted by `numpy.random.RandomState([seed, crc32(folder name)])`.
        train_fraction: share of each class's images that trains (folder per class only);
            `floor(train_fraction * n + 0.5)`, at least one image on each side.

    Returns:
        NamedBenchmark: class id = position of the folder name in sorted order; `class_names` are
        the folder names with underscores as spaces; targets are those ids.

    Raises:
        FileNotFoundError: `root` is missing, holds `train/` without `test/` (or the
            reverse), or has no class folder.
        ValueError: train and test have different class folders, a class has no training or
            no test image, the class counts do not add up, or a bad `class_order`.
    """
    root = Path(root).expanduser()
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    kind, folders = find_image_folder_layout(root)
    if kind == TRAIN_TEST:
        test_classes = sorted(
            p.name for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if folders != test_classes:
            only_train = sorted(set(folders) - set(test_classes))
            only_test = sorted(set(test_classes) - set(folders))
            raise ValueError(
                f"train/ and test/ under {root} must hold the same class folders; only in "
                f"train: {only_train}, only in test: {only_test}."
            )
    n_classes = len(folders)
    check_task_split(n_classes, init_class, increment)
    if class_order is None:
        order, order_name = list(range(n_classes)), "ascending"
    else:
        order, order_name = check_class_order(class_order, n_classes), "explicit"

    if kind == PER_CLASS:
        datasets = _per_class_split(root, folders, seed, train_fraction)
        split = f"seeded per-class split, train_fraction {train_fraction}, seed {seed}"
    else:
        datasets = {}
        for side in ("train", "test"):
            files, labels = [], []
            for label, name in enumerate(folders):
                images = list_images(root / side / name)
                if side == "train" and not images:
                    raise ValueError(
                        f"{root / side / name} holds no .jpg/.jpeg/.png image; every class "
                        "needs training images."
                    )
                files += images
                labels += [label] * len(images)
            datasets[side] = ImageFileDataset(files, labels)
        split = "fixed train/ and test/ folders"

    benchmark = make_nc_benchmark(
        datasets["train"],
        datasets["test"],
        order,
        init_class,
        increment,
        train_transform if train_transform is not None else default_transform(),
        eval_transform if eval_transform is not None else default_transform(),
        class_names=folders,
    )
    protocol = describe_stream(
        benchmark,
        name="split_image_folder",
        dataset=root.name,
        root=str(root),
        class_order_name=order_name,
        class_order=order,
        init_class=init_class,
        increment=increment,
        n_classes=n_classes,
        split=split,
        seed=seed if kind == PER_CLASS else None,
    )
    class_names = [name.replace("_", " ") for name in folders]
    return NamedBenchmark(benchmark, class_names, order, protocol)
