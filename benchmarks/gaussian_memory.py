#!/usr/bin/env python
"""Peak memory of the class Gaussians: fit, sample and checkpoint N synthetic classes.

    # 1,000 classes of 512-d features on the CPU, every storage mode
    python benchmarks/gaussian_memory.py --classes 1000 --device cpu
    # the same from the speed benchmark
    python benchmarks/speed.py --classes 1000 --device cpu

Prints one JSON line per storage mode and phase: ``gaussian_fit`` (the classes fitted in
``--tasks`` experiences, as a run adds them), ``gaussian_sample`` (one replay draw of
``--samples-per-class`` features of every class, the per-epoch volume; see below) and
``gaussian_checkpoint`` (the Gaussians' state saved with ``torch.save``, the model freed,
the file loaded back with ``load_state_dict(assign=True)`` as ``load_model`` does).

``peak_mib`` is the phase's peak memory above the process's memory before any Gaussian
existed (the synthetic features are not counted; the draws and the loaded file are);
``stored_factor_mib`` the factors held after the fit (``ClassGaussians.factor_bytes``) and
``ratio`` their quotient.

``gaussian_sample`` draws twice. First into the caller's output (``sample(..., out=buffer)``,
the buffer allocated and written before the base, like the features): ``peak_mib`` and
``ratio`` are the memory the call itself takes, besides the features the caller asked for,
whose size is ``output_mib``. Then a draw that allocates its output (``sample(...)``):
``peak_with_output_mib`` and ``ratio_with_output`` count the ``output_mib`` of features too
(from the same base). On the CPU every (storage, phase) runs in a fresh process with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the
resident set at once, and the peak is the kernel's high-water mark (``VmHWM``), reset at the
start of the phase (``/proc/self/clear_refs``). On CUDA the peak is torch's allocator's
(``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from avalanche_cliphinge.gaussian import ClassGaussians
from avalanche_cliphinge.gaussian_storage import DEFAULT_CHUNK_BYTES, STORAGES

PHASES = ("gaussian_fit", "gaussian_sample", "gaussian_checkpoint")
MIB = 1 << 20


class Memory:
    """Bytes in use on ``device`` now and at the peak since ``reset``: the resident set of
    this process on the CPU (Linux ``/proc``), torch's allocator on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def _status(self, field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024

    def now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM")


