#!/usr/bin/env python
"""Class-incremental ImageNet-R (B0 Inc20 by default) with CLIPHingeStrategy.

    python experiments/run_imagenet_r.py --data-root data --output-dir runs/imr
    python experiments/run_imagenet_r.py --split-list splits/imr   # train.txt / test.txt
    python experiments/run_imagenet_r.py --config rapf_imagenet_r_b0_inc20 \\
        --split-list RAPF/imgr_split/imgr_train_test_split.txt     # RAPF's protocol

Data: ``<data-root>/imagenet-r/<wnid>/*.jpg`` (the extracted imagenet-r.tar; ``--data-root``
may also name the ``imagenet-r`` folder itself). Without ``--split-list`` a seeded 80/20
split per class is drawn (seed = the config's seed).
The same run: ``cliphinge run --config imagenet_r_b0_inc20 ...``.
"""

import sys

from avalanche_cliphinge.app import process
from avalanche_cliphinge.app.cli import main

if __name__ == "__main__":
    process.claim()  # a process of its own: no interpreter teardown after a success
    sys.exit(
        process.finish(
            main(
                None,
                __doc__.splitlines()[0],
                "imagenet_r_b0_inc20",
                dataset="imagenet_r",
                prog="run_imagenet_r.py",
            )
        )
    )
