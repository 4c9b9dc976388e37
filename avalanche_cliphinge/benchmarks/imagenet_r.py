"""Split ImageNet-R: 200 classes of renditions (art, cartoons, sketches...) of ImageNet classes.

ImageNet-R ships no train/test split. The continual-learning convention is a fixed 80/20 split;
this module makes one deterministically from a seed, or reads a published list.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .common import (
    ImageFileDataset,
    NamedBenchmark,
    check_class_order,
    check_task_split,
    default_transform,
    describe_stream,
    make_nc_benchmark,
)
from .imagenet_r_classes import IMAGENET_R_CLASS_NAMES, IMAGENET_R_WNIDS
from .imagenet_r_files import find_data_dir, image_key, read_list, read_rapf_list, seeded_split

#: Named class orders: indices into the 200 sorted wnids. "rapf" is RAPF's released
#: class_orders/imagenet_R_order.yaml (ECCV'24 code).
IMAGENET_R_ORDERS: dict[str, list[int]] = {
    "rapf": [
        29,
        75,
        18,
        9,
        62,
        46,
        133,
        54,
        89,
        24,
        135,
        158,
        119,
        198,
        49,
        96,
        32,
        21,
        79,
        3,
        65,
        131,
        191,
        30,
        140,
        113,
        84,
        95,
        188,
        167,
        127,
        164,
        185,
        170,
        168,
        136,
        98,
        12,
        121,
        186,
        193,
        172,
        51,
        19,
        104,
        108,
        161,
        178,
        73,
        152,
        7,
        61,
        39,
        67,
        14,
        91,
        111,
        41,
        56,
        194,
        23,
        145,
        184,
        165,
        189,
        122,
        128,
        48,
        66,
        47,
        148,
        92,
        199,
        109,
        160,
        110,
        132,
        102,
        154,
        107,
        33,
        70,
        80,
        173,
        187,
        97,
        43,
        81,
        153,
        147,
        112,
        17,
        52,
        195,
        144,
        50,
        146,
        40,
        141,
        143,
        106,
        10,
        22,
        115,
        162,
        44,
        1,
        34,
        134,
        26,
        183,
        4,
        87,
        139,
        45,
        94,
        27,
        83,
        130,
        103,
        126,
        138,
        35,
        123,
        190,
        105,
        71,
        88,
        76,
        156,
        180,
        176,
        25,
        37,
        137,
        6,
        15,
        175,
        192,
        63,
        11,
        31,
        8,
        196,
        36,
        159,
        85,
        28,
        77,
        93,
        174,
        78,
        171,
        150,
        42,
        99,
        0,
        2,
        149,
        86,
        72,
        163,
        166,
        117,
        116,
        74,
        125,
        55,
        90,
        120,
        114,
        20,
        182,
        68,
        69,
        181,
        157,
        38,
        59,
        179,
        16,
        177,
        64,
        57,
        5,
        58,
        129,
        13,
        118,
        124,
        100,
        169,
        142,
        155,
        101,
        53,
        82,
        60,
        151,
        197,
    ],
}


def split_imagenet_r(
    root: Union[str, Path],
    *,
    init_class: int = 20,
    increment: int = 20,
    split: Union[str, Path] = "seeded",
    seed: int = 1993,
    train_fraction: float = 0.8,
    class_order: Union[None, str, Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
) -> NamedBenchmark:
    """Class-incremental ImageNet-R (B0 Inc20 by default: 10 tasks of 20 classes).

    Args:
        root: `<root>/imagenet-r/<wnid>/*.jpg`, or the `imagenet-r` folder itself.
        init_class: classes in the first task.
        increment: classes in every later task.
        split: "seeded" for a deterministic per-class split: each class's files, sorted by name,
            are permuted by `numpy.random.RandomState([seed, <wnid digits>])` and the first
            `round(train_fraction * n)` (half rounds up) go to train; a class with >= 2 images
            keeps >= 1 of each. A class's split depends only on its own files and the seed.
            Otherwise a published list: a directory holding `train.txt` and `test.txt`, one
            `relative/path label` per line (e.g. `imagenet-r/n01443537/art_0.jpg 0`), paths
            relative to the folder above `imagenet-r/` or inside it, labels the class ids
            defined below; or one file in RAPF's format (its
            `imgr_split/imgr_train_test_split.txt`): a line `train`, paths `wnid/file.jpg`,
            a line `test`, paths, the label taken from the wnid folder. The format is told
            by the path: a directory or a file.
        seed: seed of the "seeded" split (ignored with split lists).
        train_fraction: share of each class used for training in the "seeded" split, in (0, 1).
        class_order: the class ids in task order; `None` -> ascending ids (0, 1, 2, ...);
            "rapf" -> RAPF's order (`IMAGENET_R_ORDERS`, needs all 200 class folders).
        train_transform: applied to training images (PIL RGB); `None` -> `ToTensor()`. Images
            vary in size: pass a transform that resizes (CLIP's preprocessing) to batch them.
        eval_transform: applied to test images; `None` -> `ToTensor()`.

    Returns:
        NamedBenchmark. With all 200 wnid folders present, class id = position of the wnid in the
        sorted `IMAGENET_R_WNIDS` and `class_names` = `IMAGENET_R_CLASS_NAMES`. With only some
        present (a test tree, a custom subset) the ids index the present wnids in sorted order,
        and a warning says so.

    Raises:
        FileNotFoundError: no wnid folders under `root`, or a split directory without its lists.
        ValueError: a malformed list line (names file and line), an image listed twice
            (in one list, or in both train and test: names the path and both lines), class
            counts that do not add up, or a bad `class_order` / `train_fraction`. A list may
            start with a UTF-8 byte-order mark.
    """
    data_dir = find_data_dir(Path(root).expanduser())
    wnids = [w for w in IMAGENET_R_WNIDS if (data_dir / w).is_dir()]
    known = set(IMAGENET_R_WNIDS)
    strays = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and p.name not in known)
    if strays:
        warnings.warn(
            f"ImageNet-R at {data_dir}: {len(strays)} folder(s) are not ImageNet-R wnids and are "
            f"left out: {', '.join(strays[:5])}{' ...' if len(strays) > 5 else ''}",
            stacklevel=2,
        )
    if len(wnids) < len(IMAGENET_R_WNIDS):
        warnings.warn(
            f"ImageNet-R at {data_dir} has {len(wnids)} of the 200 class folders: class ids "
            f"index the {len(wnids)} present wnids (sorted), not the full 200-class table.",
            stacklevel=2,
        )
    names = [IMAGENET_R_CLASS_NAMES[IMAGENET_R_WNIDS.index(w)] for w in wnids]
    n_classes = len(wnids)
    check_task_split(n_classes, init_class, increment)
    order, order_name = _resolve_order(class_order, n_classes)

    if str(split) == "seeded":
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
        (train_files, train_labels), (test_files, test_labels) = seeded_split(
            data_dir, wnids, seed, train_fraction
        )
        split_record = {
            "split": f"seeded per-class split, train_fraction {train_fraction}, seed {seed}",
            "seed": seed,
        }
    else:
        split_path = Path(split).expanduser()
        if split_path.is_file():
            lists = [split_path]
            (train_files, train_labels), (test_files, test_labels) = read_rapf_list(
                split_path, data_dir, wnids
            )
            split_format = "RAPF's single-file list"
        else:
            lists = [split_path / "train.txt", split_path / "test.txt"]
            missing = [str(p) for p in lists if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"Split list(s) {missing} not found: `split` must be 'seeded', a directory "
                    f"holding train.txt and test.txt (lines `imagenet-r/<wnid>/<file> "
                    f"<label>`), or a file in RAPF's format (`train`, paths, `test`, paths)."
                )
            train_files, train_labels, train_lines = read_list(lists[0], data_dir, wnids)
            test_files, test_labels, test_lines = read_list(lists[1], data_dir, wnids)
            first_line = dict(zip(map(image_key, train_files), train_lines))
            for path, line in zip(test_files, test_lines):
                if image_key(path) in first_line:
                    raise ValueError(
                        f"{path} is in both {lists[0]} (line {first_line[image_key(path)]}) "
                        f"and {lists[1]} (line {line}): a test image must not be trained on; "
                        "keep it in one of the lists."
                    )
            split_format = "train.txt / test.txt lists"
        without_train = sorted(set(range(n_classes)) - set(train_labels))
        if without_train:
            raise ValueError(
                f"{lists[0]} has no training image of class(es) {without_train[:10]} "
                f"({', '.join(wnids[c] for c in without_train[:3])}...); every class present "
                f"in {data_dir} needs training images."
            )
        split_record = {
            "split": f"{split_format}: {', '.join(str(p) for p in lists)}",
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
    return NamedBenchmark(benchmark, names, order, protocol)


def _resolve_order(class_order, n_classes: int) -> tuple[list[int], str]:
    """(class ids in task order, the order's name for the protocol record)."""
    if class_order is None:
        return list(range(n_classes)), "ascending"
    if isinstance(class_order, str):
        if class_order not in IMAGENET_R_ORDERS:
            raise ValueError(
                f"class_order {class_order!r} is not an ImageNet-R order; use 'natural' "
                f"(sorted wnids), {', '.join(repr(k) for k in IMAGENET_R_ORDERS)} or a list "
                f"of class ids."
            )
        if n_classes != len(IMAGENET_R_WNIDS):
            raise ValueError(
                f"class_order {class_order!r} orders the 200 ImageNet-R classes but only "
                f"{n_classes} class folders are present; restore the others or pass a list."
            )
        return list(IMAGENET_R_ORDERS[class_order]), class_order
    return check_class_order(class_order, n_classes), "explicit"
