"""Running a comparison: one entry on one seed, every entry on every seed, the protocol.

Every entry of a comparison sees the same stream, the same frozen CLIP backbone (loaded once)
and the same evaluation setup: Avalanche's accuracy and forgetting metrics (experience and
stream), a ``TensorboardLogger`` under ``tb/<entry>`` and a ``TextLogger`` per entry, and an
evaluation of the whole, index-aligned test stream after every experience. From the accuracy
matrix each run gets AIA, Last, AA and Forgetting (``results.cil_metrics``) next to Avalanche's
``StreamForgetting``, and the number of parameters it learned. Zero-shot CLIP and the Avalanche
baselines run on features extracted once per seed (``compare_features``); the CLIP baselines
(``compare_clip``) and the CLIPHinge entries run on the image stream with the shared
backbone and one ``FeatureCache`` per seed. An upper bound (``loop.is_upper_bound``) trains once
on the whole stream: one row, ``results.upper_bound_metrics``, no forgetting.
"""

from __future__ import annotations

import copy
import dataclasses
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import CLIPHingeConfig
from ..feature_cache import FeatureCache
from ..model.backbone import CLIPBackbone, load_clip
from ..model.prompts import raw_text_features
from ..seeding import seed_everything
from ..strategy import CLIPHingeStrategy, build_model
from .compare_features import (
    FeatureStream,
    FrozenCLIPClassifier,
    ZeroShotCLIP,
    ZeroShotCLIPStrategy,
    extract_feature_stream,
)
from .compare_clip import build_clip_baseline, clip_baselines_protocol, count_trainable
from .comparison import BASELINES, BaselineContext, BaselineSettings, CompareError, Entry
from .evaluation import make_evaluator
from .loop import is_upper_bound, train_and_evaluate
from .results import cil_metrics, grouped_accuracy, upper_bound_metrics
from .run_record import package_versions


