#!/usr/bin/env python
"""Class-incremental CIFAR-100 (B0 Inc10 by default) with CLIPHingeStrategy.

    python experiments/run_split_cifar.py --data-root data --output-dir runs/cifar100
    python experiments/run_split_cifar.py --config cifar100_b50_inc10   # a preset
    python experiments/run_split_cifar.py --preset smoke      # offline, tiny CLIP, < 1 min

Data: ``<data-root>/cifar-100-python/{train,test,meta}`` (torchvision's layout); ``--download``
fetches it on a machine with internet.
The same run: ``cliphinge run --config cifar100_b0_inc10 ...``.
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
                "cifar100_b0_inc10",
                dataset="cifar100",
                prog="run_split_cifar.py",
            )
        )
    )
