"""Split CIFAR-100 with the class orders used in the literature (iCaRL's, PyCIL's)."""

from __future__ import annotations

import pickle
import socket
import urllib.error
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from torchvision import transforms
from torchvision.datasets import CIFAR100
from torchvision.datasets import cifar as tv_cifar

from avalanche.benchmarks.classic import SplitCIFAR100
from avalanche.benchmarks.datasets.external_datasets.cifar import get_cifar100_dataset

from .common import (
    NamedBenchmark,
    check_class_order,
    check_task_split,
    default_transform,
    describe_stream,
    make_nc_benchmark,
)

# iCaRL's order, reused by PODNet, DER, Continual-CLIP and Avalanche's reproducibility runs.
_ICARL_ORDER = [
    87,
    0,
    52,
    58,
    44,
    91,
    68,
    97,
    51,
    15,
    94,
    92,
    10,
    72,
    49,
    78,
    61,
    14,
    8,
    86,
    84,
    96,
    18,
    24,
    32,
    45,
    88,
    11,
    4,
    67,
    69,
    66,
    77,
    47,
    79,
    93,
    29,
    50,
    57,
    83,
    17,
    81,
    41,
    12,
    37,
    59,
    25,
    20,
    80,
    73,
    1,
    28,
    6,
    46,
    62,
    82,
    53,
    9,
    31,
    75,
    38,
    63,
    33,
    74,
    27,
    22,
    36,
    3,
    16,
    21,
    60,
    19,
    70,
    90,
    89,
    43,
    5,
    42,
    65,
    76,
    40,
    30,
    23,
    85,
    2,
    95,
    56,
    48,
    71,
    64,
    98,
    13,
    99,
    7,
    34,
    55,
    54,
    26,
    35,
    39,
]

CIFAR100_ORDERS: dict[str, list[int]] = {
    "icarl": _ICARL_ORDER,
    # RAPF's released class_orders/cifar100_order.yaml is iCaRL's order (an earlier commit of
    # that file held another permutation, superseded).
    "rapf": _ICARL_ORDER,
    # PyCIL / PILOT / PROOF: numpy's legacy RNG with seed 1993.
    "pycil": np.random.RandomState(1993).permutation(100).tolist(),
}

_FOLDER = CIFAR100.base_folder  # "cifar-100-python"
_FILES = {name: md5 for name, md5 in CIFAR100.train_list + CIFAR100.test_list}
_FILES[CIFAR100.meta["filename"]] = CIFAR100.meta["md5"]


def split_cifar100(
    root: Union[str, Path],
    *,
    init_class: int = 10,
    increment: int = 10,
    class_order: Union[str, Sequence[int]] = "icarl",
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
    download: bool = False,
) -> NamedBenchmark:
    """Class-incremental CIFAR-100: `init_class` classes in task 0, `increment` in each later one.

    Args:
        root: folder that holds (or will hold, with `download=True`) `cifar-100-python/` with the
            `train`, `test` and `meta` files of the official Python release.
        init_class: classes in the first task (B0 Inc10: 10; B50 Inc10: 50).
        increment: classes in every later task.
        class_order: "icarl", "rapf", "pycil" (see `CIFAR100_ORDERS`) or an explicit permutation
            of the 100 class ids.
        train_transform: applied to training images (PIL 32x32 RGB); `None` -> `ToTensor()`.
        eval_transform: applied to test images; `None` -> `ToTensor()`.
        download: fetch the dataset with torchvision if it is missing. When False a missing
            dataset is an error and nothing is downloaded.

    Returns:
        NamedBenchmark: 1 + (100 - init_class) / increment experiences; targets are the original
        CIFAR-100 fine-label ids (0..99), `class_names[k]` the fine label name of id k with
        underscores as spaces ("aquarium fish").

    Raises:
        FileNotFoundError: a `cifar-100-python` file is missing (`DownloadError` when
            `download=True` and the download fails).
        ValueError: the class counts do not add up to 100, an unknown order name, or an explicit
            order that is not a permutation of 0..99; or corrupt files with `download=False`.

    Equal tasks go through Avalanche's own `SplitCIFAR100`; a larger first task (B50 Inc10, ...)
    goes through `nc_benchmark` over the same torchvision datasets with `per_exp_classes`.
    """
    root = Path(root).expanduser()
    n_experiences = check_task_split(100, init_class, increment)
    order_name, order = _resolve_order(class_order)
    if download:
        _download(root)
    _check_files(root)
    if train_transform is None:
        train_transform = default_transform()
    if eval_transform is None:
        eval_transform = default_transform()

    if init_class == increment:
        benchmark = SplitCIFAR100(
            n_experiences=n_experiences,
            fixed_class_order=order,
            return_task_id=False,
            train_transform=train_transform,
            eval_transform=eval_transform,
            dataset_root=root,
        )
        builder = "avalanche SplitCIFAR100"
    else:
        train_set, test_set = get_cifar100_dataset(root)
        benchmark = make_nc_benchmark(
            train_set, test_set, order, init_class, increment, train_transform, eval_transform
        )
        builder = "avalanche nc_benchmark(per_exp_classes)"

    protocol = describe_stream(
        benchmark,
        name="split_cifar100",
        dataset="cifar100",
        root=str(root),
        class_order_name=order_name,
        class_order=order,
        init_class=init_class,
        increment=increment,
        n_classes=100,
        split="official CIFAR-100 train (50,000) / test (10,000)",
        builder=builder,
        seed=None,
    )
    return NamedBenchmark(benchmark, _class_names(root), order, protocol)


