#!/usr/bin/env python
"""Time ``experiments/run_split_cifar.py`` end to end on random images in CIFAR-100's file format.

    # one GPU: the main entry with everything a run does (loggers, metrics, checkpoints, plots)
    python benchmarks/entry_speed.py -- --device cuda --set precision=bf16
    # 2-core CPU, tiny CLIP, a few images per class
    python benchmarks/entry_speed.py --train-per-class 5 --test-per-class 2 -- --device cpu \
        --set model_name=cliphinge-tiny --set init_epochs=1 --set epochs=1

``speed.py`` times the strategy's phases; this script times what a researcher runs: the entry
point with the CIFAR config, Avalanche's ``SplitCIFAR100`` over torchvision's ``CIFAR100``
(every image through PIL), the evaluation plugin with all its loggers, checkpoints and results.
The images are random, in torchvision's on-disk layout (``cifar-100-python/{train,test,meta}``).
Such files cannot match the md5 sums of the official release, so this process, and only it,
skips torchvision's integrity check. The weights are random (``--set pretrained=null`` is
passed before the arguments after ``--``, which may override it).

Prints one JSON line: ``process_seconds`` (the entry from start to exit, model loading
included), the run's own ``wall_seconds`` and ``train_seconds`` from ``results.json``, and
its exit code.
"""

from __future__ import annotations

import argparse
import json
import pickle
import runpy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_random_cifar100(
    root: Path, train_per_class: int, test_per_class: int, seed: int = 0
) -> None:
    """Random uint8 images ``[n, 3072]`` in the official ``cifar-100-python`` pickles."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def split(per_class: int) -> dict:
        labels = [k for k in range(100) for _ in range(per_class)]
        return {
            "batch_label": "random",
            "filenames": [f"{i}.png" for i in range(len(labels))],
            "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [k // 5 for k in labels],
        }

    meta = {
        "fine_label_names": [f"thing_{k}" for k in range(100)],
        "coarse_label_names": [f"group_{k}" for k in range(20)],
    }
    for name, content in (
        ("train", split(train_per_class)),
        ("test", split(test_per_class)),
        ("meta", meta),
    ):
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    own, entry_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the data and the run go (default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args(own)
    if args.train_per_class < 1 or args.test_per_class < 1:
        parser.error("--train-per-class and --test-per-class must be at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        write_random_cifar100(work / "data", args.train_per_class, args.test_per_class)

        import torchvision.datasets.cifar as tv_cifar

        tv_cifar.check_integrity = lambda *a, **k: True
        tv_cifar.CIFAR10._check_integrity = lambda self: True
        sys.argv = [
            str(ROOT / "experiments/run_split_cifar.py"),
            "--data-root",
            str(work / "data"),
            "--output-dir",
            str(work / "run"),
            "--overwrite",
            "--set",
            "pretrained=null",
            *entry_args,
        ]
        began = time.perf_counter()
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        seconds = time.perf_counter() - began
        results_file = work / "run" / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    print(
        json.dumps(
            {
                "phase": "entry",
                "exit_code": code,
                "process_seconds": round(seconds, 3),
                **{
                    key: (round(results[key], 3) if key in results else None)
                    for key in ("wall_seconds", "train_seconds")
                },
                "completed_tasks": results.get("completed_tasks"),
                "train_images": 100 * args.train_per_class,
                "test_images": 100 * args.test_per_class,
            }
        ),
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
