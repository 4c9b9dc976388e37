#!/usr/bin/env python
"""CLIPHingeStrategy, its ablations, Avalanche's own strategies and zero-shot CLIP on one stream.

    python experiments/compare.py --benchmark smoke --output-dir runs/compare_smoke
    python experiments/compare.py --benchmark split_cifar100 --data-root data --seeds 0 1 \
        --strategies zeroshot naive lwf ewc replay gdumb cliphinge --ablations no_replay

One frozen CLIP (loaded once), one stream, one evaluation setup for every entry. Writes
comparison.md / .csv / .json, accuracy_vs_task.png and TensorBoard runs under tb/<entry>.
"""

import sys

from avalanche_cliphinge.app import process
from avalanche_cliphinge.app.compare_cli import main

if __name__ == "__main__":
    process.claim()  # a process of its own: no interpreter teardown after a success
    sys.exit(process.finish(main()))
