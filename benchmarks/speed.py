#!/usr/bin/env python
"""Time every phase of a CLIPHingeStrategy run; print one JSON line per phase.

    # one GPU, ViT-B/16 random weights, CIFAR-100-sized synthetic data, B0 Inc10, both stages
    python benchmarks/speed.py --synthetic --device cuda --set precision=bf16
    # 2-core CPU: tiny CLIP on real CIFAR-10 JPEGs (../shared/data), 5 epochs per task,
    # cached vs uncached
    python benchmarks/speed.py --preset tiny --compare-uncached

Phases: ``feature_extraction`` (frozen-encoder passes over train and test data),
``stage1`` (prompt-learning epochs, hinge included), ``hinge`` (the hinge plugin's share of
stage 1), ``stage2`` (head training), ``evaluation`` (scoring the test stream after every
task, extraction excluded), ``total`` (the whole run), ``bare_image_encoder`` (open_clip's
image encoder alone, same process, same precision) and ``extraction_efficiency``
(extraction throughput / bare throughput). Random weights: timings only, accuracy is
meaningless. ``--compare-uncached`` runs the same config with ``cache_features=false`` and
prints both times, their ratio and whether the metrics agree.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from avalanche_cliphinge import CLIPHingeConfig, CLIPHingeStrategy, build_model, load_clip
from avalanche_cliphinge.cli import SMOKE
from avalanche_cliphinge.plugins import HardPairHingePlugin, SecondStagePlugin
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics

ROOT = Path(__file__).resolve().parents[1]


class ImageTensors(TensorDataset):
    """``(uint8 image [3, 32, 32], label)`` items with a ``targets`` list for Avalanche."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.targets = labels.tolist()


def synthetic_cifar(n_classes: int, train_per_class: int, test_per_class: int, seed: int):
    """CIFAR-100-sized uint8 stream: a random 32-px prototype per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(n_classes, 3, 32, 32, generator=g) * 255

    def split(per_class):
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), 3, 32, 32, generator=g) * 40
        images = (protos[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageTensors(images, labels)

    return split(train_per_class), split(test_per_class)


class PhaseTimer(SupervisedPlugin):
    """Wall time of stage-1 epochs and of evaluation, synchronised on CUDA."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.seconds = {"stage1": 0.0, "evaluation": 0.0}
        self._start = 0.0

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def before_training_epoch(self, strategy, **kwargs):
        self._start = self._now()

    def after_training_epoch(self, strategy, **kwargs):
        self.seconds["stage1"] += self._now() - self._start

    def before_eval(self, strategy, **kwargs):
        self._start = self._now()

    def after_eval(self, strategy, **kwargs):
        self.seconds["evaluation"] += self._now() - self._start


def timed(obj, name, bucket, key, sync, count=None):
    """Wrap ``obj.name`` so its wall time (and optional item count) adds to ``bucket``."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        sync()
        began = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        bucket[key] += time.perf_counter() - began
        if count is not None:
            bucket[count] += count_items(args)
        return out

    setattr(obj, name, wrapper)


def count_items(args):
    return len(args[0]) if args else 0


def run_once(config, bundle, backbone, device):
    """One full run; returns (phase seconds, counts, accuracy matrix, peak GiB)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer(device)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    model = build_model(config, bundle.class_names, device, backbone=backbone)
    strategy = CLIPHingeStrategy(config=config, class_names=bundle.class_names, model=model,
                                 plugins=[timer], evaluator=evaluator, device=device)
    bucket = {"feature_extraction": 0.0, "extracted": 0, "hinge": 0.0, "stage2": 0.0,
              "extraction_in_eval": 0.0}
    timed(strategy, "extract_features", bucket, "feature_extraction", sync, "extracted")
    for plugin in strategy.plugins:
        if isinstance(plugin, HardPairHingePlugin):
            timed(plugin, "before_backward", bucket, "hinge", sync)
        if isinstance(plugin, SecondStagePlugin):
            timed(plugin, "after_training_exp", bucket, "stage2", sync)
    matrix = []
    sync()
    began = time.perf_counter()
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp, eval_streams=[])
        before = bucket["feature_extraction"]
        results = strategy.eval(bundle.benchmark.test_stream)
        bucket["extraction_in_eval"] += bucket["feature_extraction"] - before
        matrix.append([float(v) for k, v in sorted(results.items())
                       if k.startswith("Top1_Acc_Exp")])
    sync()
    total = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    phases = {"feature_extraction": bucket["feature_extraction"],
              "stage1": timer.seconds["stage1"], "hinge": bucket["hinge"],
              "stage2": bucket["stage2"],
              "evaluation": timer.seconds["evaluation"] - bucket["extraction_in_eval"],
              "total": total}
    return phases, bucket["extracted"], matrix, peak