def _resolve_order(class_order) -> tuple[str, list[int]]:
    if isinstance(class_order, str):
        if class_order not in CIFAR100_ORDERS:
            raise ValueError(
                f"Unknown CIFAR-100 class_order {class_order!r}: use one of "
                f"{sorted(CIFAR100_ORDERS)} or a list of the 100 class ids."
            )
        return class_order, list(CIFAR100_ORDERS[class_order])
    return "explicit", check_class_order(class_order, 100)


def device_resize_transforms(augment: bool = False) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms for a model that resizes and normalises on its device.

    Each 32-px PIL image becomes a ``uint8 [3, 32, 32]`` tensor (``PILToTensor``): no float
    conversion on the host and a quarter of ``ToTensor``'s bytes to copy to the device, where
    ``images.float() / 255`` gives exactly ``ToTensor``'s values. ``augment`` adds a mild
    ``RandomResizedCrop(32, scale=(0.9, 1.0))`` to the training transform.
    """
    eval_tf = transforms.PILToTensor()
    train_tf = (
        transforms.Compose([transforms.RandomResizedCrop(32, scale=(0.9, 1.0)), eval_tf])
        if augment
        else eval_tf
    )
    return train_tf, eval_tf


class DownloadError(FileNotFoundError):
    """The dataset is missing and could not be downloaded (offline, blocked, server down)."""


def _download(root: Path) -> None:
    """Fetch and extract `cifar-100-python` into `root` with torchvision (a no-op when the
    files are there and intact); `DownloadError` in one line when the network fails."""
    try:
        CIFAR100(str(root), train=True, download=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(
            f"could not download CIFAR-100 into {root} ({reason}); offline? Download "
            f"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz on a machine with "
            f"internet and extract it into {root}, then run without --download"
        ) from None


def _check_files(root: Path) -> None:
    folder = root / _FOLDER
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}; expected "
            f"{root}/{_FOLDER}/{{train,test,meta}}. Run with --download on a machine "
            f"with internet, or copy the extracted {_FOLDER} folder into {root}."
        )
    # torchvision re-downloads files whose md5 is wrong; with download=False say so instead.
    corrupt = [n for n, md5 in _FILES.items() if not tv_cifar.check_integrity(str(folder / n), md5)]
    if corrupt:
        raise ValueError(
            f"CIFAR-100 files {corrupt} in {folder} fail torchvision's md5 check; replace them "
            f"with the files of the official cifar-100-python.tar.gz (or use --download)."
        )


def _class_names(root: Path) -> list[str]:
    # The same file and key torchvision's CIFAR100 reads into `.classes`.
    with open(root / _FOLDER / CIFAR100.meta["filename"], "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    return [name.replace("_", " ") for name in meta[CIFAR100.meta["key"]]]
