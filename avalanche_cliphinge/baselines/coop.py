"""``CoOp``: one learnable context shared by every class, trained task after task (issue 28).

Built on ``CLIPHingeStrategy``: the same input handling, feature cache, step functions
(``step.stage1_scores``, ``step.stage1_loss``) and runners; the model is a ``CLIPHingeModel``
with a unified context (``build_model(..., shared_context=True)``), and the method's replay,
hinge, image adapter and stage 2 are off. ``learned_parameters`` counts what a model learned
(the comparison's "trainable parameters").
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from torch import Tensor, nn

from ..config import CLIPHingeConfig, ConfigError
from ..feature_cache import FeatureCache
from ..model.backbone import CLIPBackbone
from ..model.class_names import ClassNames, class_name_table
from ..model.cliphinge_model import CLIPHingeModel, build_model
from ..plugins import GaussianReplayPlugin, HardPairHingePlugin, SecondStagePlugin
from ..strategy import CLIPHingeStrategy

#: the method's plugins, which CoOp runs without
METHOD_PLUGINS = (GaussianReplayPlugin, HardPairHingePlugin, SecondStagePlugin)


def learned_parameters(model: nn.Module) -> int:
    """Scalars ``model`` learns: its parameters outside the frozen CLIP (``model.clip``),
    LoRA adapters inside it included, each counted once (a shared context once)."""
    frozen = {id(p) for name, p in model.clip.named_parameters() if "lora_" not in name}
    return sum(p.numel() for p in model.parameters() if id(p) not in frozen)


def coop_config(config: CLIPHingeConfig) -> CLIPHingeConfig:
    """``config`` with what CoOp does not have switched off: Gaussian replay, the text and
    image hinges, the image adapter, stage 2 and its LoRA, old prompts training again; and
    the captured step (``compile_step``), which trains the newest task's prompts only while
    the shared context changes every task's text features (the eager step runs)."""
    if not isinstance(config, CLIPHingeConfig):
        raise ConfigError(
            f"config must be a CLIPHingeConfig, got {type(config).__name__}; "
            "use CLIPHingeConfig.from_json(path)"
        )
    return config.replace(
        samples_per_old_class=0,
        text_use_hinge_loss=False,
        use_image_hinge_loss=False,
        use_image_adapter=False,
        second_stage_epochs=0,
        use_lora_in_second_stage=False,
        update_old_text_prompts=False,
        compile_step=False,
    )


class CoOp(CLIPHingeStrategy):
    """CoOp (Zhou, Yang, Loy, Liu: "Learning to Prompt for Vision-Language Models", IJCV
    2022, arXiv 2109.01134) as a class-incremental Avalanche strategy.

    Every class's prompt is ``[SOS] ctx_1 .. ctx_{n_ctx} name . [EOS]`` with ONE learnable
    context ``model.shared_ctx [n_ctx, width]`` read by every class of every task (CoOp's
    unified context, its default, class token at the end). Each experience trains that
    tensor alone with cross-entropy over all classes seen so far, on the cosine logits
    between frozen image features and the prompted text features scaled by CLIP's
    temperature; old classes have no samples (no replay), so forgetting is CoOp's own.

    Kept from the paper: the unified context, the frozen CLIP, the loss. Simplified: the
    optimizer and schedule are the method's (Adam, ``init_lr``/``lr``, step decay at
    ``lr_decay_epochs``; the paper used SGD at 0.002 with cosine decay), and the context
    length and initialisation are the config's ``n_ctx`` and ``ctx_init`` (4, "a photo of
    a": one of the paper's settings; its default is 16 random vectors). Not from the paper:
    the incremental protocol (one training run per task, no memory). The method's replay,
    hinges, image adapter and stage 2 are switched off (``coop_config``), and so is the
    captured step (``compile_step``: the eager step runs); passing one of the method's
    plugins raises ``ConfigError``.

    Scores are ``[batch, n_outputs]`` by the stream's class ids, ``UNSEEN_SCORE`` for classes
    not learned yet. ``model.save`` writes a model that ``CLIPHingeModel.load`` rebuilds with
    the context copied into every class's rows (the same scores).

    Args:
        config, class_names, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size,
            plugins, evaluator, device, eval_every, peval_mode, feature_cache, progress: as
            ``CLIPHingeStrategy``'s (``config`` passes through ``coop_config``).
        model: a ``CLIPHingeModel`` with a shared context (``CoOp.build_model``; default:
            built from ``config``).
    """

    #: an incremental learner, reported with the others (not an upper bound)
    upper_bound = False

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
        evaluator=default_evaluator,
        device: str | torch.device = "cpu",
        eval_every: int = -1,
        peval_mode: str = "epoch",
        feature_cache: Optional[FeatureCache] = None,
        progress: bool = True,
    ):
        config = coop_config(config)
        method = [type(p).__name__ for p in plugins or [] if isinstance(p, METHOD_PLUGINS)]
        if method:
            raise ConfigError(
                f"CoOp runs without replay, hinge and stage 2: remove {', '.join(method)} "
                "from plugins (or use CLIPHingeStrategy)"
            )
        if model is None:
            model = CoOp.build_model(config, class_names, device)
        elif getattr(model, "shared_ctx", None) is None:
            raise ConfigError(
                "CoOp needs a model with one shared context: build it with "
                "CoOp.build_model(config, class_names, device)"
            )
        super().__init__(
            config=config,
            class_names=class_names,
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            plugins=plugins,
            use_default_plugins=False,
            evaluator=evaluator,
            device=device,
            eval_every=eval_every,
            peval_mode=peval_mode,
            feature_cache=feature_cache,
            progress=progress,
        )

    @staticmethod
    def build_model(
        config: CLIPHingeConfig,
        class_names: ClassNames,
        device: str | torch.device = "cpu",
        backbone: Optional[CLIPBackbone] = None,
    ) -> CLIPHingeModel:
        """A ``CLIPHingeModel`` with a unified context for ``coop_config(config)``, around
        ``backbone`` (default: the one ``config`` names, loaded now)."""
        try:
            names = class_name_table(class_names)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return build_model(
            coop_config(config), names, torch.device(device), backbone, shared_context=True
        )

    def trainable_parameters(self) -> int:
        """Scalars CoOp learns: the shared context, ``n_ctx * width``."""
        return learned_parameters(self.model)

    def _set_trainable_prompts(self) -> bool:
        """Every experience trains the shared context, whichever classes it brings (new or
        returning); no prompt row is kept frozen."""
        self.frozen_rows = []
        self.model.set_trainable_prompts(list(range(self.model.n_tasks)))
        return True

    def make_optimizer(self, reset_optimizer_state=False, **kwargs):
        """The shared context becomes the optimizer's one parameter, its state reset at every
        experience (a fresh optimizer per task, as the method's prompts get). The object
        stays for the whole stream (a scheduler plugin keeps a reference to it)."""
        ctx = self.model.shared_ctx
        groups = self.optimizer.param_groups
        lr = groups[0]["lr"] if self.user_scheduler and groups else self.base_lr()
        groups.clear()
        self.optimizer.state.clear()
        self.optimizer.add_param_group({"params": [ctx] if ctx.requires_grad else [], "lr": lr})
