#!/usr/bin/env python
"""Mean ± std over finished runs (seeds), one row per (config, method).

    python experiments/run_split_cifar.py --preset smoke --seeds 1993 1994 1995 \
        --output-dir runs/smoke_seeds
    python experiments/aggregate.py runs/smoke_seeds/seed_* --output-dir runs/smoke_summary

Writes summary.md, summary.csv, summary.json and summary_curve.{png,pdf}. The same as
``cliphinge aggregate``.
"""

import sys

from avalanche_cliphinge.app import process
from avalanche_cliphinge.app.aggregate import main

if __name__ == "__main__":
    process.claim()  # a process of its own: no interpreter teardown after a success
    sys.exit(process.finish(main()))
