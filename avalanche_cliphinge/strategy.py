"""``CLIPHingeStrategy``: the method as an Avalanche ``SupervisedTemplate``.

Names of this module too: the state it shares with its plugins (``StepState``,
``ExperienceClasses``, from ``step_state``), the model factory (``build_model``, from
``model``) and the plugins the config asks for (``default_plugins``, from ``plugins``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor

from . import compat  # noqa: F401  (Avalanche's save_checkpoint under torch 2.14)
from . import distributed
from .avalanche_plugins import experience_with_dataset, refuse_plugins
from .compiled_step import CompiledStep, graphs_report
from .config import CLIPHingeConfig, ConfigError
from .feature_cache import FeatureCache
from .model.class_names import ClassNames, class_name_table
from .model.cliphinge_model import CLIPHingeModel, build_model
from .plugins import default_plugins
from .step import EpochPlan, EpochRecord, StepRow, Stage1Scores, draw_epoch_plan
from .step import keeping_rows, stage1_loss, stage1_scores
from .step_state import ExperienceClasses, StepState
from .strategy_inputs import StrategyInputs
from .strategy_tasks import ExperienceTasks, avalanche_sizes
from .streams import ClipInput


def _step_field(name: str) -> property:
    """A strategy attribute that reads and writes ``strategy.step.<name>``."""
    return property(
        lambda self: getattr(self.step, name),
        lambda self, value: setattr(self.step, name, value),
        doc=f"``step.{name}`` (see ``StepState``).",
    )


class CLIPHingeStrategy(StrategyInputs, ExperienceTasks, SupervisedTemplate):
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
    merged with the new samples.

    The step is written once (``step``): at each epoch's start the strategy draws its plan
    (``epoch_plan``: replay rows and loss-term inputs of every step, from what the plugins
    registered in ``step``, a ``StepState``) and resets its ``epoch_record`` (device sums
    read by the epoch metrics, the first non-finite step). The eager runner is Avalanche's
    loop: ``forward`` calls ``step.stage1_scores``, ``criterion`` ``step.stage1_loss``,
    ``backward`` records the step, ``optimizer_step`` updates through ``step.keeping_rows``.
    With ``compile_step`` an epoch on cached features runs the same functions as one
    captured graph per step (``compiled_step.CompiledStep``).

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

    #: trained on the stream's experiences in turn, not an upper bound (``baselines``)
    upper_bound = False

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
        config = avalanche_sizes(config, train_mb_size, train_epochs, eval_mb_size)
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
        #: the current epoch's ``step.EpochPlan`` (drawn at its start)
        self.epoch_plan: Optional[EpochPlan] = None
        #: the current epoch's ``step.EpochRecord`` (one per experience, reset every epoch)
        self.epoch_record: Optional[EpochRecord] = None
        #: ``(prompt context, keep [n_classes])`` rows every update of the experience keeps
        self.frozen_rows: List[Tuple[Tensor, Tensor]] = []
        self._compiled_step = CompiledStep(self, CLIPHingeStrategy) if config.compile_step else None
        self.experience_classes = ExperienceClasses()
        self.current_features: Optional[Tuple[Tensor, Tensor]] = None
        self._dataset_keys = {}
        self._warned_random: set = set()
        self._row: Optional[StepRow] = None
        self.clip_input = ClipInput.for_backbone(self.model.backbone, config.resize_on_device)
        self.progress = progress
        self.feature_cache = feature_cache or FeatureCache(
            max_bytes=int(config.feature_cache_max_gb * 2**30), directory=config.feature_cache_dir
        )
        if config.compile and self.device.type == "cuda" and not config.compile_step:
            self.model.compile_prompt_encoder()

    # ---- helpers used by plugins ----------------------------------------------------------
    def release_graphs(self) -> None:
        """Free the captured steps' graphs and buffers (``compile_step``), stage 2's too: the
        end of a run. A later ``train`` builds them again."""
        if self._compiled_step is not None:
            self._compiled_step.release()
        freed = self.compile_report()
        for plugin in self.plugins:
            if isinstance(getattr(plugin, "captured", None), dict):
                plugin.captured.clear()
        self._freed_stage2 = (freed["stage2_graphs"], freed["stage2_guard_failures"])

    def compile_report(self) -> Dict[str, int]:
        """What the captured runners (``compile_step``) traced so far, freed ones included
        (``compiled_step.graphs_report``): graphs of each stage and guard failures."""
        freed = getattr(self, "_freed_stage2", (0, 0))
        return graphs_report(self._compiled_step, self.plugins, freed)

    @property
    def training_stopped(self) -> bool:
        """Whether a plugin asked the training to stop (``stop_training``, early stopping)."""
        return self._stop_training

    @property
    def loss_function(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The stage-1 criterion over ``(logits [n, n_seen], column targets [n])`` (the
        ``criterion`` argument; cross-entropy by default)."""
        return self._criterion

    # ---- training -------------------------------------------------------------------------
    def _before_training_exp(self, **kwargs):
        self.step = StepState()  # the plugins register this experience's terms
        self._open_experience()
        super()._before_training_exp(**kwargs)
        losses = self.step.plugin_losses.values()
        names = ["cross_entropy"] + [n for term in losses for n in term.reported_names()]
        self.epoch_record = EpochRecord(names, self.device)
        self._read_plugin_loader()

    def _before_training(self, **kwargs):
        refuse_plugins(self.plugins, self.config)  # plugins added to strategy.plugins later
        super()._before_training(**kwargs)

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
        super().training_epoch(**kwargs)

    def _before_training_epoch(self, **kwargs):
        if not self.user_scheduler:
            for group in self.optimizer.param_groups:
                group["lr"] = self.epoch_lr(self.clock.train_exp_epochs)
        super()._before_training_epoch(**kwargs)
        self.epoch_record.reset()
        self.epoch_plan = draw_epoch_plan(
            self.step,
            self.clock.train_exp_epochs,
            len(self.dataloader),
            self.model.column_of,
            getattr(self._criterion, "ignore_index", -100),
            self.device,
        )

    def _after_training_epoch(self, **kwargs):
        epoch = self.clock.train_exp_epochs
        super()._after_training_epoch(**kwargs)
        # the epoch's only read-back to the host
        self.epoch_record.check(f"task {self.current_task}, epoch {epoch}")

    def _before_forward(self, **kwargs):
        # this step's row of the epoch plan, before the plugins' before_forward see the step
        if self.is_training:
            self._row = self.epoch_plan.row(self.clock.train_epoch_iterations)
            self.step.replay_features = self._row.replay_features
            self.step.replay_labels = self._row.replay_labels
        super()._before_forward(**kwargs)

    def forward(self):
        """Scores of the minibatch ``[b, n_outputs]``, through ``self.model(...)``.

        In training (``step.stage1_scores``), the minibatch's frozen features and its
        replayed features go through the model in one call with the step's text features
        (kept in ``step``), so the trainable prompts go through the text encoder once per
        step; the replayed rows' scores are kept in ``step.replay_scores``.
        """
        with self.autocast():
            if not self.is_training:
                return self._eval_scores(self.mb_x)
            scored = stage1_scores(
                self.model, self._minibatch_features(self.mb_x), self.step.replay_features
            )
        self.step.replay_scores, self.step.text_features = scored.replay_scores, scored.text
        return scored.scores

    def criterion(self):
        """The stage-1 loss (``step.stage1_loss``): ``criterion`` (cross-entropy) over the
        seen classes, real samples plus replay, plus the plugins' registered terms; the
        unweighted terms go to ``step.loss_terms``.

        In evaluation, samples of classes not seen yet (future experiences of the test
        stream, every class before the first experience) are left out of the loss; an
        experience made only of them reports loss 0.
        """
        if self.is_training:
            scored = Stage1Scores(self.mb_output, self.step.replay_scores, self.step.text_features)
            loss, terms = stage1_loss(self.model, scored, self.mb_y, self._row, self._criterion)
            self.step.loss_terms.update({name: v.detach() for name, v in terms.items()})
            return loss
        targets = self.model.column_of[self.mb_y]
        keep = targets >= 0
        if not keep.any():
            return torch.zeros((), device=self.device)
        return self._criterion(
            self.mb_output[:, self.model.class_of_column][keep].float(), targets[keep]
        )

    def backward(self):
        """Backward pass, after adding the step to ``epoch_record`` (its sums and, when its
        loss is NaN or Inf, the first such step of the epoch). The record reads nothing back
        to the host, so GPU steps stay asynchronous; the epoch's end
        (``_after_training_epoch``) stops the run naming that step and its loss terms."""
        self.epoch_record.add(
            self.clock.train_epoch_iterations,
            self.loss,
            self.step.loss_terms,
            self.mb_output,
            self.mb_y,
        )
        self.epoch_record.count(len(self.mb_y))
        super().backward()

    def optimizer_step(self):
        """The optimizer's step; rows of a returning task whose classes are absent stay as
        they were (``step.keeping_rows``)."""
        keeping_rows(super().optimizer_step, self.frozen_rows)

    def _after_training_exp(self, **kwargs):
        """The plugins' ``after_training_exp`` (stage 2 among them), then every prompt frozen.

        While they run, the prompts this experience trained are still trainable (EWC and MAS
        take gradients of them) and ``experience.dataset`` is the experience's training data
        as CLIP's input (storage policies, EWC/MAS importances, AGEM/GEM memories read it).
        """
        self.frozen_rows = []
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
