#!/usr/bin/env python
"""Class-incremental ImageNet-R (B0 Inc20 by default) with CLIPHingeStrategy.

    python experiments/run_imagenet_r.py --data-root data --output-dir runs/imr
    python experiments/run_imagenet_r.py --split-list splits/imr   # train.txt / test.txt
    python experiments/run_imagenet_r.py --config rapf_imagenet_r_b0_inc20 \
        --split-list RAPF/imgr_split/imgr_train_test_split.txt     # RAPF's protocol

Data: ``<data-root>/imagenet-r/<wnid>/*.jpg`` (the extracted imagenet-r.tar; ``--data-root``
may also name the ``imagenet-r`` folder itself). Without ``--split-list`` a seeded 80/20
split per class is drawn (seed = the config's seed).
"""
import sys
from pathlib import Path

from avalanche_cliphinge.cli import main

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def check_imagenet_r_files(args, config):
    """Fail at once, before CLIP loads, when the config is another dataset's or the class
    folders or split lists are missing."""
    from benchmarks import IMAGENET_R_WNIDS

    if config.dataset != "imagenet_r":
        raise ValueError(f"config {args.config} is for dataset '{config.dataset}', not "
                         "ImageNet-R; run experiments/run_split_cifar.py for CIFAR-100")

    root = Path(args.data_root).expanduser()
    if not any((folder / wnid).is_dir() for folder in (root / "imagenet-r", root)
               for wnid in IMAGENET_R_WNIDS):
        raise FileNotFoundError(
            f"ImageNet-R not found: expected {root}/imagenet-r/<wnid>/*.jpg (class folders "
            f"such as n01443537); download {IMAGENET_R_URL} and extract it into {root}")
    if args.split_list is not None and not Path(args.split_list).is_file():
        lists = [Path(args.split_list) / name for name in ("train.txt", "test.txt")]
        missing = [str(p) for p in lists if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"--split-list {args.split_list} lacks {', '.join(missing)}: pass a folder "
                "holding train.txt and test.txt ('imagenet-r/<wnid>/<file> <label>' lines) or "
                "RAPF's imgr_train_test_split.txt file")


def imagenet_r_stream(args, config, backbone):
    """ImageNet-R stream with CLIP's transforms and the requested split."""
    if config.resize_on_device:
        raise ValueError("resize_on_device needs images of one size (CIFAR); ImageNet-R images "
                         "differ in size: --set resize_on_device=false")
    from benchmarks import split_imagenet_r

    split = args.split_list or "seeded"
    order = None if config.class_order == "natural" else config.class_order
    return split_imagenet_r(args.data_root, init_class=config.init_class,
                            increment=config.increment, split=split, seed=config.seed,
                            class_order=order,
                            train_transform=(backbone.train_transform if args.augment
                                             else backbone.eval_transform),
                            eval_transform=backbone.eval_transform)


def split_list_option(parser):
    """``--split-list``: a published split, in either of the two formats."""
    parser.add_argument("--split-list", default=None,
                        help="a folder holding train.txt and test.txt ('relative/path label' "
                             "lines), or RAPF's imgr_train_test_split.txt ('train', paths, "
                             "'test', paths); default: seeded 80/20 split per class")


if __name__ == "__main__":
    sys.exit(main(None, __doc__.splitlines()[0], "imagenet_r_b0_inc20",
                  imagenet_r_stream, split_list_option, check_data=check_imagenet_r_files))
