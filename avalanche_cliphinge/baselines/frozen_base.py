"""The Avalanche strategy every baseline on frozen CLIP image features builds on (issue 28).

``FrozenFeatureStrategy`` has ``CLIPHingeStrategy``'s input handling (the ``StrategyInputs``
mixin: any stream brought to CLIP's input by ``streams.ClipInput``, frozen features through the
``FeatureCache``, seeded ``TensorBatchLoader`` minibatches); it registers each experience's
classes with its ``FrozenCLIPModel`` (``frozen_model``, whose names are served here too) and
trains the model's trainable parameters with Avalanche's loop. A subclass gives the model
(``make_model``) and, when it trains, its loss (``criterion``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.training.plugins import GDumbPlugin, SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..avalanche_plugins import experience_with_dataset
from ..config import CLIPHingeConfig, ConfigError
from ..feature_cache import FeatureCache
from ..model.backbone import CLIPBackbone, load_clip
from ..model.class_names import ClassNames, class_name_table
from ..step_state import ExperienceClasses
from ..strategy_inputs import StrategyInputs
from ..strategy_tasks import avalanche_sizes, read_experience
from ..streams import ClipInput
from .frozen_model import ClassMeans, FrozenCLIPModel

__all__ = ["ClassMeans", "FrozenCLIPModel", "FrozenFeatureStrategy"]


def require_config(config, name: str) -> None:
    """Raise ``ConfigError`` (one line, naming ``name``) unless ``config`` is a
    ``CLIPHingeConfig``."""
    if not isinstance(config, CLIPHingeConfig):
        raise ConfigError(
            f"{name}: config must be a CLIPHingeConfig, got {type(config).__name__}; "
            "use CLIPHingeConfig.from_json(path)"
        )


class FrozenFeatureStrategy(StrategyInputs, SupervisedTemplate):
    """Base of the strategies that learn on frozen CLIP image features.

    Per training experience: its classes are registered (``experience_classes``; new ones get
    score columns, checked against the config's layout), its images are brought to CLIP's
    input and encoded once through the feature cache, the model's statistics are fitted
    (``model.gaussians.fit``), then ``init_epochs`` (first task) or ``epochs`` of Avalanche's
    loop run over cached features (none when the model has no trainable parameter,
    ``TRAINS`` false). The optimizer is Adam over the trainable parameters, its state reset
    every experience, with the config's step decay (``lr_decay_epochs``); an
    ``LRSchedulerPlugin`` takes the learning rate over. Evaluation scores cached features;
    its loss is the cross-entropy over the learned classes, samples of unseen classes left out.

    Args:
        config: the settings (layout, backbone, seed, batches, feature cache, precision).
        class_names: names indexed by the stream's class ids, or ``{class id: name}``.
        device: torch device.
        train_mb_size, train_epochs, eval_mb_size: override ``batch_size``, ``init_epochs``
            and ``epochs`` (both), ``eval_batch_size``.
        plugins: Avalanche plugins (``GDumbPlugin`` refused: it would reset the model).
        evaluator: an Avalanche ``EvaluationPlugin`` (or factory).
        eval_every: Avalanche's periodic evaluation.
        feature_cache: a ``FeatureCache`` shared with other strategies on the same stream.
        progress: tqdm bars for the feature extraction.
        backbone: an already loaded ``CLIPBackbone`` to share (default: loaded from
            ``config``).
    """

    #: whether the model has parameters to train (SimpleCIL: none)
    TRAINS = True
    #: an incremental learner, reported with the others (the joint upper bounds set it)
    upper_bound = False

    def __init__(
        self,
        *,
        config: CLIPHingeConfig,
        class_names: ClassNames,
        device: str | torch.device = "cpu",
        train_mb_size: Optional[int] = None,
        train_epochs: Optional[int] = None,
        eval_mb_size: Optional[int] = None,
        plugins: Optional[Sequence[SupervisedPlugin]] = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        feature_cache: Optional[FeatureCache] = None,
        progress: bool = True,
        backbone: Optional[CLIPBackbone] = None,
    ):
        name = type(self).__name__
        require_config(config, name)
        config = avalanche_sizes(config, train_mb_size, train_epochs, eval_mb_size)
        for plugin in plugins or []:
            if isinstance(plugin, GDumbPlugin):
                raise ConfigError(
                    f"GDumbPlugin cannot apply to {name}: it retrains a copy of the untrained "
                    "model at every experience, dropping the class statistics learned so far"
                )
        try:
            names = class_name_table(class_names)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
        if config.layout_is_set and len(names) < config.n_classes:
            raise ConfigError(
                f"{name}: class_names has {len(names)} names but the layout has "
                f"{config.n_classes} classes; pass a name for every class id of the stream"
            )
        device = torch.device(device)
        if backbone is None:
            backbone = load_clip(
                config.model_name,
                config.pretrained,
                device=device,
                allow_activation_mismatch=config.allow_activation_mismatch,
            )
        self.config = config
        model = self.make_model(backbone, names).to(device)
        placeholder = [torch.zeros(1, requires_grad=True)]
        super().__init__(
            model=model,
            optimizer=torch.optim.Adam(
                placeholder, lr=config.init_lr, weight_decay=config.weight_decay
            ),
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=config.batch_size,
            train_epochs=config.init_epochs,
            eval_mb_size=config.eval_batch_size,
            device=device,
            plugins=list(plugins or []),
            evaluator=evaluator,
            eval_every=eval_every,
        )
        self.config = config
        self.class_names = names
        self.current_task = -1
        self.experience_classes = ExperienceClasses()
        self.current_features = None
        self._dataset_keys = {}
        self._warned_random: set = set()
        self.clip_input = ClipInput.for_backbone(backbone, config.resize_on_device)
        self.progress = progress
        self.feature_cache = feature_cache or FeatureCache(
            max_bytes=int(config.feature_cache_max_gb * 2**30), directory=config.feature_cache_dir
        )

    def make_model(self, backbone: CLIPBackbone, class_names) -> FrozenCLIPModel:
        """The strategy's model around ``backbone`` (``self.config`` is set)."""
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        """Number of trainable scalars (the frozen CLIP's are not)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ---- experiences ------------------------------------------------------------------------
    def _open_experience(self) -> None:
        """Register the experience's classes (``experience_classes``), its task and epochs."""
        model, config = self.model, self.config

        def register(new):
            try:
                return model.add_classes(new)
            except ValueError as err:
                raise ConfigError(str(err)) from None

        self.experience_classes = read_experience(model, config, self.experience, register)
        self.current_task = model.n_tasks - 1
        first = self.current_task == 0
        self.train_epochs = (config.init_epochs if first else config.epochs) if self.TRAINS else 0

    def _before_training_exp(self, **kwargs):
        self._open_experience()
        super()._before_training_exp(**kwargs)
        self._read_plugin_loader()

    def base_lr(self) -> float:
        """``init_lr`` on the first task, ``lr`` after."""
        return self.config.init_lr if self.current_task == 0 else self.config.lr

    def make_optimizer(self, **kwargs):
        """The trainable parameters become the optimizer's one group, its state reset."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        groups = self.optimizer.param_groups
        lr = groups[0]["lr"] if self.user_scheduler and groups else self.base_lr()
        groups.clear()
        self.optimizer.state.clear()
        self.optimizer.add_param_group({"params": params, "lr": lr})

    def _before_training_epoch(self, **kwargs):
        if not self.user_scheduler:
            epoch = self.clock.train_exp_epochs
            steps = sum(1 for e in self.config.lr_decay_epochs if epoch >= e)
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr() * self.config.lr_decay_factor**steps
        super()._before_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs):
        """The plugins' ``after_training_exp`` with the experience's data as CLIP's input."""
        experience = self.experience
        self.experience = experience_with_dataset(experience, self._experience_input)
        try:
            super()._after_training_exp(**kwargs)
        finally:
            self.experience = experience
            self._experience_input = None

    # ---- steps ------------------------------------------------------------------------------
    def forward(self):
        """``[b, n_outputs]`` scores of the minibatch (frozen features through the model)."""
        if not self.is_training:
            return self._eval_scores(self.mb_x)
        return self.model(self._minibatch_features(self.mb_x))

    def criterion(self):
        """Cross-entropy over the learned classes; in evaluation, samples of classes not
        learned yet are left out (0 when none is left)."""
        targets = self.model.column_of[self.mb_y]
        keep = targets >= 0
        if not keep.any():
            return torch.zeros((), device=self.device)
        scores = self.mb_output[:, self.model.class_of_column][keep].float()
        return F.cross_entropy(scores, targets[keep])
