#!/usr/bin/env python
"""Class-incremental ImageNet-R (B0 Inc20 by default) with CLIPHingeStrategy.

    python experiments/run_imagenet_r.py --data-root data/imagenet-r --output-dir runs/imr
    python experiments/run_imagenet_r.py --split-list splits/imr   # train.txt / test.txt

Data: ``<data-root>/<wnid>/*.jpg`` (the extracted imagenet-r.tar). Without ``--split-list``
a seeded 80/20 split per class is drawn (seed = the config's seed).
"""
import sys

from avalanche_cliphinge.cli import main


def imagenet_r_stream(args, config, backbone):
    """ImageNet-R stream with CLIP's transforms and the requested split."""
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
    """``--split-list``: a folder with the published train.txt / test.txt lists."""
    parser.add_argument("--split-list", default=None,
                        help="folder holding train.txt and test.txt ('relative/path label' "
                             "lines); default: seeded 80/20 split per class")


if __name__ == "__main__":
    sys.exit(main(None, __doc__.splitlines()[0], "experiments/configs/imagenet_r_split.json",
                  imagenet_r_stream, split_list_option))
