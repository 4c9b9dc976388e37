"""Split ImageNet-R: 200 classes of renditions (art, cartoons, sketches...) of ImageNet classes.

ImageNet-R ships no train/test split. The continual-learning convention is a fixed 80/20 split;
this module makes one deterministically from a seed, or reads a published list.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .common import (
    ImageFileDataset,
    StreamBundle,
    check_class_order,
    check_task_split,
    default_transform,
    describe_stream,
    list_images,
    make_nc_benchmark,
)
from .imagenet_r_classes import IMAGENET_R_CLASS_NAMES, IMAGENET_R_WNIDS

_FOLDER = "imagenet-r"
_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def split_imagenet_r(
    root: Union[str, Path],
    *,
    init_class: int = 20,
    increment: int = 20,
    split: Union[str, Path] = "seeded",
    seed: int = 1993,
    train_fraction: float = 0.8,
    class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
) -> StreamBundle:
    """Class-incremental ImageNet-R (B0 Inc20 by default: 10 tasks of 20 classes).

    Args:
        root: `<root>/imagenet-r/<wnid>/*.jpg`, or the `imagenet-r` folder itself.
        init_class: classes in the first task.
        increment: classes in every later task.
        split: "seeded" for a deterministic per-class split: each class's files, sorted by name,
            are permuted by `numpy.random.RandomState([seed, <wnid digits>])` and the first
            `round(train_fraction * n)` (half rounds up) go to train; a class with >= 2 images
            keeps >= 1 of each. A class's split depends only on its own files and the seed.
            Otherwise a directory holding `train.txt` and `test.txt`, one `relative/path label`
            per line (e.g. `imagenet-r/n01443537/art_0.jpg 0`), paths relative to the folder
            above `imagenet-r/` or inside it; labels must be the class ids defined below.
        seed: seed of the "seeded" split (ignored with split lists).
        train_fraction: share of each class used for training in the "seeded" split, in (0, 1).
        class_order: the class ids in task order; `None` -> ascending ids (0, 1, 2, ...).
        train_transform: applied to training images (PIL RGB); `None` -> `ToTensor()`. Images
            vary in size: pass a transform that resizes (CLIP's preprocessing) to batch them.
        eval_transform: applied to test images; `None` -> `ToTensor()`.

    Returns:
        StreamBundle. With all 200 wnid folders present, class id = position of the wnid in the
        sorted `IMAGENET_R_WNIDS` and `class_names` = `IMAGENET_R_CLASS_NAMES`. With only some
        present (a test tree, a custom subset) the ids index the present wnids in sorted order,
        and a warning says so.

    Raises:
        FileNotFoundError: no wnid folders under `root`, or a split directory without its lists.
        ValueError: a malformed list line (names file and line), class counts that do not add
            up, or a bad `class_order` / `train_fraction`.
    """
    data_dir = _find_data_dir(Path(root).expanduser())
    wnids = [w for w in IMAGENET_R_WNIDS if (data_dir / w).is_dir()]
    if len(wnids) < len(IMAGENET_R_WNIDS):
        warnings.warn(
            f"ImageNet-R at {data_dir} has {len(wnids)} of the 200 class folders: class ids "
            f"index the {len(wnids)} present wnids (sorted), not the full 200-class table.",
            stacklevel=2,
        )
    names = [IMAGENET_R_CLASS_NAMES[IMAGENET_R_WNIDS.index(w)] for w in wnids]
    n_classes = len(wnids)
    check_task_split(n_classes, init_class, increment)
    if class_order is None:
        order, order_name = list(range(n_classes)), "ascending"
    else:
        order, order_name = check_class_order(class_order, n_classes), "explicit"

    if str(split) == "seeded":
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
        (train_files, train_labels), (test_files, test_labels) = _seeded_split(
            data_dir, wnids, seed, train_fraction
        )
        split_record = {
            "split": f"seeded per-class split, train_fraction {train_fraction}, seed {seed}",
            "seed": seed,
        }
    else:
        split_dir = Path(split).expanduser()
        lists = [split_dir / "train.txt", split_dir / "test.txt"]
        missing = [str(p) for p in lists if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Split list(s) {missing} not found: `split` must be 'seeded' or a directory "
                f"holding train.txt and test.txt (lines `imagenet-r/<wnid>/<file> <label>`)."
            )
        train_files, train_labels = _read_list(lists[0], data_dir, wnids)
        test_files, test_labels = _read_list(lists[1], data_dir, wnids)
        without_train = sorted(set(range(n_classes)) - set(train_labels))
        if without_train:
            raise ValueError(
                f"{lists[0]} has no image of class(es) {without_train[:10]} "
                f"({', '.join(wnids[c] for c in without_train[:3])}...); every class present "
                f"in {data_dir} needs training images."
            )
        split_record = {
            "split": f"lists {lists[0]} and {lists[1]}",
            "split_md5": {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in lists},
            "seed": None,
        }

    benchmark = make_nc_benchmark(
        ImageFileDataset(train_files, train_labels),
        ImageFileDataset(test_files, test_labels),
        order,
        init_class,
        increment,
        train_transform if train_transform is not None else default_transform(),
        eval_transform if eval_transform is not None else default_transform(),
        class_names=wnids,
    )
    protocol = describe_stream(
        benchmark,
        name="split_imagenet_r",
        dataset="imagenet-r",
        root=str(data_dir),
        class_order_name=order_name,
        class_order=order,
        init_class=init_class,
        increment=increment,
        n_classes=n_classes,
        full_class_table=n_classes == len(IMAGENET_R_WNIDS),
        **split_record,
    )
    return StreamBundle(benchmark, names, order, protocol)


def _find_data_dir(root: Path) -> Path:
    for candidate in (root / _FOLDER, root):
        if candidate.is_dir() and any((candidate / w).is_dir() for w in IMAGENET_R_WNIDS):
            return candidate
    raise FileNotFoundError(
        f"ImageNet-R not found at {root}: expected <root>/{_FOLDER}/<wnid>/*.jpg (folders such "
        f"as n01443537); download and extract {_URL} into {root}."
    )


def _seeded_split(data_dir: Path, wnids: list[str], seed: int, train_fraction: float):
    train_files, train_labels, test_files, test_labels = [], [], [], []
    for label, wnid in enumerate(wnids):
        files = list_images(data_dir / wnid)
        if not files:
            raise ValueError(
                f"{data_dir / wnid} holds no .jpg/.jpeg/.png image; remove the folder or "
                f"restore its images."
            )
        n = len(files)
        # Half rounds up (Python's round() would send 2.5 to 2).
        n_train = math.floor(train_fraction * n + 0.5)
        if n >= 2:
            n_train = min(max(n_train, 1), n - 1)
        # Seeded by the wnid too, so a class's split does not depend on which others exist.
        permutation = np.random.RandomState([seed, int(wnid[1:])]).permutation(n)
        chosen = set(permutation[:n_train].tolist())
        for i, path in enumerate(files):
            if i in chosen:
                train_files.append(path)
                train_labels.append(label)
            else:
                test_files.append(path)
                test_labels.append(label)
    return (train_files, train_labels), (test_files, test_labels)


def _read_list(list_file: Path, data_dir: Path, wnids: list[str]):
    class_of = {w: i for i, w in enumerate(wnids)}
    n_classes = len(wnids)
    files, labels = [], []
    with open(list_file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{list_file}, line {line_number}"
            if len(fields) != 2:
                raise ValueError(
                    f"{where}: expected `relative/path label`, got {line.strip()!r}."
                )
            relative, label_text = fields
            try:
                label = int(label_text)
            except ValueError:
                raise ValueError(f"{where}: label {label_text!r} is not an integer.") from None
            if not 0 <= label < n_classes:
                raise ValueError(
                    f"{where}: label {label} outside 0..{n_classes - 1} "
                    f"({n_classes} class folders in {data_dir})."
                )
            relative = relative.removeprefix(_FOLDER + "/")
            path = data_dir / relative
            if not path.is_file():
                raise ValueError(f"{where}: {path} does not exist.")
            folder = Path(relative).parts[0]
            if folder in class_of and class_of[folder] != label:
                raise ValueError(
                    f"{where}: label {label} but {folder} is class {class_of[folder]} (wnids "
                    f"sorted); this list numbers classes differently, relabel it."
                )
            files.append(path)
            labels.append(label)
    return files, labels