# ---- running --------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One entry on one seed.

    Attributes:
        entry, seed: what ran.
        matrix: ``[task trained][test experience]`` accuracy (percent); one row (every
            experience) for an upper bound.
        test_sizes: test samples per experience.
        curve: accuracy over all seen classes after each task (percent); one value for an
            upper bound.
        metrics: ``cil_metrics`` (AIA, AA, Last, Forgetting), or ``upper_bound_metrics``
            (AIA and Forgetting ``None``).
        stream_forgetting: Avalanche ``StreamForgetting`` after the last task (percent;
            ``None`` for an upper bound).
        train_seconds: wall time inside ``strategy.train`` (``None``: no training).
        peak_memory_mib: CUDA ``max_memory_allocated`` during the run, else the process's
            peak resident set size so far (MiB).
        trainable_parameters: scalars the entry learned (``count_trainable``), after training.
        upper_bound: trained once on every class (its own row, left out of forgetting).
    """

    entry: str
    seed: int
    matrix: List[List[float]]
    test_sizes: List[int]
    curve: List[float]
    metrics: Dict[str, float]
    stream_forgetting: Optional[float]
    train_seconds: Optional[float]
    peak_memory_mib: float
    trainable_parameters: Optional[int] = None
    upper_bound: bool = False


def build_strategy(
    entry: Entry,
    *,
    config: CLIPHingeConfig,
    named_benchmark,
    backbone: CLIPBackbone,
    features: Optional[FeatureStream],
    settings: BaselineSettings,
    evaluator,
    device: str | torch.device,
    feature_cache: Optional[FeatureCache] = None,
):
    """The Avalanche strategy of ``entry``; the caller seeds the RNGs first.

    ``feature_cache`` is shared by the CLIPHinge entries and the CLIP baselines of one stream
    (a new one when None).
    """
    if entry.kind == "clip":
        return build_clip_baseline(
            entry.name,
            config=config,
            class_names=named_benchmark.class_names,
            backbone=backbone,
            evaluator=evaluator,
            device=device,
            feature_cache=feature_cache,
        )
    if entry.kind == "cliphinge":
        cfg = config.replace(**dict(entry.overrides))
        if cfg.use_lora_in_second_stage and cfg.second_stage_epochs > 0:
            backbone = copy.deepcopy(backbone)  # LoRA is injected into the encoder in place
        model = build_model(cfg, named_benchmark.class_names, device, backbone=backbone)
        return CLIPHingeStrategy(
            config=cfg,
            class_names=named_benchmark.class_names,
            model=model,
            evaluator=evaluator,
            device=device,
            feature_cache=feature_cache,
        )
    if features is None:
        raise ValueError(f"{entry.name} runs on pre-extracted features: pass features")
    if entry.kind == "zeroshot":
        text = raw_text_features(
            backbone.model, backbone.tokenizer, named_benchmark.class_names, config.prompt_template
        )
        model = ZeroShotCLIP(text.cpu(), float(backbone.model.logit_scale.exp()))
        return ZeroShotCLIPStrategy(
            model=model, eval_mb_size=config.eval_batch_size, device=device, evaluator=evaluator
        )
    model = FrozenCLIPClassifier(features.dim)
    context = BaselineContext({}, settings, len(named_benchmark.class_names))
    context.common = dict(
        model=model,
        optimizer=context.optimizer(model.parameters()),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=settings.batch_size or config.batch_size,
        train_epochs=settings.epochs or config.epochs,
        eval_mb_size=config.eval_batch_size,
        device=device,
        evaluator=evaluator,
    )
    return BASELINES[entry.name](context)


def run_entry(
    entry: Entry,
    *,
    config: CLIPHingeConfig,
    named_benchmark,
    backbone: CLIPBackbone,
    features: Optional[FeatureStream],
    output_dir: str | Path,
    settings: Optional[BaselineSettings] = None,
    device: str | torch.device = "cpu",
    run_name: Optional[str] = None,
    feature_cache: Optional[FeatureCache] = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train ``entry`` on every experience, evaluating the whole test stream after each (an
    upper bound: once on the whole stream, then one evaluation).

    Args:
        entry: what to run (see ``resolve_entries``).
        config: the CLIPHinge config of the comparison (its seed seeds every entry; its
            ``prompt_template``, batch sizes and epochs serve the other entries too).
        named_benchmark: the image ``NamedBenchmark``.
        backbone: the frozen CLIP shared by every entry.
        features: ``extract_feature_stream(named_benchmark, backbone)`` (needed by zero-shot and the
            Avalanche baselines).
        output_dir: where ``tb/<run_name>`` and ``logs/<run_name>.txt`` go.
        settings: baseline settings (default ``BaselineSettings()``).
        device: torch device.
        run_name: folder name of the loggers (default: the entry name).
        feature_cache: the frozen-feature cache shared by the CLIPHinge entries and the CLIP
            baselines of one stream.
        log: one line per task.
    """
    settings = settings or BaselineSettings()
    run_name = run_name or entry.name
    device = torch.device(device)
    log_name = run_name.replace("/", "_")
    evaluation = make_evaluator(
        tensorboard_dir=Path(output_dir) / "tb" / run_name,
        text_log=Path(output_dir) / "logs" / f"{log_name}.txt",
    )
    writer = evaluation.tensorboard.writer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(config.seed)
    try:
        strategy = build_strategy(
            entry,
            config=config,
            named_benchmark=named_benchmark,
            backbone=backbone,
            features=features,
            settings=settings,
            evaluator=evaluation.plugin,
            device=device,
            feature_cache=feature_cache,
        )
        on_features = entry.kind in ("zeroshot", "baseline")
        benchmark = features.benchmark if on_features else named_benchmark.benchmark
        test_sizes = [len(exp.dataset) for exp in benchmark.test_stream]
        upper_bound = is_upper_bound(strategy)
        matrix, curve, train_seconds, forgetting = [], [], 0.0, None
        for task in train_and_evaluate(strategy, benchmark.train_stream, benchmark.test_stream):
            matrix.append(task.trained_row)
            curve.append(grouped_accuracy(task.row, test_sizes, task.index)["all"])
            train_seconds += task.train_seconds
            forgetting = task.stream_forgetting
            step = strategy.clock.train_iterations
            writer.add_scalar("results/accuracy_seen_classes", curve[-1], step)
            if task.upper_bound:
                log(
                    f"[{run_name}] trained once on all {len(test_sizes)} experiences: "
                    f"accuracy on every class {curve[-1]:.2f}%"
                )
            else:
                log(f"[{run_name}] task {task.index}: accuracy on seen classes {curve[-1]:.2f}%")
        if upper_bound:
            metrics = upper_bound_metrics(matrix[0], test_sizes)
        else:
            metrics = cil_metrics(matrix, test_sizes)
        for name, value in metrics.items():
            if value is not None:
                writer.add_scalar(f"results/{name}", value, strategy.clock.train_iterations)
        parameters = count_trainable(strategy)
    finally:
        evaluation.close()
        writer.close()
    return RunResult(
        entry=entry.name,
        seed=config.seed,
        matrix=matrix,
        test_sizes=test_sizes,
        curve=curve,
        metrics=metrics,
        stream_forgetting=forgetting,
        train_seconds=None if entry.kind == "zeroshot" else train_seconds,
        peak_memory_mib=peak_memory_mib(device),
        trainable_parameters=parameters,
        upper_bound=upper_bound,
    )