def synthetic_features(classes: int, per_class: int, dim: int, device: torch.device, seed: int = 0):
    """``(features [classes * per_class, dim], labels)``: class ``c`` around its own random
    mean; the covariance's values do not change the memory."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 1, dim, generator=generator)
    feats = means + 0.1 * torch.randn(classes, per_class, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return feats.reshape(-1, dim).to(device), labels.to(device)


def fit_in_tasks(gaussians: ClassGaussians, feats, labels, tasks: int) -> None:
    """Fit the classes in ``tasks`` experiences of consecutive class ids."""
    classes = int(labels.max()) + 1
    bounds = torch.linspace(0, classes, tasks + 1).round().long().tolist()
    for low, high in zip(bounds, bounds[1:]):
        keep = (labels >= low) & (labels < high)
        gaussians.fit(feats[keep], labels[keep])


def measure(
    phase: str,
    classes: int,
    dim: int = 512,
    storage: str = "full",
    rank: int = 64,
    device: str = "cpu",
    tasks: int = 10,
    per_class: int = 16,
    samples_per_class: int = 20,
    state: Optional[str] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Dict[str, object]:
    """Run ``phase`` (one of ``PHASES``) in this process and return its JSON record.

    Meant for a fresh process (``report`` starts one per phase): what ran before in the
    process counts into the CPU figures. ``state``: a file for the fitted Gaussians'
    state; ``gaussian_fit`` writes it (after measuring), the other phases then load it
    instead of fitting again.
    """
    dev = torch.device(device)
    memory = Memory(dev)
    # library workspaces (LAPACK, thread pools) are made by a first small fit and draw
    warm = ClassGaussians(dim, storage, min(rank, dim))
    warm.fit(*synthetic_features(2, 4, dim, dev))
    warm.sample([0, 1], 2)
    del warm
    feats, labels = synthetic_features(classes, per_class, dim, dev)
    gaussians = ClassGaussians(dim, storage, rank, chunk_bytes)
    buffer = None
    if phase == "gaussian_sample":  # the caller's output, resident before the base
        buffer = torch.empty(classes * samples_per_class, dim, device=dev).zero_()
    base = memory.now()
    if phase != "gaussian_fit" and state is not None:
        gaussians.load_state_dict(
            torch.load(state, map_location=dev, weights_only=True), assign=True
        )
    elif phase != "gaussian_fit":
        fit_in_tasks(gaussians, feats, labels, tasks)
    stored = gaussians.factor_bytes
    extra: Dict[str, object] = {}
    memory.reset()
    start = time.perf_counter()
    if phase == "gaussian_fit":
        fit_in_tasks(gaussians, feats, labels, tasks)
        stored = gaussians.factor_bytes
        extra["tasks"] = tasks
    elif phase == "gaussian_sample":
        every = list(range(classes))
        gaussians.sample(every, samples_per_class, torch.Generator(dev).manual_seed(0), buffer)
        peak_into_buffer = memory.peak() - base
        seconds = time.perf_counter() - start  # of the first draw
        memory.reset()
        drawn, _ = gaussians.sample(every, samples_per_class, torch.Generator(dev).manual_seed(0))
        assert torch.equal(drawn, buffer)
        peak_with_output = memory.peak() - base
        del drawn
        extra.update(
            samples_per_class=samples_per_class,
            output_mib=round(buffer.numel() * buffer.element_size() / MIB, 1),
            peak_with_output_mib=round(peak_with_output / MIB, 1),
            ratio_with_output=round(peak_with_output / stored, 3),
        )
    elif phase == "gaussian_checkpoint":
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "gaussians.pt"
            torch.save({k: v.detach().cpu() for k, v in gaussians.state_dict().items()}, path)
            extra["file_mib"] = round(path.stat().st_size / MIB, 1)
            del gaussians
            loaded = ClassGaussians(dim, storage, rank, chunk_bytes).to(dev)
            loaded.load_state_dict(
                torch.load(path, map_location=dev, weights_only=True), assign=True
            )
            assert loaded.factor_bytes == stored
    else:
        raise ValueError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    if phase == "gaussian_sample":
        peak = peak_into_buffer
    else:
        seconds = time.perf_counter() - start
        peak = memory.peak() - base
    if phase == "gaussian_fit" and state is not None:
        torch.save(gaussians.state_dict(), state)
    return {
        "phase": phase,
        "classes": classes,
        "dim": dim,
        "storage": storage,
        **({"rank": rank} if storage == "lowrank" else {}),
        "device": dev.type,
        "peak_mib": round(peak / MIB, 1),
        "stored_factor_mib": round(stored / MIB, 1),
        "ratio": round(peak / stored, 3),
        "seconds": round(seconds, 1),
        **extra,
    }


def report(
    classes: int,
    storages: Optional[List[str]] = None,
    device: str = "cpu",
    dim: int = 512,
    rank: int = 64,
    tasks: int = 10,
    per_class: int = 16,
    samples_per_class: int = 20,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> List[Dict[str, object]]:
    """Measure every phase of every storage in its own process; print and return the
    records (one JSON line each)."""
    records = []
    tasks = min(tasks, classes)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as folder:
        for storage in storages or list(STORAGES):
            state = str(Path(folder) / f"{storage}.pt")
            for phase in PHASES:
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    phase,
                    "--classes",
                    str(classes),
                    "--storage",
                    storage,
                    "--device",
                    device,
                    "--dim",
                    str(dim),
                    "--rank",
                    str(rank),
                    "--tasks",
                    str(tasks),
                    "--per-class",
                    str(per_class),
                    "--samples-per-class",
                    str(samples_per_class),
                    "--chunk-bytes",
                    str(chunk_bytes),
                    "--state",
                    state,
                ]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{phase} of {storage} failed:\n{done.stderr[-2000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(record), flush=True)
                records.append(record)
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--storage", nargs="+", default=list(STORAGES), choices=STORAGES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64, help="lowrank's gaussian_rank")
    parser.add_argument(
        "--tasks", type=int, default=10, help="gaussian_fit: experiences the classes arrive in"
    )
    parser.add_argument("--per-class", type=int, default=16, help="synthetic features per class")
    parser.add_argument(
        "--samples-per-class",
        type=int,
        default=20,
        help="gaussian_sample: features drawn per class",
    )
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help="ClassGaussians' chunk_bytes (the most transient memory of fit and sample)",
    )
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("classes", "dim", "rank", "tasks", "samples_per_class", "chunk_bytes"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.per_class < 2:
        parser.error(
            f"--per-class must be at least 2 (a covariance needs two samples), got {args.per_class}"
        )
    if args.tasks > args.classes:
        parser.error(
            f"--tasks {args.tasks} exceeds --classes {args.classes}: every task needs a class"
        )
    settings = dict(
        dim=args.dim,
        rank=args.rank,
        device=args.device,
        tasks=args.tasks,
        per_class=args.per_class,
        samples_per_class=args.samples_per_class,
        chunk_bytes=args.chunk_bytes,
    )
    if args.child:
        print(
            json.dumps(
                measure(
                    args.child, args.classes, storage=args.storage[0], state=args.state, **settings
                )
            )
        )
    else:
        report(args.classes, args.storage, **settings)


if __name__ == "__main__":
    main()
