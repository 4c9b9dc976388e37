"""``CLIPHingeStrategy``: the method as an Avalanche ``SupervisedTemplate``.

The state it shares with its plugins (``StepState``, ``ExperienceClasses``) is declared in
``step_state``, the model factory (``build_model``) in ``model``; both are names of this
module too.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import LRSchedulerPlugin, SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.utils.data import DataLoader

from . import compat  # noqa: F401  (Avalanche's save_checkpoint under torch 2.14)
from . import distributed
from .avalanche_plugins import FeatureRows, experience_with_dataset, refuse_plugins
from .compiled_step import CompiledStep
from .config import CLIPHingeConfig, ConfigError
from .feature_cache import FeatureCache, dataset_fingerprint
from .loaders import EpochBatchSampler, TensorBatchLoader, encode_dataset
from .model.class_names import ClassNames, class_name_table
from .model.cliphinge_model import CLIPHingeModel, build_model
from .plugins.gaussian_replay import GaussianReplayPlugin
from .plugins.hard_pair_hinge import HardPairHingePlugin
from .plugins.second_stage import SecondStagePlugin
from .seeding import Draw, generator as seeded
from .step_state import ExperienceClasses, StepState
from .dataset_transforms import find_random_transform, foreign_normalize, freeze_transforms
from .streams import STREAM_FIX, ClipInput, StreamInputError, check_item_labels


def default_plugins(config: CLIPHingeConfig) -> List[SupervisedPlugin]:
    """The plugins the config asks for: replay, hinge and stage 2 (each only when enabled)."""
    plugins: List[SupervisedPlugin] = []
    if config.samples_per_old_class > 0:
        plugins.append(
            GaussianReplayPlugin(
                samples_per_old_class=config.samples_per_old_class,
                classes_per_step=config.replay_classes_per_step,
                seed=config.seed,
            )
        )
    if config.text_use_hinge_loss or config.use_image_hinge_loss:
        plugins.append(HardPairHingePlugin.from_config(config))
    if config.second_stage_epochs > 0:
        plugins.append(SecondStagePlugin.from_config(config))
    return plugins


def _step_field(name: str) -> property:
    """A strategy attribute that reads and writes ``strategy.step.<name>``."""
    return property(
        lambda self: getattr(self.step, name),
        lambda self, value: setattr(self.step, name, value),
        doc=f"``step.{name}`` (see ``StepState``).",
    )


class CLIPHingeStrategy(SupervisedTemplate):
    """Class-incremental learning with a frozen CLIP, class-specific prompts and hinge losses.

    Stage 1 (every experience): the new task's prompts are trained with cross-entropy over all
    classes seen so far (no task id at test time), plus the loss terms of the plugins:
    Gaussian replay of old-class features, hinge losses on hard old/new pairs. Stage 2 (the
    ``SecondStagePlugin``) trains a per-task linear head after stage 1; evaluation fuses
    ``clip + alpha * head``. Frozen CLIP weights never enter the optimizer.

    A drop-in for Avalanche's ``Naive`` on any stream: whatever the stream serves (PIL
    images, uint8 or ``[0, 1]`` float tensors of any size, or CLIP's own input) is brought to
    CLIP's input by ``streams.ClipInput``; scores are ``[batch, n_outputs]`` indexed by the
    stream's class ids, ``UNSEEN_SCORE`` for classes not learned yet (every class before
    the first experience). A class that comes back in a later experience keeps its task and
    its prompts (trained again or frozen, ``returning_class_prompts``); its Gaussian is
    merged with the new samples. Stage-1 state of a step lives in ``step`` (``StepState``).
    With ``compile_step`` a stage-1 epoch on cached features runs as one captured graph per
    step (``compiled_step.CompiledStep``; the same learned tensors to float tolerance).

    With ``cache_features`` (default) every image goes through the frozen encoder once per
    experience: the training loop and evaluation then run on ``[batch, dim]`` features. A
    random training transform turns the cache off for training (a warning names it). With
    LoRA (``use_lora_in_second_stage``) stage 1 stays cached; stage 2 and, once a task has
    its adapter, evaluation encode the images (see ``features_cacheable``). Under torchrun
    each rank encodes its shard of every uncached training minibatch (``_minibatch_features``).

    Args:
        config: the method's settings.
        class_names: names indexed by the stream's class ids, or a dict ``{class id: name}``
            (``streams.class_names_for`` reads them off a benchmark); they must cover at
            least the stream's ids (more names are fine: CIFAR-100's for a subset stream).
            A set layout is checked against the classes of the benchmark the first
            experience comes from, and every experience against its task's size.
        model: a ready ``CLIPHingeModel`` (default: built from ``config``).
        optimizer: a torch optimizer whose type and defaults (lr, weight decay...) stage 1
            uses; its parameter groups are replaced by the trainable prompts at every
            experience, the object stays (default: Adam with the config's lr and weight decay).
        criterion: the stage-1 loss over ``(logits [n, n_seen], column targets [n])``
            (default: cross-entropy).
        train_mb_size, train_epochs, eval_mb_size: Avalanche's names for ``batch_size``,
            ``init_epochs`` and ``epochs`` (both), ``eval_batch_size``; they override the
            config when given.
        plugins: extra Avalanche plugins; a method plugin passed here replaces the default one.
            With an ``LRSchedulerPlugin`` the method's step decay (``lr_decay_epochs``) is off
            and the scheduler alone sets the learning rate. Avalanche's plugins read CLIP's
            input where they read the experience's data (see ``avalanche_plugins``);
            ``GDumbPlugin``, and EWC/SI/MAS/LwF while nothing learned earlier trains again,
            raise ``ConfigError`` here or when training starts.
        use_default_plugins: add the replay, hinge and stage-2 plugins the config asks for
            (not those whose type, or a subclass of it, is already in ``plugins``).
            ``False`` runs only the plugins passed by hand.
        evaluator: an Avalanche ``EvaluationPlugin`` (or factory).
        device: torch device.
        eval_every, peval_mode: Avalanche's periodic evaluation.
        feature_cache: a ``FeatureCache`` to share between strategies on the same stream
            (default: a new one sized by ``feature_cache_max_gb``, on disk under
            ``feature_cache_dir`` when set).
        progress: show tqdm bars for feature extraction and stage 2.
    """

    replay_features = _step_field("replay_features")
    replay_labels = _step_field("replay_labels")
    replay_scores = _step_field("replay_scores")
    loss_terms = _step_field("loss_terms")

    def __init__(
        self,
        *,
        config: CLIPHingeConfig,
        class_names: ClassNames,
        model: Optional[CLIPHingeModel] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        train_mb_size: Optional[int] = None,
        train_epochs: Optional[int] = None,
        eval_mb_size: Optional[int] = None,
        plugins: Optional[Sequence[SupervisedPlugin]] = None,
        use_default_plugins: bool = True,
        evaluator=default_evaluator,
        device: str | torch.device = "cpu",
        eval_every: int = -1,
        peval_mode: str = "epoch",
        feature_cache: Optional[FeatureCache] = None,
        progress: bool = True,
    ):
        if not isinstance(config, CLIPHingeConfig):
            raise ConfigError(
                f"config must be a CLIPHingeConfig, got {type(config).__name__}; "
                "use CLIPHingeConfig.from_json(path)"
            )
        overrides = {
            key: value
            for key, value in (
                ("batch_size", train_mb_size),
                ("init_epochs", train_epochs),
                ("epochs", train_epochs),
                ("eval_batch_size", eval_mb_size),
            )
            if value is not None
        }
        config = config.replace(**overrides) if overrides else config
        refuse_plugins(plugins or [], config)
        try:
            names = class_name_table(class_names)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if config.layout_is_set and len(names) < config.n_classes:
            raise ConfigError(
                f"class_names has {len(names)} names but init_class + increment * "
                f"(total_tasks - 1) = {config.n_classes} classes; pass a name for every class "
                "id of the stream (more names than the stream's classes are fine)"
            )
        device = torch.device(device)
        model = build_model(config, names, device) if model is None else model.to(device)
        plugins = list(plugins or [])
        if use_default_plugins:
            plugins += [
                p
                for p in default_plugins(config)
                if not any(isinstance(q, type(p)) for q in plugins)
            ]
        self._user_optimizer = optimizer is not None
        if optimizer is None:
            # one optimizer for the whole stream; make_optimizer swaps in the trainable
            # prompts at each experience (a scheduler plugin keeps stepping this object)
            optimizer = torch.optim.Adam(
                [torch.zeros(1, requires_grad=True)],
                lr=config.init_lr,
                weight_decay=config.weight_decay,
                fused=device.type == "cuda",
            )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion or torch.nn.CrossEntropyLoss(),
            train_mb_size=config.batch_size,
            train_epochs=config.init_epochs,
            eval_mb_size=config.eval_batch_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )
        self.config = config
        self.class_names = names
        self.current_task = -1
        self.step = StepState()
        #: the epoch's ``metrics.EpochSums`` while captured steps run, else ``None``
        self.epoch_sums = None
        self._compiled_step = CompiledStep(self, CLIPHingeStrategy) if config.compile_step else None
        self.experience_classes = ExperienceClasses()
        self.current_features: Optional[Tuple[Tensor, Tensor]] = None
        self._nonfinite_step = torch.full((), -1, dtype=torch.long)
        self._nonfinite_terms: Dict[str, Tensor] = {}
        self._dataset_keys: Dict[Tuple[int, bool], Tuple[object, str]] = {}
        self._frozen_rows: List[Tuple[Tensor, Tensor]] = []
        self._random_train_transform: Optional[str] = None
        self._warned_random: set = set()
        #: the experience's training data as CLIP's input (what plugins read as its dataset)
        self._experience_input = None
        self.clip_input = ClipInput.for_backbone(self.model.backbone, config.resize_on_device)
        self.progress = progress
        self.feature_cache = feature_cache or FeatureCache(
            max_bytes=int(config.feature_cache_max_gb * 2**30), directory=config.feature_cache_dir
        )
        if config.compile and self.device.type == "cuda" and not config.compile_step:
            self.model.compile_prompt_encoder()

    # ---- helpers used by plugins ----------------------------------------------------------
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

        The items keep the class ids of ``dataset.targets`` (``streams.freeze_transforms``:
        a benchmark's id remapping survives the freeze). Raises ``StreamInputError`` (one
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

    # ---- training -------------------------------------------------------------------------
    def _before_training_exp(self, **kwargs):
        self.step = StepState()  # the plugins register this experience's terms
        if self.model.n_tasks == 0:
            classes = stream_class_count(self.experience)
            if classes is not None:
                self.config.check_class_count(classes, "the stream")
        present = sorted(int(c) for c in classes_of(self.experience))
        seen = set(self.model.seen_classes)
        new = [c for c in present if c not in seen]
        returning = [c for c in present if c in seen]
        task = None
        if new:
            task = self.model.n_tasks
            # a layout key left unset (None) takes the stream's experiences as they come
            expected = self.config.task_size(task)
            if not returning and expected is not None and len(new) != expected:
                raise ConfigError(
                    f"experience {task} has {len(new)} classes but the config "
                    f"expects {expected} (init_class={self.config.init_class}, "
                    f"increment={self.config.increment}); make them agree"
                )
            if self.config.total_tasks is not None and task >= self.config.total_tasks:
                raise ConfigError(
                    f"experience {task} is beyond total_tasks="
                    f"{self.config.total_tasks}; raise total_tasks"
                )
            self.model.add_task(new)
        self.experience_classes = ExperienceClasses(
            present=present,
            new=new,
            returning=returning,
            task=task,
            old=[c for c in self.model.seen_classes if c not in set(present)],
        )
        self.current_task = self.model.n_tasks - 1
        trainable = self._set_trainable_prompts()
        # nothing to train when every class returns with frozen prompts: statistics only
        self.train_epochs = (
            0
            if not trainable
            else (self.config.init_epochs if self.current_task == 0 else self.config.epochs)
        )
        super()._before_training_exp(**kwargs)
        self._read_plugin_loader()

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

    def _before_training(self, **kwargs):
        refuse_plugins(self.plugins, self.config)  # plugins added to strategy.plugins later
        super()._before_training(**kwargs)

    def _set_trainable_prompts(self) -> bool:
        """Prompts of this experience: the new task's, every earlier task's with
        ``update_old_text_prompts``, and those of returning classes unless
        ``returning_class_prompts == "freeze"`` (other classes of their tasks stay fixed).

        Returns whether anything (prompts or the image adapter) trains in this experience.
        """
        model, classes = self.model, self.experience_classes
        trainable = set(range(model.n_tasks)) if self.config.update_old_text_prompts else set()
        if classes.task is not None:
            trainable.add(classes.task)
        self._frozen_rows = []
        if self.config.returning_class_prompts == "train":
            for task in sorted({model.task_of(c) for c in classes.returning} - trainable):
                keep = torch.tensor(
                    [c not in classes.returning for c in model.task_classes[task]],
                    device=model.prompts[task].ctx.device,
                )
                self._frozen_rows.append((model.prompts[task].ctx, keep))
                trainable.add(task)
        model.set_trainable_prompts(sorted(trainable))
        return bool(trainable) or model.adapter is not None

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

    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        """Model adaptation and ``make_optimizer`` at every experience (online ones too)."""
        self.model = self.model_adaptation()
        self.make_optimizer(reset_optimizer_state=reset_optimizer_state, **kwargs)

    @property
    def user_scheduler(self) -> bool:
        """Whether an ``LRSchedulerPlugin`` is among the plugins (it then owns the lr)."""
        return any(isinstance(p, LRSchedulerPlugin) for p in self.plugins)

    def base_lr(self) -> float:
        """Stage-1 learning rate before decay: the user optimizer's, else the config's."""
        if self._user_optimizer:
            return float(self.optimizer.defaults["lr"])
        return self.config.init_lr if self.current_task == 0 else self.config.lr

    def make_optimizer(self, reset_optimizer_state=False, **kwargs):
        """The trainable prompts (and the adapter) become the optimizer's one param group.

        The optimizer object stays for the whole stream (a scheduler plugin keeps a reference
        to it); its state is reset when the parameters change. Never the frozen CLIP.
        """
        params = [p.ctx for p in self.model.prompts if p.ctx.requires_grad]
        if self.model.adapter is not None:
            params += list(self.model.adapter.parameters())
        groups = self.optimizer.param_groups
        current = [p for g in groups for p in g["params"]]
        if not reset_optimizer_state and [id(p) for p in current] == [id(p) for p in params]:
            return
        lr = groups[0]["lr"] if self.user_scheduler and groups else self.base_lr()
        groups.clear()
        self.optimizer.state.clear()
        self.optimizer.add_param_group({"params": params, "lr": lr})

    def epoch_lr(self, epoch: int) -> float:
        """Stage-1 learning rate at ``epoch`` (0-based) of the current task (step decay)."""
        steps = sum(1 for e in self.config.lr_decay_epochs if epoch >= e)
        return self.base_lr() * self.config.lr_decay_factor**steps

    def _before_training_iteration(self, **kwargs):
        self.step = self.step.next()
        if self.config.compile and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        super()._before_training_iteration(**kwargs)

    def _after_training_iteration(self, **kwargs):
        super()._after_training_iteration(**kwargs)
        self.step = self.step.next()

    def training_epoch(self, **kwargs):
        """One stage-1 epoch: captured steps with ``compile_step`` (``CompiledStep``, which
        says once why a task it cannot capture runs eagerly), else Avalanche's loop."""
        if self._compiled_step is not None and self._compiled_step.run_epoch():
            return
        self.epoch_sums = None
        super().training_epoch(**kwargs)

    def optimizer_step(self):
        """Adam step; rows of a returning task whose classes are absent stay as they were."""
        kept = [(ctx, keep, ctx.detach()[keep].clone()) for ctx, keep in self._frozen_rows]
        super().optimizer_step()
        with torch.no_grad():
            for ctx, keep, values in kept:
                ctx[keep] = values

    def backward(self):
        """Backward pass; the first NaN or Inf loss of the epoch is recorded on the device.

        The check reads nothing back to the host, so GPU steps stay asynchronous; the
        epoch's end (``_after_training_epoch``) stops the run naming that step and its
        loss terms.
        """
        loss = self.loss.detach()
        first = ~torch.isfinite(loss).all() & (self._nonfinite_step < 0)
        self._nonfinite_step = torch.where(
            first, self.clock.train_epoch_iterations, self._nonfinite_step
        )
        for name, value in self.step.loss_terms.items():
            value = value.detach().float().reshape(())
            kept = self._nonfinite_terms.get(name)
            if kept is None:
                kept = torch.full_like(value, float("nan"))
            self._nonfinite_terms[name] = torch.where(first, value, kept)
        super().backward()

    def _before_training_epoch(self, **kwargs):
        self._nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._nonfinite_terms = {}
        if not self.user_scheduler:
            for group in self.optimizer.param_groups:
                group["lr"] = self.epoch_lr(self.clock.train_exp_epochs)
        super()._before_training_epoch(**kwargs)

    def _after_training_epoch(self, **kwargs):
        epoch = self.clock.train_exp_epochs
        super()._after_training_epoch(**kwargs)
        step = int(self._nonfinite_step)  # the epoch's only read-back to the host
        if step >= 0:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in self._nonfinite_terms.items())
            raise FloatingPointError(
                f"non-finite loss at task {self.current_task}, epoch {epoch}, iteration "
                f"{step} ({terms}); lower lr or check the data. Earlier checkpoints are intact"
            )

    def forward(self):
        """Scores of the minibatch ``[b, n_outputs]``, through ``self.model(...)``.

        In training, the minibatch's frozen features and the replayed features go through
        the model in one call with the step's text features (kept in ``step``), so the
        trainable prompts go through the text encoder once per step; the replayed rows'
        scores are kept in ``step.replay_scores`` for the cross-entropy.
        """
        with self.autocast():
            if not self.is_training:
                return self._eval_scores(self.mb_x)
            scores, self.step.replay_scores, self.step.text_features = self._stage1_scores(
                self.mb_x, self.step.replay_features
            )
            return scores

    def _stage1_scores(
        self, x: Tensor, replay: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """Training scores of a minibatch and its replayed features, in one model call.

        Args:
            x: ``[b, dim]`` frozen features (or ``[b, 3, H, W]`` images) of the minibatch.
            replay: ``[k, dim]`` replayed features, or ``None``.

        Returns:
            ``(scores [b, n_outputs], replay scores [k, n_outputs] or None, text features
            [n_seen, dim])``; the text features are the step's, in the graph.
        """
        feats = self._minibatch_features(x)
        n_real = feats.shape[0]
        if replay is not None:
            feats = torch.cat([feats, replay.to(feats.dtype)])
        text = self.model.text_features()
        scores = self.model(feats, text_features=text)
        return scores[:n_real], None if replay is None else scores[n_real:], text

    def _eval_scores(self, x: Tensor) -> Tensor:
        """``model(x)`` of an evaluation minibatch, ``[b, n_outputs]``; under torchrun a
        minibatch of images (no cached features: LoRA heads, ``cache_features`` false) is
        scored a shard of rows per rank (``distributed.shard_rows``) and the float32 scores
        gathered back in row order, so every rank holds every score (the metrics need no
        reduction), equal to one process up to the encoder's batch-size-dependent last bits.
        """
        if x.ndim == 2 or distributed.world_size() == 1:
            return self.model(x)
        mine = x[distributed.shard_rows(len(x))]
        if len(mine):
            scores = self.model(mine).float()
        else:  # a minibatch with fewer rows than ranks
            scores = x.new_zeros((0, self.model.n_outputs), dtype=torch.float32)
        return distributed.gather_rows(scores, len(x))

    def _minibatch_features(self, x: Tensor) -> Tensor:
        """``model.frozen_features(x)`` of a training minibatch; under torchrun its images are
        encoded a shard per rank (``distributed.shard_rows``) and gathered back in row order,
        equal to one process up to the encoder's batch-size-dependent last bits."""
        if x.ndim == 2 or distributed.world_size() == 1:
            return self.model.frozen_features(x)
        mine = x[distributed.shard_rows(len(x))]
        if len(mine):
            feats = self.model.frozen_features(mine)
        else:  # a minibatch with fewer rows than ranks
            feats = x.new_zeros((0, self.model.backbone.embed_dim), dtype=torch.float32)
        return distributed.gather_rows(feats, len(x))

    def _stage1_logits(
        self,
        scores: Tensor,
        labels: Tensor,
        replay_scores: Optional[Tensor],
        replay_targets: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor]:
        """The cross-entropy's input: ``(logits [b + k, n_seen] float32, column targets
        [b + k])`` of the minibatch (``scores [b, n_outputs]``, class ids ``labels [b]``)
        followed by the replayed rows (``replay_scores [k, n_outputs]``, column targets
        ``replay_targets [k]``), when there are any."""
        seen = self.model.class_of_column
        logits = scores[:, seen].float()
        targets = self.model.column_of[labels]
        if replay_scores is not None:
            logits = torch.cat([logits, replay_scores[:, seen].float()])
            targets = torch.cat([targets, replay_targets])
        return logits, targets

    def criterion(self):
        """``criterion`` (cross-entropy) over the seen classes, real samples plus replay.

        In evaluation, samples of classes not seen yet (future experiences of the test
        stream, every class before the first experience) are left out of the loss; an
        experience made only of them reports loss 0.
        """
        replay = self.step.replay_scores if self.is_training else None
        logits, targets = self._stage1_logits(
            self.mb_output,
            self.mb_y,
            replay,
            None if replay is None else self.model.column_of[self.step.replay_labels],
        )
        if not self.is_training:
            keep = targets >= 0
            if not keep.any():
                return torch.zeros((), device=self.device)
            logits, targets = logits[keep], targets[keep]
        loss = self._criterion(logits, targets)
        if self.is_training:
            self.step.loss_terms["cross_entropy"] = loss.detach()
        return loss

    def _after_training_exp(self, **kwargs):
        """The plugins' ``after_training_exp`` (stage 2 among them), then every prompt frozen.

        While they run, the prompts this experience trained are still trainable (EWC and MAS
        take gradients of them) and ``experience.dataset`` is the experience's training data
        as CLIP's input (storage policies, EWC/MAS importances, AGEM/GEM memories read it).
        """
        self._frozen_rows = []
        experience = self.experience
        self.experience = experience_with_dataset(experience, self._experience_input)
        try:
            super()._after_training_exp(**kwargs)
        finally:
            self.experience = experience
            self._experience_input = None
        self.model.set_trainable_prompts([])
        # under torchrun every rank trained alike; rank 0's tensors end any drift (GPUs)
        distributed.sync_learned_state(self.model)

    # ---- evaluation -----------------------------------------------------------------------
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
