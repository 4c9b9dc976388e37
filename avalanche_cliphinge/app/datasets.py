"""The streams a run builds, chosen by the config's ``dataset``: CIFAR-100, ImageNet-R or an
image folder (``synthetic`` is the smoke preset's, built in ``cli``).

Each dataset has a check, run before CLIP loads so a missing folder fails at once, and a
factory that builds the stream with the backbone's transforms.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, Tuple

from ..config import CLIPHingeConfig, ConfigError
from ..model.backbone import CLIPBackbone

CIFAR_FOLDER = "cifar-100-python"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that only some datasets read."""
    parser.add_argument(
        "--split-list",
        default=None,
        help="ImageNet-R: a folder holding train.txt and test.txt "
        "('relative/path label' lines), or RAPF's "
        "imgr_train_test_split.txt ('train', paths, 'test', paths); "
        "default: seeded 80/20 split per class",
    )


def _train_transform(args, backbone: CLIPBackbone):
    return backbone.train_transform if args.augment else backbone.eval_transform


def check_cifar_files(args, config: CLIPHingeConfig) -> None:
    """``<data-root>/cifar-100-python/{train,test,meta}`` exist (or ``--download``)."""
    if args.download:
        return
    root = Path(args.data_root).expanduser()
    folder = root / CIFAR_FOLDER
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected {folder}/{{train,test,meta}} (missing "
            f"{', '.join(missing)}); add --download on a machine with internet, or extract "
            f"{CIFAR_URL} into {root}"
        )


def cifar_stream(args, config: CLIPHingeConfig, backbone: CLIPBackbone):
    """Avalanche's SplitCIFAR100 (or nc_benchmark for unequal tasks) with CLIP's transforms."""
    from ..benchmarks import device_resize_transforms, split_cifar100

    order = list(range(100)) if config.class_order == "natural" else config.class_order
    train_tf, eval_tf = _train_transform(args, backbone), backbone.eval_transform
    if config.resize_on_device:
        # 32-px uint8 tensors; the model resizes to its input size and normalises on its device
        train_tf, eval_tf = device_resize_transforms(args.augment)
    return split_cifar100(
        args.data_root,
        init_class=config.init_class,
        increment=config.increment,
        class_order=order,
        train_transform=train_tf,
        eval_transform=eval_tf,
        download=args.download,
    )


def check_imagenet_r_files(args, config: CLIPHingeConfig) -> None:
    """Class folders under ``--data-root`` and, when given, the ``--split-list`` files."""
    from ..benchmarks import IMAGENET_R_WNIDS

    root = Path(args.data_root).expanduser()
    if not any(
        (folder / wnid).is_dir()
        for folder in (root / "imagenet-r", root)
        for wnid in IMAGENET_R_WNIDS
    ):
        raise FileNotFoundError(
            f"ImageNet-R not found: expected {root}/imagenet-r/<wnid>/*.jpg (class folders "
            f"such as n01443537); download {IMAGENET_R_URL} and extract it into {root}"
        )
    if args.split_list is not None and not Path(args.split_list).is_file():
        lists = [Path(args.split_list) / name for name in ("train.txt", "test.txt")]
        missing = [str(p) for p in lists if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"--split-list {args.split_list} lacks {', '.join(missing)}: pass a folder "
                "holding train.txt and test.txt ('imagenet-r/<wnid>/<file> <label>' lines) or "
                "RAPF's imgr_train_test_split.txt file"
            )


def imagenet_r_stream(args, config: CLIPHingeConfig, backbone: CLIPBackbone):
    """ImageNet-R with CLIP's transforms and the requested split."""
    if config.resize_on_device:
        raise ValueError(
            "resize_on_device needs images of one size (CIFAR); ImageNet-R images "
            "differ in size: --set resize_on_device=false"
        )
    from ..benchmarks import split_imagenet_r

    order = None if config.class_order == "natural" else config.class_order
    return split_imagenet_r(
        args.data_root,
        init_class=config.init_class,
        increment=config.increment,
        split=args.split_list or "seeded",
        seed=config.seed,
        class_order=order,
        train_transform=_train_transform(args, backbone),
        eval_transform=backbone.eval_transform,
    )


def check_image_folder(args, config: CLIPHingeConfig) -> None:
    """``<data-root>/train`` and ``<data-root>/test`` exist."""
    root = Path(args.data_root).expanduser()
    missing = [side for side in ("train", "test") if not (root / side).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"image folder {root} lacks {', '.join(missing)}/: expected "
            f"{root}/{{train,test}}/<class>/*.jpg"
        )


def image_folder_stream(args, config: CLIPHingeConfig, backbone: CLIPBackbone):
    """Any ``train/<class>/*``, ``test/<class>/*`` tree (class ids: sorted folder names)."""
    from ..benchmarks import split_image_folder

    if config.resize_on_device:
        raise ValueError(
            "resize_on_device needs images of one size; an image folder may hold "
            "any size: --set resize_on_device=false"
        )
    order = None if config.class_order == "natural" else config.class_order
    if isinstance(order, str):
        raise ConfigError(
            f"class_order '{order}' is a CIFAR-100 order; an image folder takes "
            "'natural' (sorted folder names) or a list of class ids"
        )
    return split_image_folder(
        args.data_root,
        init_class=config.init_class,
        increment=config.increment,
        class_order=order,
        train_transform=_train_transform(args, backbone),
        eval_transform=backbone.eval_transform,
    )


StreamFactory = Callable[[argparse.Namespace, CLIPHingeConfig, CLIPBackbone], object]
DataCheck = Callable[[argparse.Namespace, CLIPHingeConfig], None]

#: ``dataset`` config value -> (its check, its stream factory).
DATASETS: Dict[str, Tuple[DataCheck, StreamFactory]] = {
    "cifar100": (check_cifar_files, cifar_stream),
    "imagenet_r": (check_imagenet_r_files, imagenet_r_stream),
    "image_folder": (check_image_folder, image_folder_stream),
}


def dataset_entry(config: CLIPHingeConfig) -> Tuple[DataCheck, StreamFactory]:
    """The check and factory of ``config.dataset``; ``ConfigError`` for an unknown one."""
    if config.dataset not in DATASETS:
        raise ConfigError(
            f"dataset '{config.dataset}' has no stream builder; use one of "
            f"{', '.join(DATASETS)} (--set dataset=...), or --preset smoke"
        )
    return DATASETS[config.dataset]
