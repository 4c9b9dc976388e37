"""CLIPHingeStrategy beside Avalanche's own strategies and zero-shot CLIP, on one stream.

Every entry of a comparison sees the same stream, the same frozen CLIP backbone (loaded once)
and the same evaluation setup: Avalanche's accuracy and forgetting metrics (experience and
stream), a ``TensorboardLogger`` under ``tb/<entry>`` and a ``TextLogger`` per entry, and an
evaluation of the whole, index-aligned test stream after every experience. From the accuracy
matrix each run gets AIA, Last, AA and Forgetting (``results.cil_metrics``) next to Avalanche's
``StreamForgetting``.

Entries:

- ``zeroshot``: CLIP with the fixed template (``prompt_template``) over the classes seen so far;
  no training (an Avalanche strategy with zero epochs, ``ZeroShotCLIPStrategy``).
- Avalanche baselines (``BASELINES``: ``naive``, ``lwf``, ``ewc``, ``replay``, ``gdumb``,
  ``icarl``), imported from ``avalanche.training`` and built with their keyword-only
  constructors, on ``FrozenCLIPClassifier`` = frozen image encoder + Avalanche's
  ``IncrementalClassifier`` on the L2-normalised image features; the optimizer sees the head only.
- ``cliphinge`` and its ablations (``ABLATIONS``): ``CLIPHingeStrategy`` with config overrides.

Feature reuse: the baselines and zero-shot CLIP only ever see the frozen encoder's output, so the
encoder runs once per seed over every experience (``extract_feature_stream``) and they train on an
Avalanche benchmark of feature tensors with the image stream's class order, experience split and
test order (checked); their model's encoder is then the identity. The numbers are those of a
frozen encoder + head on images (no augmentation, as in RAPF), without one encoder pass per epoch
per strategy. ``CLIPHingeStrategy`` runs on the image stream exactly as ``run_experiment`` does,
so its numbers match ``experiments/run_split_cifar.py``; its entries share one ``FeatureCache``
per stream, so the encoder runs once for all of them as well.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import difflib
import json
import resource
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.models import DynamicModule, IncrementalClassifier
from avalanche.training import EWC, GDumb, ICaRL, LwF, Naive, Replay
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .. import distributed
from ..config import CLIPHingeConfig, ConfigError
from .experiment import package_versions
from ..feature_cache import FeatureCache
from ..loaders import encode_dataset
from ..model.backbone import BackboneError, CLIPBackbone, check_device, load_clip
from ..model.cliphinge_model import UNSEEN_SCORE
from ..model.prompts import raw_text_features
from ..seeding import seed_everything
from .datasets import DATASETS, fit_image_folder, given_keys
from .evaluation import make_evaluator
from .loop import train_and_evaluate
from .figures import comparison_figure, figure_files, save_figure, stream_title
from .results import cil_metrics, grouped_accuracy
from ..strategy import CLIPHingeStrategy, build_model

ZEROSHOT = "zeroshot"
CLIPHINGE = "cliphinge"
BENCHMARKS = ("split_cifar100", "imagenet_r", "image_folder", "smoke")
DEFAULT_CONFIGS = {
    "split_cifar100": "cifar100_b0_inc10",
    "imagenet_r": "imagenet_r_b0_inc20",
    "image_folder": "cifar100_b0_inc10",
    "smoke": "cifar100_b0_inc10",
}
#: ``--benchmark`` -> the ``dataset`` of its stream builder (``app.datasets``).
BENCHMARK_DATASETS = {
    "split_cifar100": "cifar100",
    "imagenet_r": "imagenet_r",
    "image_folder": "image_folder",
}

#: CLIPHinge ablations: config overrides on top of the run's config.
ABLATIONS: Dict[str, Dict[str, Any]] = {
    "no_replay": {"samples_per_old_class": 0},
    "no_hinge": {"text_use_hinge_loss": False, "use_image_hinge_loss": False},
    "no_stage2": {"second_stage_epochs": 0},
    # alpha = 0 scores exactly the stage-1 CLIP logits (clip + 0 * head); stage 2 still trains.
    "no_fusion": {"second_stage_fusion_weight": 0.0},
    "no_replay_no_hinge": {
        "samples_per_old_class": 0,
        "text_use_hinge_loss": False,
        "use_image_hinge_loss": False,
    },
}


class CompareError(ValueError):
    """A comparison request that cannot run (unknown names, bad settings, busy folder)."""


# ---- baselines ------------------------------------------------------------------------------
@dataclass
class BaselineSettings:
    """Settings of the Avalanche baselines; untuned common defaults.

    Change them with ``--set baseline.<key>=<value>`` (``baseline.lr=0.05``).

    Attributes:
        epochs: training epochs per experience (``None``: the config's ``epochs``).
        batch_size: training minibatch size (``None``: the config's ``batch_size``).
        optimizer: ``"adam"`` or ``"sgd"``, over the head's parameters only.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty of the optimizer.
        lwf_alpha: LwF's distillation weight.
        lwf_temperature: LwF's softmax temperature.
        ewc_lambda: EWC's penalty weight.
        memory_per_class: Replay, GDumb and iCaRL keep ``memory_per_class * n_classes``
            samples (20 per class: the 2,000 exemplars usual on CIFAR-100).
    """

    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 100.0
    memory_per_class: int = 20

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise CompareError(
                f"baseline.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"
            )
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CompareError(f"baseline.{key} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise CompareError(f"baseline.lr must be > 0, got {self.lr!r}")
        if not isinstance(self.memory_per_class, int) or self.memory_per_class < 1:
            raise CompareError(
                f"baseline.memory_per_class must be an integer >= 1, got {self.memory_per_class!r}"
            )

    def with_overrides(self, assignments: Dict[str, Any]) -> "BaselineSettings":
        """A copy with ``{key: value}`` applied; unknown keys name the closest one."""
        known = [f.name for f in dataclasses.fields(self)]
        for key in assignments:
            if key not in known:
                raise CompareError(
                    f"--set: unknown baseline setting 'baseline.{key}'"
                    + _suggest(key, known, prefix="baseline.")
                )
        return BaselineSettings(**{**dataclasses.asdict(self), **assignments})


class FrozenFeatures(nn.Module):
    """``encoder(x)`` without gradients, L2-normalised: ``[batch, ...] -> [batch, dim]``.

    ``encoder`` is the identity on pre-extracted features (what the comparison uses) or
    ``FrozenImageEncoder`` on images; it stays in eval mode whatever the parent's mode.
    """

    def __init__(self, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()

    def train(self, mode: bool = True) -> "FrozenFeatures":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.encoder(x)
        return F.normalize(features.float(), dim=-1)


class FrozenImageEncoder(nn.Module):
    """The frozen CLIP image encoder as a module: images ``[b, 3, H, W]`` -> ``[b, dim]``."""

    def __init__(self, backbone: CLIPBackbone):
        super().__init__()
        self.clip = backbone.model

    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images).float()


class FrozenCLIPClassifier(nn.Module):
    """Frozen CLIP image encoder + Avalanche's ``IncrementalClassifier`` on normalised features.

    ``forward(x) = classifier(normalize(encoder(x)))`` with scores ``[batch, max class id + 1]``
    (classes not trained yet are masked by the classifier). Only the classifier trains: the
    identity encoder has no parameters and ``FrozenImageEncoder``'s have ``requires_grad=False``.

    Args:
        dim: feature dimension (CLIP's ``embed_dim``).
        encoder: ``None`` (identity: inputs are pre-extracted features) or a frozen image
            encoder such as ``FrozenImageEncoder(backbone)``.
    """

    def __init__(self, dim: int, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.feature_extractor = FrozenFeatures(encoder)
        self.classifier = IncrementalClassifier(in_features=dim, initial_out_features=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feature_extractor(x))


@dataclass
class BaselineContext:
    """What a baseline factory gets: Avalanche's common keyword arguments and the stream size.

    ``common`` holds ``model``, ``optimizer``, ``criterion``, ``train_mb_size``,
    ``train_epochs``, ``eval_mb_size``, ``device`` and ``evaluator``.
    """

    common: Dict[str, Any]
    settings: BaselineSettings
    n_classes: int

    @property
    def memory(self) -> int:
        """Buffer size of the rehearsal strategies."""
        return self.settings.memory_per_class * self.n_classes

    def optimizer(self, params) -> torch.optim.Optimizer:
        """The baselines' optimizer over ``params``."""
        s = self.settings
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _icarl(ctx: BaselineContext) -> SupervisedTemplate:
    # Avalanche's iCaRL keeps a copy of the model with fixed shapes (its distillation loss), so
    # it gets a fixed linear head over every class; it classifies by nearest class mean.
    kwargs = dict(ctx.common)
    model = kwargs.pop("model")
    del kwargs["criterion"]  # iCaRL brings its own loss
    classifier = nn.Linear(model.classifier.classifier.in_features, ctx.n_classes)
    kwargs["optimizer"] = ctx.optimizer(classifier.parameters())
    return ICaRL(
        feature_extractor=model.feature_extractor,
        classifier=classifier,
        memory_size=ctx.memory,
        buffer_transform=None,
        fixed_memory=True,
        **kwargs,
    )


#: Avalanche strategies by entry name: ``factory(BaselineContext) -> strategy``. Add one here
#: (or at run time, before ``main``) to make it a ``--strategies`` name.
BASELINES: Dict[str, Callable[[BaselineContext], SupervisedTemplate]] = {
    "naive": lambda ctx: Naive(**ctx.common),
    "lwf": lambda ctx: LwF(
        **ctx.common, alpha=ctx.settings.lwf_alpha, temperature=ctx.settings.lwf_temperature
    ),
    "ewc": lambda ctx: EWC(**ctx.common, ewc_lambda=ctx.settings.ewc_lambda),
    "replay": lambda ctx: Replay(**ctx.common, mem_size=ctx.memory),
    "gdumb": lambda ctx: GDumb(**ctx.common, mem_size=ctx.memory),
    "icarl": _icarl,
}

DEFAULT_STRATEGIES = (ZEROSHOT, "naive", "lwf", "ewc", "replay", "gdumb", "icarl", CLIPHINGE)


# ---- zero-shot CLIP -------------------------------------------------------------------------
class ZeroShotCLIP(DynamicModule):
    """Zero-shot CLIP over the classes seen so far, on frozen image features.

    ``scores = logit_scale * cos(feature, text_c)`` for seen classes and ``UNSEEN_SCORE`` for
    the others, ``[batch, n_classes]``. A class becomes seen when the model adapts to a
    training experience (Avalanche's model adaptation, like ``IncrementalClassifier``).

    Args:
        text_features: ``[n_classes, dim]`` normalised features of the template per class.
        logit_scale: CLIP's temperature (``exp(logit_scale)``).
    """

    def __init__(self, text_features: Tensor, logit_scale: float):
        super().__init__()
        self.register_buffer("text", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("seen", torch.zeros(text_features.shape[0], dtype=torch.bool))
        self.logit_scale = float(logit_scale)

    @property
    def _adaptation_device(self):
        return self.text.device

    @torch.no_grad()
    def adaptation(self, experience):
        if self.training:
            self.seen[list(experience.classes_in_this_experience)] = True

    def forward(self, x: Tensor) -> Tensor:
        scores = self.logit_scale * F.normalize(x.float(), dim=-1) @ self.text.T
        return scores.masked_fill(~self.seen, UNSEEN_SCORE)


class ZeroShotCLIPStrategy(SupervisedTemplate):
    """Evaluates ``ZeroShotCLIP`` through Avalanche with zero training epochs.

    ``train(experience)`` only registers the experience's classes as seen; evaluation and
    metrics are Avalanche's.
    """

    def __init__(
        self,
        *,
        model: ZeroShotCLIP,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        evaluator=default_evaluator,
    ):
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=eval_mb_size,
            train_epochs=0,
            eval_mb_size=eval_mb_size,
            device=device,
            evaluator=evaluator,
        )

    def make_optimizer(self, **kwargs):
        """Nothing to optimise."""


# ---- streams of features --------------------------------------------------------------------
@dataclass
class FeatureStream:
    """An Avalanche benchmark of frozen image features aligned with an image stream.

    Attributes:
        benchmark: ``nc_benchmark`` over ``TensorDataset(features [n, dim], targets)`` with the
            image stream's class order and experience sizes; experience k holds the same
            samples, in the same test order, as the image stream's experience k.
        dim: feature dimension.
        seconds: wall time of the extraction.
    """

    benchmark: Any
    dim: int
    seconds: float


@torch.no_grad()
def extract_feature_stream(
    named_benchmark,
    backbone: CLIPBackbone,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    bf16: bool = False,
    num_workers: int = 0,
) -> FeatureStream:
    """Run the frozen image encoder once over every experience of ``named_benchmark`` (eval transform).

    The items are brought to the encoder's input as the strategy brings them
    (``streams.ClipInput``: PIL images, uint8 or ``[0, 1]`` tensors are resized and normalised;
    CLIP's own input passes unchanged). Returns unnormalised ``float32`` features in a
    benchmark built the way the image stream was (``benchmarks.common.make_nc_benchmark``,
    original class ids as targets). ``bf16`` autocasts the encoder on CUDA; ``num_workers``
    feeds the DataLoader.
    """
    from ..benchmarks.common import make_nc_benchmark
    from ..streams import ClipInput, freeze_transforms

    clip_input = ClipInput.for_backbone(backbone)

    began = time.perf_counter()
    device = torch.device(device)
    encoder = backbone.model.eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if bf16 and device.type == "cuda"
        else nullcontext()
    )

    def encode(stream):
        feats, labels = [], []
        for experience in stream:
            f, y = encode_dataset(
                encoder.encode_image,
                freeze_transforms(experience.dataset.eval()).replace_current_transform_group(
                    clip_input
                ),
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
                autocast=lambda: autocast,
            )
            feats.append(f.cpu())
            labels.append(y.cpu())
        return TensorDataset(torch.cat(feats), torch.cat(labels))

    image_benchmark = named_benchmark.benchmark
    sizes = list(image_benchmark.n_classes_per_exp)
    train, test = encode(image_benchmark.train_stream), encode(image_benchmark.test_stream)
    benchmark = make_nc_benchmark(
        train,
        test,
        list(named_benchmark.class_order),
        sizes[0],
        sizes[1] if len(sizes) > 1 else sizes[0],
        None,
        None,
    )
    for side in ("train_stream", "test_stream"):
        ours, theirs = getattr(benchmark, side), getattr(image_benchmark, side)
        for k, (a, b) in enumerate(zip(ours, theirs)):
            same_classes = sorted(a.classes_in_this_experience) == sorted(
                b.classes_in_this_experience
            )
            if not same_classes or len(a.dataset) != len(b.dataset):
                raise RuntimeError(
                    f"feature stream differs from the image stream at {side} "
                    f"experience {k}; the stream must hold each class in one "
                    "experience"
                )
    for a, b in zip(benchmark.test_stream, image_benchmark.test_stream):
        if list(a.dataset.targets) != list(b.dataset.targets):
            raise RuntimeError("feature test stream is not index-aligned with the image one")
    return FeatureStream(benchmark, train.tensors[0].shape[1], time.perf_counter() - began)


# ---- entries --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One line of the comparison.

    Attributes:
        name: the row label and folder name (``naive``, ``cliphinge_no_replay``).
        kind: ``"zeroshot"``, ``"baseline"`` or ``"cliphinge"``.
        overrides: CLIPHinge config overrides (ablations).
    """

    name: str
    kind: str
    overrides: Tuple[Tuple[str, Any], ...] = ()


def strategy_names() -> Tuple[str, ...]:
    """Every ``--strategies`` name: zero-shot, the registered baselines, CLIPHinge."""
    return (ZEROSHOT, *BASELINES, CLIPHINGE)


def resolve_entries(
    strategies: Sequence[str] = DEFAULT_STRATEGIES, ablations: Sequence[str] = tuple(ABLATIONS)
) -> List[Entry]:
    """Entries for the named strategies and CLIPHinge ablations (order: as listed, ablations
    last). Names are case-insensitive; an unknown one raises ``CompareError`` naming the closest.
    """
    entries: List[Entry] = []
    for raw in strategies:
        name = raw.strip().lower()
        if name not in strategy_names():
            raise CompareError(
                f"unknown strategy '{raw}'"
                + _suggest(name, strategy_names())
                + f" (choose from {', '.join(strategy_names())})"
            )
        kind = "zeroshot" if name == ZEROSHOT else "cliphinge" if name == CLIPHINGE else "baseline"
        entries.append(Entry(name, kind))
    for raw in ablations:
        name = raw.strip().lower()
        if name not in ABLATIONS:
            raise CompareError(
                f"unknown ablation '{raw}'"
                + _suggest(name, ABLATIONS)
                + f" (choose from {', '.join(ABLATIONS)}, or none)"
            )
        entries.append(Entry(f"{CLIPHINGE}_{name}", "cliphinge", tuple(ABLATIONS[name].items())))
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CompareError(f"entries named twice: {', '.join(repeated)}; list each once")
    if not entries:
        raise CompareError(
            "nothing to compare: give at least one --strategies name or --ablations name"
        )
    return entries


def _suggest(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


# ---- running --------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One entry on one seed.

    Attributes:
        entry, seed: what ran.
        matrix: ``[task trained][test experience]`` accuracy (percent).
        test_sizes: test samples per experience.
        curve: accuracy over all seen classes after each task (percent).
        metrics: ``cil_metrics`` (AIA, AA, Last, Forgetting).
        stream_forgetting: Avalanche ``StreamForgetting`` after the last task (percent).
        train_seconds: wall time inside ``strategy.train`` (``None``: no training).
        peak_memory_mib: CUDA ``max_memory_allocated`` during the run, else the process's
            peak resident set size so far (MiB).
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

    ``feature_cache`` is shared by the CLIPHinge entries of one stream (a new one when None).
    """
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
    """Train ``entry`` on every experience, evaluating the whole test stream after each.

    Args:
        entry: what to run (see ``resolve_entries``).
        config: the CLIPHinge config of the comparison (its seed seeds every entry; its
            ``prompt_template``, batch sizes and epochs serve the other entries too).
        named_benchmark: the image ``NamedBenchmark``.
        backbone: the frozen CLIP shared by every entry.
        features: ``extract_feature_stream(named_benchmark, backbone)`` (needed by zero-shot and the
            baselines).
        output_dir: where ``tb/<run_name>`` and ``logs/<run_name>.txt`` go.
        settings: baseline settings (default ``BaselineSettings()``).
        device: torch device.
        run_name: folder name of the loggers (default: the entry name).
        feature_cache: CLIPHinge's frozen-feature cache, shared by the entries of one stream.
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
        benchmark = named_benchmark.benchmark if entry.kind == "cliphinge" else features.benchmark
        test_sizes = [len(exp.dataset) for exp in benchmark.test_stream]
        matrix, curve, train_seconds, forgetting = [], [], 0.0, None
        for task in train_and_evaluate(strategy, benchmark.train_stream, benchmark.test_stream):
            matrix.append(task.trained_row)
            curve.append(grouped_accuracy(task.row, test_sizes, task.index)["all"])
            train_seconds += task.train_seconds
            forgetting = task.stream_forgetting
            step = strategy.clock.train_iterations
            writer.add_scalar("results/accuracy_seen_classes", curve[-1], step)
            log(f"[{run_name}] task {task.index}: accuracy on seen classes {curve[-1]:.2f}%")
        metrics = cil_metrics(matrix, test_sizes)
        for name, value in metrics.items():
            writer.add_scalar(f"results/{name}", value, strategy.clock.train_iterations)
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
        if any(e.kind != "cliphinge" for e in entries):
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
    if any(e.kind == "zeroshot" for e in entries):
        protocol["zeroshot"] = (
            f"template {config.prompt_template!r}, scores over the classes seen so far, no training"
        )
    protocol["versions"] = package_versions()
    return protocol


# ---- table ----------------------------------------------------------------------------------
COLUMNS = (
    ("AIA", "AIA"),
    ("Last", "Last"),
    ("AA", "AA"),
    ("Forgetting", "Forgetting (max - last)"),
    ("stream_forgetting", "Avalanche StreamForgetting"),
    ("train_seconds", "train time (s)"),
    ("peak_memory_mib", "peak memory (MiB)"),
)


def summarize(comparison: Comparison) -> List[Dict[str, Any]]:
    """Per entry, in entry order: ``{column: [value per seed]}`` plus ``entry``."""
    rows = []
    for entry in comparison.entries:
        runs = [r for r in comparison.runs if r.entry == entry.name]
        row: Dict[str, Any] = {"entry": entry.name, "seeds": [r.seed for r in runs]}
        for key, _ in COLUMNS:
            row[key] = [r.metrics[key] if key in r.metrics else getattr(r, key) for r in runs]
        row["curve"] = np.mean([r.curve for r in runs], axis=0).tolist()
        rows.append(row)
    return rows


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (``None`` for one value or missing values)."""
    if not values or any(v is None for v in values):
        return None, None
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def format_cell(values: Sequence[Optional[float]], digits: int = 2) -> str:
    """``"84.43"``, ``"84.43 ± 1.20"`` over seeds, or ``"-"`` when there is no value."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The comparison as a markdown table (percent metrics, seconds, MiB)."""
    digits = {"train_seconds": 1, "peak_memory_mib": 0}
    header = "| entry | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [format_cell(row[key], digits.get(key, 2)) for key, _ in COLUMNS]
        lines.append(f"| {row['entry']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(comparison: Comparison, output_dir: str | Path) -> Dict[str, Path]:
    """``comparison.md``, ``comparison.csv``, ``comparison.json`` and
    ``accuracy_vs_task.{png,pdf}`` (``figures.comparison_figure``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(comparison)
    paths = {
        name: output_dir / name
        for name in (
            "comparison.md",
            "comparison.csv",
            "comparison.json",
            *figure_files("accuracy_vs_task"),
        )
    }
    kinds = {
        e.name: ("ablation" if e.overrides else "method" if e.kind == "cliphinge" else "baseline")
        for e in comparison.entries
    }
    stream = comparison.protocol.get("stream", {})
    title = stream_title(stream, "CLIPHinge vs baselines") + (
        f", mean over {len(comparison.seeds)} seeds" if len(comparison.seeds) > 1 else ""
    )
    save_figure(
        comparison_figure(
            {row["entry"]: row["curve"] for row in rows},
            kinds,
            stream.get("classes_per_experience"),
            title,
        ),
        output_dir / "accuracy_vs_task",
    )
    with open(paths["comparison.csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["entry", "n_seeds"]
        for key, _ in COLUMNS:
            header += [f"{key}_mean", f"{key}_std"]
        writer.writerow(header)
        for row in rows:
            line = [row["entry"], len(row["seeds"])]
            for key, _ in COLUMNS:
                mean, std = mean_std(row[key])
                line += [
                    "" if mean is None else round(mean, 4),
                    "" if std is None else round(std, 4),
                ]
            writer.writerow(line)
    paths["comparison.md"].write_text(format_report(comparison, rows))
    paths["comparison.json"].write_text(
        json.dumps(
            {
                "table": [{k: v for k, v in row.items()} for row in rows],
                "runs": [dataclasses.asdict(run) for run in comparison.runs],
                "protocol": comparison.protocol,
                "wall_seconds": comparison.wall_seconds,
            },
            indent=2,
        )
        + "\n"
    )
    return paths


def format_report(comparison: Comparison, rows: Sequence[Dict[str, Any]]) -> str:
    """The markdown report: table, plot, what the columns mean, protocol."""
    seeds = comparison.seeds
    spread = f"mean ± sample std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [
        "# Comparison",
        "",
        f"Class-incremental, evaluated on the whole test stream after every task; {spread}.",
        "",
        markdown_table(rows),
        "![accuracy on seen classes vs classes seen](accuracy_vs_task.png) "
        "([PDF](accuracy_vs_task.pdf))",
        "",
        "- AIA = mean over tasks of the accuracy on all classes seen so far; Last = that "
        "accuracy after the last task; AA = mean of the per-task accuracies after the last "
        "task; Forgetting = mean over old tasks of (best earlier accuracy - last accuracy) "
        "(as in docs/experiments.md). Avalanche StreamForgetting = accuracy right after learning "
        "minus the last accuracy, averaged over experiences: a different quantity.",
        "- train time: wall seconds inside `strategy.train`; `-` = no training (zero-shot). "
        "Zero-shot and the Avalanche baselines train on features extracted once and shared "
        "(extraction time in the protocol); CLIPHinge extracts its own.",
        "- peak memory: CUDA max_memory_allocated per run on a GPU; on a CPU the process's "
        "peak RSS so far (it can only grow from one row to the next).",
        "",
        "## Protocol",
        "",
        "```text",
    ]
    for key, value in comparison.protocol.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    lines += [f"wall time: {comparison.wall_seconds:.1f} s", "```", ""]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------
def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Options of ``cliphinge compare`` and ``experiments/compare.py`` (``prog``: the name in
    the usage line; default the script's)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="CLIPHingeStrategy, its ablations, Avalanche baselines and zero-shot CLIP "
        "on one stream with one frozen CLIP: one table, one plot, TensorBoard runs.",
    )
    parser.add_argument(
        "--benchmark",
        required=True,
        metavar="|".join(BENCHMARKS),
        help="smoke: tiny random CLIP on the synthetic stream, offline; image_folder: "
        "your own images, --data-root PATH holding PATH/<class>/*.jpg (or "
        "PATH/{train,test}/<class>/*.jpg), the task layout and class order read from "
        "the folder unless --set",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(DEFAULT_STRATEGIES),
        metavar="NAME",
        help=f"entries among {', '.join(strategy_names())} (default: %(default)s)",
    )
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=list(ABLATIONS),
        metavar="NAME",
        help=f"CLIPHinge ablations among {', '.join(ABLATIONS)}; 'none' or no "
        "name for none (default: all)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds (default: the config's seed); mean ± std over several",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where the table, plot and TensorBoard runs go (default: runs/compare_<benchmark>)",
    )
    parser.add_argument("--data-root", default="data", help="dataset folder (default: data)")
    parser.add_argument(
        "--split-list",
        default=None,
        help="imagenet_r: folder with train.txt / test.txt (default: seeded 80/20 split)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="split_cifar100: download CIFAR-100 when missing (needs internet)",
    )
    parser.add_argument(
        "--pretrained", default=None, help="open_clip tag or local checkpoint; overrides the config"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a shipped preset name or a JSON config file (default: "
        "cifar100_b0_inc10, or imagenet_r_b0_inc20 for ImageNet-R)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (JSON value), repeatable; "
        "baseline.<key>=... sets a baseline setting (baseline.lr=0.05)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for smoke, where the tiny model runs "
        "about 10x faster single-threaded, else torch's default)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier comparison in --output-dir"
    )
    parser.add_argument("--quiet", action="store_true", help="only the final table")
    return parser


def resolve_settings(args: argparse.Namespace) -> Tuple[CLIPHingeConfig, BaselineSettings]:
    """Config file, the smoke preset, ``--set`` (config and ``baseline.`` keys), --pretrained."""
    from .cli import SMOKE

    benchmark = args.benchmark
    config = CLIPHingeConfig.from_json(args.config or DEFAULT_CONFIGS[benchmark])
    if benchmark == "smoke":
        config = config.replace(**SMOKE)
    config_sets, baseline_sets = [], {}
    for item in args.set:
        key = item.split("=", 1)[0].strip()
        if key.startswith("baseline."):
            if "=" not in item:
                raise CompareError(f"--set expects key=value, got '{item}'")
            raw = item.split("=", 1)[1]
            try:
                baseline_sets[key[len("baseline.") :]] = json.loads(raw)
            except json.JSONDecodeError:
                baseline_sets[key[len("baseline.") :]] = raw
        else:
            config_sets.append(item)
    if benchmark == "image_folder":
        config = config.replace(dataset="image_folder")
    config = config.with_overrides(config_sets)
    if benchmark == "image_folder":
        given = given_keys(args.config or DEFAULT_CONFIGS[benchmark], config_sets)
        config = fit_image_folder(
            config, args.data_root, given, where="pass your folder with --data-root PATH"
        )
    if args.pretrained is not None:
        config = config.replace(pretrained=args.pretrained)
    # every entry shares streams built with CLIP's full CPU-side eval transform, so the
    # CLIPHinge entries must not resize and normalise a second time on the device
    config = config.replace(resize_on_device=False)
    return config, BaselineSettings().with_overrides(baseline_sets)


def stream_factory_for(
    args: argparse.Namespace, backbone: CLIPBackbone
) -> Callable[[CLIPHingeConfig], Any]:
    """``config -> NamedBenchmark`` for ``--benchmark``: the run command's stream builder of the
    dataset (``app.datasets``) with CLIP's eval transform for training too (no augmentation, as
    in RAPF)."""
    if args.benchmark == "smoke":
        from .cli import smoke_stream

        return smoke_stream
    _, build = DATASETS[BENCHMARK_DATASETS[args.benchmark]]
    plain = argparse.Namespace(**{**vars(args), "augment": False})
    return lambda config: build(plain, config, backbone)


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


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse to mix two comparisons in one folder unless ``overwrite``."""
    names = (
        "comparison.md",
        "comparison.csv",
        "comparison.json",
        *figure_files("accuracy_vs_task"),
        "tb",
        "logs",
    )
    present = [n for n in names if (output_dir / n).exists()]
    if present and not overwrite:
        raise CompareError(
            f"{output_dir} already holds a comparison ({', '.join(present)}); "
            "pass --overwrite or choose another --output-dir"
        )
    for name in present:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Parse, load CLIP once, run every entry on every seed, write and print the table.

    Returns the exit code: 0, or 2 with one ``error:`` line for an expected failure.
    """
    from .cli import process_seconds

    args = build_parser(prog).parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        if distributed.launched():
            # the baselines are Avalanche's own strategies: under torchrun they would split
            # their data without sharing gradients; every process would also write the folder
            raise CompareError(
                "cliphinge compare runs in one process: start it with python, "
                "not torchrun (cliphinge run uses several)"
            )
        if args.benchmark not in BENCHMARKS:
            raise CompareError(
                f"unknown benchmark '{args.benchmark}'"
                + _suggest(args.benchmark, BENCHMARKS)
                + f" (choose from {', '.join(BENCHMARKS)})"
            )
        ablations = [a for a in args.ablations if a.lower() != "none"]
        entries = resolve_entries(args.strategies, ablations)
        config, settings = resolve_settings(args)
        seeds = args.seeds if args.seeds else [config.seed]
        if len(set(seeds)) != len(seeds):
            raise CompareError(f"--seeds lists a seed twice: {seeds}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)  # before CLIP loads
        threads = args.threads or (1 if args.benchmark == "smoke" else None)
        if threads is not None:
            if threads < 1:
                raise CompareError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        output_dir = Path(args.output_dir or Path("runs") / f"compare_{args.benchmark}")
        prepare_output(output_dir, args.overwrite)
        output_dir.mkdir(parents=True, exist_ok=True)
        backbone = load_backbone(config, seeds[0], device)
        comparison = run_comparison(
            entries,
            config=config,
            stream_factory=stream_factory_for(args, backbone),
            backbone=backbone,
            seeds=seeds,
            output_dir=output_dir,
            settings=settings,
            device=device,
            log=log,
        )
        # as typed: `cliphinge compare ...` passes argv, the script reads its own
        comparison.protocol["command"] = shlex.join(
            ["cliphinge", "compare", *argv]
            if argv is not None
            else ["python", sys.argv[0] or "experiments/compare.py", *sys.argv[1:]]
        )
        write_outputs(comparison, output_dir)
    except (
        CompareError,
        ConfigError,
        BackboneError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        FloatingPointError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(summarize(comparison)), end="")
    print(
        f"report: {output_dir / 'comparison.md'} | TensorBoard: tensorboard --logdir "
        f"{output_dir / 'tb'} | this process: {process_seconds():.1f} s"
    )
    return 0