def peak_memory_mib(device: torch.device) -> float:
    """CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


@dataclass
class Comparison:
    """Every run of a comparison plus what describes it."""

    entries: List[Entry]
    runs: List[RunResult]
    seeds: List[int]
    protocol: Dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0


def run_comparison(
    entries: Sequence[Entry],
    *,
    config: CLIPHingeConfig,
    stream_factory: Callable[[CLIPHingeConfig], Any],
    backbone: CLIPBackbone,
    seeds: Sequence[int],
    output_dir: str | Path,
    settings: Optional[BaselineSettings] = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> Comparison:
    """Run every entry on every seed; the stream is built once per seed (``stream_factory``
    gets the config with that seed) and its features are extracted once, when needed.

    TensorBoard runs go to ``tb/<entry>`` (one seed) or ``tb/<entry>/seed<s>`` (several).
    """
    began = time.perf_counter()
    settings = settings or BaselineSettings()
    output_dir = Path(output_dir)
    runs: List[RunResult] = []
    streams, extraction = [], []
    for seed in seeds:
        cfg = config.replace(seed=int(seed))
        cfg.require_layout("a comparison's stream")
        named_benchmark = stream_factory(cfg)
        cfg.check_class_count(len(named_benchmark.class_names), "the stream")
        if named_benchmark.n_experiences != cfg.total_tasks:
            raise CompareError(
                f"the stream has {named_benchmark.n_experiences} experiences but "
                f"total_tasks={cfg.total_tasks}; make them agree"
            )
        features = None
        if any(e.kind in ("zeroshot", "baseline") for e in entries):
            features = extract_feature_stream(
                named_benchmark,
                backbone,
                device,
                cfg.eval_batch_size,
                bf16=cfg.precision == "bf16",
                num_workers=cfg.num_workers,
            )
            extraction.append(features.seconds)
            log(
                f"seed {seed}: frozen image features extracted once for zero-shot and the "
                f"baselines in {features.seconds:.1f} s"
            )
        cache = FeatureCache(
            max_bytes=int(cfg.feature_cache_max_gb * 2**30), directory=cfg.feature_cache_dir
        )
        for entry in entries:
            run_name = entry.name if len(seeds) == 1 else f"{entry.name}/seed{seed}"
            runs.append(
                run_entry(
                    entry,
                    config=cfg,
                    named_benchmark=named_benchmark,
                    backbone=backbone,
                    features=features,
                    output_dir=output_dir,
                    settings=settings,
                    device=device,
                    run_name=run_name,
                    feature_cache=cache,
                    log=log,
                )
            )
        streams.append(named_benchmark)
    protocol = describe_protocol(
        config, streams[0], backbone, list(seeds), entries, settings, device, extraction
    )
    if len(streams) > 1 and any(s.class_order != streams[0].class_order for s in streams):
        protocol["class_order"] = {int(s): b.class_order for s, b in zip(seeds, streams)}
    return Comparison(
        list(entries), runs, [int(s) for s in seeds], protocol, time.perf_counter() - began
    )


def describe_protocol(
    config: CLIPHingeConfig,
    named_benchmark,
    backbone: CLIPBackbone,
    seeds: List[int],
    entries: Sequence[Entry],
    settings: BaselineSettings,
    device,
    extraction_seconds: Sequence[float],
) -> Dict[str, Any]:
    """The protocol block: model, weights, stream, class order, seeds, settings, versions."""
    defaults = CLIPHingeConfig().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if defaults[k] != v and k != "seed"}
    stream = {k: v for k, v in named_benchmark.protocol.items() if k not in ("class_order",)}
    dev = torch.device(device)
    device_name = (
        f"cuda ({torch.cuda.get_device_name(dev)})"
        if dev.type == "cuda" and torch.cuda.is_available()
        else "cpu"
    )
    protocol: Dict[str, Any] = {
        "model": backbone.model_name,
        "pretrained": backbone.pretrained or f"none (random weights, torch seed {seeds[0]})",
        "weights_sha256": backbone.weights_sha256,
        "stream": stream,
        "class_order": named_benchmark.class_order,
        "seeds": seeds,
        "device": device_name,
        "cliphinge_config (keys that differ from the defaults)": changed,
        "ablations": {e.name: dict(e.overrides) for e in entries if e.overrides},
    }
    if any(e.kind == "baseline" for e in entries):
        protocol["baselines"] = {
            "model": "frozen CLIP image encoder + avalanche.models.IncrementalClassifier on "
            "L2-normalised image features; optimizer over the head only (iCaRL: a "
            "fixed nn.Linear over all classes and nearest-mean at test time, as "
            "Avalanche's ICaRL needs)",
            "features": "extracted once per seed (eval transform) into an Avalanche benchmark "
            "of feature tensors shared by zero-shot and the baselines; not counted "
            "in their train time",
            "feature_extraction_seconds": [round(s, 2) for s in extraction_seconds],
            "settings": {
                **dataclasses.asdict(settings),
                "epochs": settings.epochs or config.epochs,
                "batch_size": settings.batch_size or config.batch_size,
                "memory (Replay, GDumb, iCaRL)": settings.memory_per_class
                * len(named_benchmark.class_names),
            },
        }
    clip = [e.name for e in entries if e.kind == "clip"]
    if clip:
        protocol["clip_baselines"] = clip_baselines_protocol(clip, config)
    if any(e.kind == "zeroshot" for e in entries):
        protocol["zeroshot"] = (
            f"template {config.prompt_template!r}, scores over the classes seen so far, no training"
        )
    protocol["versions"] = package_versions()
    return protocol


def load_backbone(
    config: CLIPHingeConfig, seed: int, device: str | torch.device = "cpu"
) -> CLIPBackbone:
    """``load_clip`` after seeding torch with ``seed``: random weights (``pretrained=None``)
    are then the same in every process, so smoke comparisons reproduce."""
    seed_everything(seed)
    return load_clip(
        config.model_name,
        config.pretrained,
        device=device,
        allow_activation_mismatch=config.allow_activation_mismatch,
    )
