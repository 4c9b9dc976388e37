"""What a ``CLIPHingeStrategy`` trains and evaluates on: CLIP's input, cached features,
minibatches.

``StrategyInputs`` is a mixin of the strategy (as Avalanche composes its templates from
mixins): it brings every experience's dataset to CLIP's input (``streams.ClipInput``),
checks it, serves frozen-encoder features through the feature cache where the phase allows,
makes the seeded minibatch loaders, and splits an image minibatch's encoding across
torchrun ranks; one frozen-encoder pass over an experience's training data fits (or merges)
its classes' Gaussians (``current_features`` keeps the features). It reads the strategy's
``config``, ``model``, ``device``, ``experience``, ``feature_cache``, ``clip_input`` and
``progress``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import torch
from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import LRSchedulerPlugin
from torch import Tensor
from torch.utils.data import DataLoader

from . import distributed
from .avalanche_plugins import FeatureRows
from .feature_cache import dataset_fingerprint
from .loaders import EpochBatchSampler, TensorBatchLoader, encode_dataset
from .seeding import Draw, generator as seeded
from .dataset_transforms import find_random_transform, foreign_normalize, freeze_transforms
from .streams import STREAM_FIX, StreamInputError, check_item_labels


class StrategyInputs:
    """The data side of ``CLIPHingeStrategy`` and of the frozen-feature baselines (a mixin
    before ``SupervisedTemplate``), and the model and optimizer set-up of every experience
    they share."""

    #: the experience's training data as CLIP's input (what plugins read as its dataset)
    _experience_input = None
    #: ``{(id of an experience dataset, training?): (dataset, cache key)}``
    _dataset_keys: Dict[Tuple[int, bool], Tuple[object, str]]
    #: name of the random training transform that turns the cache off, or ``None``
    _random_train_transform: Optional[str] = None

    def generator(self, *parts: int) -> torch.Generator:
        """``seeding.generator(config.seed, *parts)``: a CPU generator for one purpose
        (``parts[0]``, a ``seeding.Draw``) and its task, epoch, ...

        Every random draw of the method comes from such a generator, so an experience replays
        identically whether the run is fresh or resumed.
        """
        return seeded(self.config.seed, *parts)

    def autocast(self):
        """bf16 autocast on CUDA when ``precision == 'bf16'``; a no-op context otherwise."""
        if self.config.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def features_cacheable(self) -> bool:
        """Whether this phase may run on cached frozen-encoder features.

        Stage 1 may, LoRA or not: every LoRA adapter is off there (an adapter is switched on
        only in its task's stage 2 and for its head's features at inference), unless the
        training transform is random (each epoch must see new draws). Evaluation may until
        the first LoRA adapter exists: from then on the heads of adapted tasks need the
        images, to encode them through their adapters. Stage 2 chooses its own input
        (``SecondStagePlugin``: these features without LoRA, images with it).
        """
        if not self.config.cache_features:
            return False
        if self.is_training:
            return self._random_train_transform is None
        return self.model.lora is None or not self.model.lora.adapters

    def extract_features(self, dataset, desc: str = "features") -> Tuple[Tensor, Tensor]:
        """Frozen-encoder image features of a dataset of ``(image, label, ...)`` items.

        Every LoRA adapter is off during the pass (the one active before, if any, is back
        after it), so the features are the frozen encoder's whatever the caller's context:
        the only kind the feature cache holds.

        Returns ``(features [n, dim] float32, labels [n] long)``, both on the strategy's device.
        """
        lora = self.model.lora
        with nullcontext() if lora is None else lora.using(None):
            return encode_dataset(
                self.model.run_image_encoder,
                dataset,
                batch_size=self.config.eval_batch_size,
                device=self.device,
                num_workers=self.config.num_workers,
                autocast=self.autocast,
                desc=desc,
                progress=self.progress,
            )

    def features_of(self, dataset, desc: str) -> Tuple[Tensor, Tensor]:
        """``extract_features`` through the feature cache when this phase may use it."""
        if not self.features_cacheable:
            return self.extract_features(dataset, desc)
        key = self._cache_key(dataset)
        feats, labels = self.feature_cache.get_or_compute(
            key, lambda: self.extract_features(dataset, desc), device=self.device
        )
        return feats.to(self.device), labels.to(self.device)

    def _cache_key(self, dataset) -> str:
        """The feature-cache key of ``dataset`` (its fingerprint plus the backbone's identity).

        The key names no LoRA adapter because every entry is a frozen-encoder feature
        (``extract_features`` switches the adapters off); features through an adapter are
        never cached: they are computed from the images wherever they are needed (stage 2,
        the heads of adapted tasks at inference, which refuse features).

        For ``self.adapted_dataset`` it is computed once per experience dataset and phase
        (train or eval), then reused: Avalanche datasets are immutable, so the same
        experience adapted for the same phase holds the same items.
        """
        backbone = self.model.backbone

        def fingerprint() -> str:
            return dataset_fingerprint(
                dataset,
                backbone.model_name,
                backbone.pretrained,
                backbone.weights_sha256,
                self.config.resize_on_device,
            )

        if dataset is not self.adapted_dataset or self.experience is None:
            return fingerprint()
        source = self.experience.dataset
        memo = (id(source), self.is_training)
        known = self._dataset_keys.get(memo)
        if known is None or known[0] is not source:  # the id of a freed dataset
            known = self._dataset_keys[memo] = (source, fingerprint())
        return known[1]

    def _batch_sampler(self, n: int, batch_size: int, shuffle: bool) -> EpochBatchSampler:
        generator = self.generator(Draw.BATCHES, self.current_task) if shuffle else None
        return EpochBatchSampler(n, batch_size, shuffle, generator)

    def _loader(self, dataset, features, batch_size: int, shuffle: bool):
        sampler = self._batch_sampler(len(dataset), batch_size, shuffle)
        if features is not None:
            return TensorBatchLoader(
                features[0], features[1], sampler, task_labels=task_labels_of(dataset)
            )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _to_clip_input(self, dataset):
        """``dataset`` with ``ClipInput`` applied on top of its own transforms.

        The items keep the class ids of ``dataset.targets`` (a benchmark's id remapping
        survives ``dataset_transforms.freeze_transforms``). Raises ``StreamInputError`` (one
        line, naming the fix) for a stream normalised with statistics other than CLIP's, or
        whose items carry other ids than its targets.
        """
        foreign = foreign_normalize(
            dataset, self.clip_input.mean.flatten().tolist(), self.clip_input.std.flatten().tolist()
        )
        if foreign is not None:
            raise StreamInputError(
                f"the stream normalises its images with {foreign}, not "
                f"CLIP's statistics; {STREAM_FIX}"
            )
        adapted = freeze_transforms(dataset).replace_current_transform_group(self.clip_input)
        exp = self.experience
        where = (
            "the dataset"
            if exp is None
            else f"{exp.origin_stream.name} experience {exp.current_experience}"
        )
        # refuses a bad stream (ClipInput) or labels that disagree with targets before any work
        check_item_labels(adapted, where)
        return adapted

    def model_adaptation(self, model=None):
        """Avalanche's per-experience model hook, without moving the model again.

        Avalanche's version also calls ``model.to(device)`` at every experience, train and
        eval alike, a walk over every CLIP parameter. The model is moved once, in the
        constructor, and everything it grows later (prompts, heads, adapters, LoRA) is made
        on its device, so only the ``DynamicModule`` adaptation is kept.
        """
        model = self.model if model is None else model
        avalanche_model_adaptation(model, self.experience)
        return model

    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        """Model adaptation and ``make_optimizer`` at every experience (online ones too)."""
        self.model = self.model_adaptation()
        self.make_optimizer(reset_optimizer_state=reset_optimizer_state, **kwargs)

    @property
    def user_scheduler(self) -> bool:
        """Whether an ``LRSchedulerPlugin`` is among the plugins (it then owns the lr)."""
        return any(isinstance(p, LRSchedulerPlugin) for p in self.plugins)

    def _read_plugin_loader(self) -> None:
        """A plugin's multi-dataset loader (``ReplayPlugin``'s ``ReplayDataLoader``) reads
        frozen features when stage 1 may use the cache: its sampling stays, each of its
        datasets becomes ``FeatureRows`` (the experience's own from ``current_features``, a
        memory's encoded once per experience). Otherwise it reads images: a memory filled in
        ``after_training_exp`` holds CLIP's input already (see ``_after_training_exp``)."""
        loader = self.dataloader
        if not isinstance(loader, MultiDatasetDataLoader) or not self.features_cacheable:
            return
        rows = []
        for dataset in loader.datasets:
            if dataset is self.adapted_dataset:
                feats, labels = self.current_features
            else:
                feats, labels = self.extract_features(dataset, "replay memory features")
            rows.append(FeatureRows(feats, labels, task_labels_of(dataset)))
        loader.datasets = rows

    def train_dataset_adaptation(self, **kwargs):
        """CLIP's input; one frozen-encoder pass fits (or merges) the classes' Gaussians."""
        super().train_dataset_adaptation(**kwargs)
        self.adapted_dataset = self._to_clip_input(self.adapted_dataset)
        self._experience_input = self.adapted_dataset
        self._random_train_transform = None
        if self.config.cache_features:
            self._random_train_transform = find_random_transform(self.adapted_dataset)
            name = self._random_train_transform
            if name is not None and name not in self._warned_random:
                self._warned_random.add(name)
                warnings.warn(
                    f"random training transform {name}: training runs without the "
                    "feature cache, re-encoding the images every epoch (evaluation "
                    "stays cached)",
                    stacklevel=2,
                )
        feats, labels = self.features_of(
            self.adapted_dataset, f"train features, task {self.current_task}"
        )
        self.model.gaussians.fit(
            feats,
            labels,
            shrinkage=self.config.covariance_shrinkage,
            jitter=self.config.covariance_jitter,
            rapf_shrink=self.config.rapf_shrink_cov,
        )
        self.current_features = (feats, labels)

    def eval_dataset_adaptation(self, **kwargs):
        """The experience's eval dataset, brought to CLIP's input."""
        super().eval_dataset_adaptation(**kwargs)
        self.adapted_dataset = self._to_clip_input(self.adapted_dataset)

    def make_train_dataloader(
        self,
        num_workers=0,
        shuffle=True,
        pin_memory=None,
        persistent_workers=False,
        drop_last=False,
        **kwargs,
    ):
        """Seeded minibatches of cached features, or of images when the cache is off."""
        cached = self.current_features if self.features_cacheable else None
        self.dataloader = self._loader(self.adapted_dataset, cached, self.train_mb_size, shuffle)

    def make_eval_dataloader(
        self, num_workers=0, shuffle=False, pin_memory=None, persistent_workers=False, **kwargs
    ):
        """Ordered minibatches of cached test features (extracted once), or of images."""
        cached = None
        if self.features_cacheable:
            exp = self.experience
            cached = self.features_of(
                self.adapted_dataset,
                f"{exp.origin_stream.name} features, exp {exp.current_experience}",
            )
        self.dataloader = self._loader(self.adapted_dataset, cached, self.eval_mb_size, False)

    def _eval_scores(self, x: Tensor) -> Tensor:
        """``model(x)`` of an evaluation minibatch, ``[b, n_outputs]``; under torchrun a
        minibatch of images (no cached features: LoRA heads, ``cache_features`` false) is
        scored a shard of rows per rank and the float32 scores gathered back in row order,
        so every rank holds every score (the metrics need no reduction)."""
        return self._by_rank(self.model, x, self.model.n_outputs)

    def _minibatch_features(self, x: Tensor) -> Tensor:
        """``model.frozen_features(x)`` of a training minibatch ``[b, dim]``; under torchrun
        its images are encoded a shard of rows per rank and gathered back in row order."""
        return self._by_rank(self.model.frozen_features, x, self.model.backbone.embed_dim)

    def _by_rank(self, encode: Callable[[Tensor], Tensor], x: Tensor, width: int) -> Tensor:
        """``encode(x)``; under torchrun, for images, each rank encodes its rows
        (``distributed.shard_rows``) and the float32 outputs ``[b, width]`` are gathered back
        in row order, equal to one process up to the encoder's batch-size-dependent last bits.
        """
        if x.ndim == 2 or distributed.world_size() == 1:
            return encode(x)
        mine = x[distributed.shard_rows(len(x))]
        if len(mine):
            out = encode(mine).float()
        else:  # a minibatch with fewer rows than ranks
            out = x.new_zeros((0, width), dtype=torch.float32)
        return distributed.gather_rows(out, len(x))


def classes_of(experience) -> List[int]:
    """Class ids with samples in ``experience`` (its ``classes_in_this_experience`` when set)."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = set(int(t) for t in experience.dataset.targets)
    return [int(c) for c in classes]


def task_labels_of(dataset) -> Optional[Tensor]:
    """``[n]`` task labels of an Avalanche dataset's items (``None`` without the attribute)."""
    labels = getattr(dataset, "targets_task_labels", None)
    return None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)


def stream_class_count(experience) -> Optional[int]:
    """Number of classes of the benchmark ``experience`` comes from (its ``n_classes``), or
    ``None`` when the experience names no benchmark (online and hand-made streams)."""
    stream = getattr(experience, "origin_stream", None)
    benchmark = getattr(stream, "benchmark", None)
    n_classes = getattr(benchmark, "n_classes", None)
    return n_classes if isinstance(n_classes, int) else None
