"""Split any `root/{train,test}/<class>/*.jpg` tree into a class-incremental stream."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

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


def split_image_folder(
    root: Union[str, Path],
    *,
    init_class: int,
    increment: int,
    class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
) -> NamedBenchmark:
    """Class-incremental stream over an image-folder tree with a fixed train/test split.

    Args:
        root: folder holding `train/<class>/*` and `test/<class>/*` (jpg, jpeg or png), the same
            class folders on both sides.
        init_class: classes in the first task.
        increment: classes in every later task.
        class_order: the class ids in task order; `None` -> ascending ids.
        train_transform: applied to training images (PIL RGB); `None` -> `ToTensor()`.
        eval_transform: applied to test images; `None` -> `ToTensor()`.

    Returns:
        NamedBenchmark: class id = position of the folder name in sorted order; `class_names` are
        the folder names with underscores as spaces; targets are those ids.

    Raises:
        FileNotFoundError: `train/` or `test/` is missing, or holds no class folder.
        ValueError: train and test have different class folders, a train class folder has no
            image, the class counts do not add up, or a bad `class_order`.
    """
    root = Path(root).expanduser()
    sides = {}
    for side in ("train", "test"):
        folder = root / side
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not classes:
            raise FileNotFoundError(
                f"No class folders in {folder}: expected {root}/{{train,test}}/<class>/*.jpg."
            )
        sides[side] = classes
    if sides["train"] != sides["test"]:
        only_train = sorted(set(sides["train"]) - set(sides["test"]))
        only_test = sorted(set(sides["test"]) - set(sides["train"]))
        raise ValueError(
            f"train/ and test/ under {root} must hold the same class folders; only in train: "
            f"{only_train}, only in test: {only_test}."
        )
    folders = sides["train"]
    n_classes = len(folders)
    check_task_split(n_classes, init_class, increment)
    if class_order is None:
        order, order_name = list(range(n_classes)), "ascending"
    else:
        order, order_name = check_class_order(class_order, n_classes), "explicit"

    datasets = {}
    for side in ("train", "test"):
        files, labels = [], []
        for label, name in enumerate(folders):
            images = list_images(root / side / name)
            if side == "train" and not images:
                raise ValueError(
                    f"{root / side / name} holds no .jpg/.jpeg/.png image; every class needs "
                    f"training images."
                )
            files += images
            labels += [label] * len(images)
        datasets[side] = ImageFileDataset(files, labels)

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
        split="fixed train/ and test/ folders",
        seed=None,
    )
    class_names = [name.replace("_", " ") for name in folders]
    return NamedBenchmark(benchmark, class_names, order, protocol)
