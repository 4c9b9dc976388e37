#!/usr/bin/env python
"""Class-incremental CIFAR-100 (B0 Inc10 by default) with CLIPHingeStrategy.

    python experiments/run_split_cifar.py --data-root data --output-dir runs/cifar100
    python experiments/run_split_cifar.py --preset smoke      # offline, tiny CLIP, < 1 min

Data: ``<data-root>/cifar-100-python/{train,test,meta}`` (torchvision's layout); ``--download``
fetches it on a machine with internet.
"""
import sys
from pathlib import Path

from avalanche_cliphinge.cli import main

CIFAR_FOLDER = "cifar-100-python"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def check_cifar_files(args, config):
    """Fail at once, before CLIP loads, when the config is another dataset's or the CIFAR-100
    files are not where expected."""
    if config.dataset != "cifar100":
        raise ValueError(f"config {args.config} is for dataset '{config.dataset}', not "
                         "CIFAR-100; run experiments/run_imagenet_r.py for ImageNet-R")
    if args.download:
        return
    root = Path(args.data_root).expanduser()
    folder = root / CIFAR_FOLDER
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected {folder}/{{train,test,meta}} (missing "
            f"{', '.join(missing)}); add --download on a machine with internet, or extract "
            f"{CIFAR_URL} into {root}")


def cifar_stream(args, config, backbone):
    """Avalanche's SplitCIFAR100 (or nc_benchmark for unequal tasks) with CLIP's transforms."""
    from benchmarks import device_resize_transforms, split_cifar100

    order = list(range(100)) if config.class_order == "natural" else config.class_order
    train_tf = backbone.train_transform if args.augment else backbone.eval_transform
    eval_tf = backbone.eval_transform
    if config.resize_on_device:
        # 32-px uint8 tensors; the model resizes to its input size and normalises on its device
        train_tf, eval_tf = device_resize_transforms(args.augment)
    return split_cifar100(args.data_root, init_class=config.init_class,
                          increment=config.increment, class_order=order,
                          train_transform=train_tf, eval_transform=eval_tf,
                          download=args.download)


if __name__ == "__main__":
    sys.exit(main(None, __doc__.splitlines()[0], "cifar100_b0_inc10",
                  cifar_stream, check_data=check_cifar_files))