@torch.no_grad()
def bare_encoder_throughput(backbone, device, batch, precision, repeats=10):
    """Images/s of open_clip's image encoder alone on random input at its resolution."""
    size = backbone.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    visual = backbone.model.visual
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if precision == "bf16" and device.type == "cuda" else torch.autocast(
                    "cpu", enabled=False))
    with autocast:
        for _ in range(3):
            visual(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(repeats):
            visual(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - began)


def emit(record):
    print(json.dumps(record), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/cifar100_split.json"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--synthetic", action="store_true",
                        help="CIFAR-100-sized uint8 32-px data, resized on the device")
    parser.add_argument("--preset", choices=["tiny"], default=None,
                        help="tiny: the smoke preset's tiny CLIP on the JPEG folder of "
                             "--data-root with CLIP's eval transform, 5 epochs per task")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg-subset"),
                        help="--preset tiny: a root/{train,test}/<class>/*.jpg tree "
                             "(default: the CIFAR-10 JPEG subset in ../shared/data)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--bare-batch", type=int, default=512)
    parser.add_argument("--compare-uncached", action="store_true")
    args = parser.parse_args(argv)
    if not args.synthetic and args.preset is None:
        parser.error("choose --synthetic (CIFAR-sized data) or --preset tiny")
    device = torch.device(args.device)
    config = CLIPHingeConfig.from_json(args.config)
    if args.preset == "tiny":
        tiny = {**SMOKE, "init_epochs": 5, "epochs": 5, "lr_decay_epochs": [],
                "batch_size": config.batch_size}
        config = config.replace(**tiny)
    else:
        config = config.replace(pretrained=None, resize_on_device=True, class_order="natural")
    config = config.with_overrides(args.set)
    backbone = load_clip(config.model_name, config.pretrained, device=device)
    if args.preset == "tiny":
        from benchmarks import split_image_folder

        bundle = split_image_folder(args.data_root, init_class=config.init_class,
                                    increment=config.increment,
                                    train_transform=backbone.eval_transform,
                                    eval_transform=backbone.eval_transform)
    else:
        from avalanche.benchmarks import nc_benchmark

        from benchmarks.common import StreamBundle

        train, test = synthetic_cifar(config.n_classes, args.train_per_class,
                                      args.test_per_class, config.seed)
        per_exp = {0: config.init_class} if config.init_class != config.increment else None
        benchmark = nc_benchmark(train, test, config.total_tasks, task_labels=False,
                                 fixed_class_order=list(range(config.n_classes)),
                                 per_exp_classes=per_exp)
        bundle = StreamBundle(benchmark=benchmark,
                              class_names=[f"class {i}" for i in range(config.n_classes)],
                              class_order=list(range(config.n_classes)),
                              protocol={"name": "synthetic-cifar"})
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    emit({"phase": "setup", "device": device_name, "model": config.model_name,
          "precision": config.precision, "compile": config.compile and device.type == "cuda",
          "tasks": config.total_tasks, "epochs": [config.init_epochs, config.epochs],
          "second_stage_epochs": config.second_stage_epochs,
          "train_images": sum(len(e.dataset) for e in bundle.benchmark.train_stream),
          "test_images": sum(len(e.dataset) for e in bundle.benchmark.test_stream),
          "torch": torch.__version__})
    bare = bare_encoder_throughput(backbone, device, args.bare_batch, config.precision)
    emit({"phase": "bare_image_encoder", "images_per_s": round(bare, 1),
          "batch": args.bare_batch})
    phases, extracted, matrix, peak = run_once(config, bundle, backbone, device)
    for name, seconds in phases.items():
        record = {"phase": name, "seconds": round(seconds, 3)}
        if name == "feature_extraction":
            record["images"] = extracted
            record["images_per_s"] = round(extracted / max(seconds, 1e-9), 1)
        if peak is not None:
            record["peak_mem_gib"] = round(peak, 3)
        emit(record)
    extraction_rate = extracted / max(phases["feature_extraction"], 1e-9)
    emit({"phase": "extraction_efficiency", "ratio_to_bare": round(extraction_rate / bare, 3)})
    emit({"phase": "final_accuracy", "stream_top1": matrix[-1]})
    if args.compare_uncached:
        uncached, _, matrix_u, peak_u = run_once(config.replace(cache_features=False), bundle,
                                                 backbone, device)
        diff = max(abs(a - b) for ra, rb in zip(matrix, matrix_u) for a, b in zip(ra, rb))
        emit({"phase": "compare_uncached", "cached_s": round(phases["total"], 3),
              "uncached_s": round(uncached["total"], 3),
              "speedup": round(uncached["total"] / phases["total"], 2),
              "max_abs_accuracy_diff": diff, "same_metrics": diff <= 1e-6})
    return 0


if __name__ == "__main__":
    sys.exit(main())
