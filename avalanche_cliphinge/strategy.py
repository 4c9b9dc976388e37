"""``CLIPHingeStrategy``: the method as an Avalanche ``SupervisedTemplate``."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.utils.data import DataLoader

from .config import CLIPHingeConfig, ConfigError
from .feature_cache import FeatureCache, dataset_fingerprint
from .loaders import EpochBatchSampler, TensorBatchLoader, encode_dataset
from .model.backbone import CLIPBackbone, load_clip
from .model.clip_hinge import CLIPHingeModel
from .plugins.gaussian_replay import GaussianReplayPlugin
from .plugins.hard_pair_hinge import HardPairHingePlugin
from .plugins.second_stage import SecondStagePlugin


def build_model(config: CLIPHingeConfig, class_names: Sequence[str],
                device: str | torch.device = "cpu",
                backbone: Optional[CLIPBackbone] = None) -> CLIPHingeModel:
    """Wrap ``backbone`` (default: the one ``config`` names, loaded now) in a ``CLIPHingeModel``."""
    if backbone is None:
        backbone = load_clip(config.model_name, config.pretrained, device=device)
    lora = ((config.lora_layers, config.lora_rank, config.lora_alpha)
            if config.use_lora_in_second_stage and config.second_stage_epochs > 0 else None)
    return CLIPHingeModel(backbone, class_names, n_ctx=config.n_ctx, ctx_init=config.ctx_init,
                          prompt_template=config.prompt_template,
                          use_image_adapter=config.use_image_adapter,
                          fusion_weight=config.second_stage_fusion_weight,
                          head_logit_scale=config.second_stage_logit_scale, lora=lora,
                          seed=config.seed,
                          resize_on_device=config.resize_on_device).to(device)


def default_plugins(config: CLIPHingeConfig) -> List[SupervisedPlugin]:
    """The plugins the config asks for: replay, hinge and stage 2 (each only when enabled)."""
    plugins: List[SupervisedPlugin] = []
    if config.samples_per_old_class > 0:
        plugins.append(GaussianReplayPlugin(samples_per_old_class=config.samples_per_old_class,
                                            seed=config.seed))
    if config.text_use_hinge_loss or config.use_image_hinge_loss:
        plugins.append(HardPairHingePlugin.from_config(config))
    if config.second_stage_epochs > 0:
        plugins.append(SecondStagePlugin.from_config(config))
    return plugins


class CLIPHingeStrategy(SupervisedTemplate):
    """Class-incremental learning with a frozen CLIP, class-specific prompts and hinge losses.

    Stage 1 (every experience): the new task's prompts are trained with cross-entropy over all
    classes seen so far (no task id at test time), plus the loss terms of the plugins:
    Gaussian replay of old-class features, hinge losses on hard old/new pairs. Stage 2 (the
    ``SecondStagePlugin``) trains a per-task linear head after stage 1; evaluation fuses
    ``clip + alpha * head``. Frozen CLIP weights never enter the optimizer.

    With ``cache_features`` (default) every image goes through the frozen encoder once per
    experience: the training loop and evaluation then run on ``[batch, dim]`` features.

    Args:
        config: the method's settings.
        class_names: names indexed by the stream's class ids (``len`` = number of classes).
        model: a ready ``CLIPHingeModel`` (default: built from ``config``).
        plugins: extra Avalanche plugins; a method plugin passed here replaces the default one.
        use_default_plugins: add the replay, hinge and stage-2 plugins the config asks for
            (not those whose type, or a subclass of it, is already in ``plugins``).
            ``False`` runs only the plugins passed by hand.
        evaluator: an Avalanche ``EvaluationPlugin`` (or factory).
        device: torch device.
        eval_every: Avalanche's periodic evaluation (-1: only when ``eval`` is called).
        feature_cache: a ``FeatureCache`` to share between strategies on the same stream
            (default: a new one sized by ``feature_cache_max_gb``, on disk under
            ``feature_cache_dir`` when set).
        progress: show tqdm bars for feature extraction and stage 2.
    """

    def __init__(self, *, config: CLIPHingeConfig, class_names: Sequence[str],
                 model: Optional[CLIPHingeModel] = None,
                 plugins: Optional[Sequence[SupervisedPlugin]] = None,
                 use_default_plugins: bool = True, evaluator=default_evaluator,
                 device: str | torch.device = "cpu", eval_every: int = -1,
                 feature_cache: Optional[FeatureCache] = None, progress: bool = True):
        if not isinstance(config, CLIPHingeConfig):
            raise ConfigError(f"config must be a CLIPHingeConfig, got {type(config).__name__}; "
                              "use CLIPHingeConfig.from_json(path)")
        config.check_class_count(len(class_names), "class_names")
        device = torch.device(device)
        model = build_model(config, class_names, device) if model is None else model.to(device)
        plugins = list(plugins or [])
        if use_default_plugins:
            plugins += [p for p in default_plugins(config)
                        if not any(isinstance(q, type(p)) for q in plugins)]
        # Avalanche needs an optimizer object now; make_optimizer replaces it per experience
        # with one over the trainable prompts only.
        placeholder = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=config.lr)
        super().__init__(model=model, optimizer=placeholder, criterion=torch.nn.CrossEntropyLoss(),
                         train_mb_size=config.batch_size, train_epochs=config.init_epochs,
                         eval_mb_size=config.eval_batch_size, device=device, plugins=plugins,
                         evaluator=evaluator, eval_every=eval_every)
        self.config = config
        self.class_names = list(class_names)
        self.current_task = -1
        self.replay_features: Optional[Tensor] = None
        self.replay_labels: Optional[Tensor] = None
        self.replay_scores: Optional[Tensor] = None
        self.loss_terms: Dict[str, Tensor] = {}
        self.current_features: Optional[Tuple[Tensor, Tensor]] = None
        self._nonfinite_step = torch.full((), -1, dtype=torch.long)
        self._nonfinite_terms: Dict[str, Tensor] = {}
        self._dataset_keys: Dict[Tuple[int, bool], Tuple[object, str]] = {}
        self.progress = progress
        self.feature_cache = feature_cache or FeatureCache(
            max_bytes=int(config.feature_cache_max_gb * 2 ** 30),
            directory=config.feature_cache_dir)
        if config.compile and self.device.type == "cuda":
            self.model.compile_prompt_encoder()

    # ---- helpers used by plugins ----------------------------------------------------------
    def generator(self, *parts: int) -> torch.Generator:
        """A CPU generator seeded from ``config.seed`` and ``parts`` (task, epoch, ...).

        Every random draw of a run comes from such a generator, so an experience replays
        identically whether the run is fresh or resumed.
        """
        seed = self.config.seed
        for part in parts:
            seed = seed * 1_000_003 + int(part)
        return torch.Generator().manual_seed(seed % (2 ** 63))

    def autocast(self):
        """bf16 autocast on CUDA when ``precision == 'bf16'``; a no-op context otherwise."""
        if self.config.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def features_cacheable(self) -> bool:
        """Whether training and eval may run on cached frozen features (no LoRA re-encoding)."""
        return self.config.cache_features and self.model.lora is None

    def extract_features(self, dataset, desc: str = "features") -> Tuple[Tensor, Tensor]:
        """Frozen image features of a dataset of ``(image, label, ...)`` items.

        Returns ``(features [n, dim] float32, labels [n] long)``, both on the strategy's device.
        """
        return encode_dataset(self.model.encode_images, dataset,
                              batch_size=self.config.eval_batch_size, device=self.device,
                              num_workers=self.config.num_workers, autocast=self.autocast,
                              desc=desc, progress=self.progress)

    def features_of(self, dataset, desc: str) -> Tuple[Tensor, Tensor]:
        """``extract_features`` through the feature cache when caching is on."""
        if not self.config.cache_features:
            return self.extract_features(dataset, desc)
        key = self._cache_key(dataset)
        feats, labels = self.feature_cache.get_or_compute(
            key, lambda: self.extract_features(dataset, desc), device=self.device)
        return feats.to(self.device), labels.to(self.device)

    def _cache_key(self, dataset) -> str:
        """The feature-cache key of ``dataset`` (its fingerprint plus the backbone's identity).

        For ``self.adapted_dataset`` it is computed once per experience dataset and phase
        (train or eval), then reused: Avalanche datasets are immutable, so the same
        experience adapted for the same phase holds the same items.
        """
        backbone = self.model.backbone

        def fingerprint() -> str:
            return dataset_fingerprint(dataset, backbone.model_name, backbone.pretrained,
                                       backbone.weights_sha256, self.config.resize_on_device)

        if dataset is not self.adapted_dataset or self.experience is None:
            return fingerprint()
        source = self.experience.dataset
        memo = (id(source), self.is_training)
        known = self._dataset_keys.get(memo)
        if known is None or known[0] is not source:       # the id of a freed dataset
            known = self._dataset_keys[memo] = (source, fingerprint())
        return known[1]

    def _batch_sampler(self, n: int, batch_size: int, shuffle: bool) -> EpochBatchSampler:
        generator = self.generator(self.current_task, 1) if shuffle else None
        return EpochBatchSampler(n, batch_size, shuffle, generator)

    def _loader(self, dataset, features, batch_size: int, shuffle: bool):
        sampler = self._batch_sampler(len(dataset), batch_size, shuffle)
        if features is not None:
            return TensorBatchLoader(features[0], features[1], sampler)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                          pin_memory=self.device.type == "cuda")

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

    # ---- training -------------------------------------------------------------------------
    def _before_training_exp(self, **kwargs):
        classes = sorted(int(c) for c in self.experience.classes_in_this_experience)
        task = self.model.n_tasks
        expected = self.config.task_size(task)
        if len(classes) != expected:
            raise ConfigError(f"experience {task} has {len(classes)} classes but the config "
                              f"expects {expected} (init_class={self.config.init_class}, "
                              f"increment={self.config.increment}); make them agree")
        if task >= self.config.total_tasks:
            raise ConfigError(f"experience {task} is beyond total_tasks="
                              f"{self.config.total_tasks}; raise total_tasks")
        self.current_task = self.model.add_task(classes)
        trainable = range(task + 1) if self.config.update_old_text_prompts else [task]
        self.model.set_trainable_prompts(list(trainable))
        self.train_epochs = self.config.init_epochs if task == 0 else self.config.epochs
        super()._before_training_exp(**kwargs)

    def train_dataset_adaptation(self, **kwargs):
        """One frozen-encoder pass: fits the new classes' Gaussians; feeds the cache."""
        super().train_dataset_adaptation(**kwargs)
        feats, labels = self.features_of(self.adapted_dataset,
                                         f"train features, task {self.current_task}")
        self.model.gaussians.fit(feats, labels, shrinkage=self.config.covariance_shrinkage,
                                 jitter=self.config.covariance_jitter)
        self.current_features = (feats, labels)

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None,
                              persistent_workers=False, drop_last=False, **kwargs):
        """Seeded minibatches of cached features, or of images when the cache is off."""
        cached = self.current_features if self.features_cacheable else None
        self.dataloader = self._loader(self.adapted_dataset, cached, self.train_mb_size, shuffle)

    def make_optimizer(self, **kwargs):
        """Adam over the trainable prompts (and the adapter): never the frozen CLIP."""
        params = [p.ctx for p in self.model.prompts if p.ctx.requires_grad]
        if self.model.adapter is not None:
            params += list(self.model.adapter.parameters())
        lr = self.config.init_lr if self.current_task == 0 else self.config.lr
        self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=self.config.weight_decay,
                                          fused=self.device.type == "cuda")

    def epoch_lr(self, epoch: int) -> float:
        """Stage-1 learning rate at ``epoch`` (0-based) of the current task (step decay)."""
        base = self.config.init_lr if self.current_task == 0 else self.config.lr
        steps = sum(1 for e in self.config.lr_decay_epochs if epoch >= e)
        return base * self.config.lr_decay_factor ** steps

    def _before_training_iteration(self, **kwargs):
        self.replay_features = self.replay_labels = self.replay_scores = None
        self.loss_terms = {}
        if self.config.compile and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        super()._before_training_iteration(**kwargs)

    def backward(self):
        """Backward pass; the first NaN or Inf loss of the epoch is recorded on the device.

        The check reads nothing back to the host, so GPU steps stay asynchronous; the
        epoch's end (``_after_training_epoch``) stops the run naming that step and its
        loss terms.
        """
        loss = self.loss.detach()
        first = ~torch.isfinite(loss).all() & (self._nonfinite_step < 0)
        self._nonfinite_step = torch.where(first, self.clock.train_epoch_iterations,
                                           self._nonfinite_step)
        for name, value in self.loss_terms.items():
            value = value.detach().float().reshape(())
            kept = self._nonfinite_terms.get(name)
            if kept is None:
                kept = torch.full_like(value, float("nan"))
            self._nonfinite_terms[name] = torch.where(first, value, kept)
        super().backward()

    def _before_training_epoch(self, **kwargs):
        self._nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._nonfinite_terms = {}
        for group in self.optimizer.param_groups:
            group["lr"] = self.epoch_lr(self.clock.train_exp_epochs)
        super()._before_training_epoch(**kwargs)

    def _after_training_epoch(self, **kwargs):
        epoch = self.clock.train_exp_epochs
        super()._after_training_epoch(**kwargs)
        step = int(self._nonfinite_step)          # the epoch's only read-back to the host
        if step >= 0:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in self._nonfinite_terms.items())
            raise FloatingPointError(
                f"non-finite loss at task {self.current_task}, epoch {epoch}, iteration "
                f"{step} ({terms}); lower lr or check the data. Earlier checkpoints are intact")

    def forward(self):
        """Scores of the minibatch ``[b, n_classes]``.

        In training, replayed features join the minibatch's features in one pass, so the
        trainable prompts go through the text encoder once per step; their scores are kept
        in ``replay_scores`` for the cross-entropy.
        """
        with self.autocast():
            if not self.is_training:
                return self.model(self.mb_x)
            feats = self.model.image_features(self.mb_x)
            n_real = feats.shape[0]
            if self.replay_features is not None:
                feats = torch.cat([feats, self.replay_features.to(feats.dtype)])
            scores = self.model.seen_scores(feats)
            if self.replay_features is not None:
                self.replay_scores = scores[n_real:]
            return self.model.to_full_width(scores[:n_real])

    def criterion(self):
        """Cross-entropy over the seen classes, on real samples plus replayed features.

        In evaluation, samples of classes not seen yet (future experiences of the test
        stream) are left out of the loss; an experience made only of them reports loss 0.
        """
        logits = self.mb_output[:, self.model.seen_index].float()
        targets = self.model.column_of[self.mb_y]
        if self.is_training and self.replay_scores is not None:
            logits = torch.cat([logits, self.replay_scores.float()])
            targets = torch.cat([targets, self.model.column_of[self.replay_labels]])
        if not self.is_training:
            keep = targets >= 0
            if not keep.any():
                return torch.zeros((), device=self.device)
            logits, targets = logits[keep], targets[keep]
        loss = F.cross_entropy(logits, targets)
        if self.is_training:
            self.loss_terms["cross_entropy"] = loss.detach()
        return loss

    def _after_training_exp(self, **kwargs):
        self.model.set_trainable_prompts([])
        super()._after_training_exp(**kwargs)

    # ---- evaluation -----------------------------------------------------------------------
    def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None,
                             persistent_workers=False, **kwargs):
        """Ordered minibatches of cached test features (extracted once), or of images."""
        cached = None
        if self.features_cacheable:
            exp = self.experience
            cached = self.features_of(self.adapted_dataset,
                                      f"{exp.origin_stream.name} features, exp "
                                      f"{exp.current_experience}")
        self.dataloader = self._loader(self.adapted_dataset, cached, self.eval_mb_size, False)
