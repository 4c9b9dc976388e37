"""What the method's plugins read and write on their strategy, declared and checked.

Avalanche's plugins touch only the attributes its templates declare
(``strategy_mixin_protocol.py``). The method's plugins also need the per-step state and the
classes of the experience, which ``CLIPHingeStrategy`` provides; ``MethodStrategy`` lists
them, and each plugin checks at the start of training (``before_training``) that its strategy
has what it uses, so a plugin given to another strategy fails at once, naming what is missing.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    ContextManager,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

from torch import Tensor

if TYPE_CHECKING:
    import torch

    from ..config import CLIPHingeConfig
    from ..model.cliphinge_model import CLIPHingeModel
    from ..step_state import ExperienceClasses, StepState


@runtime_checkable
class MethodStrategy(Protocol):
    """The strategy side of the method's plugins (``CLIPHingeStrategy`` implements it).

    Read: ``model`` (the ``CLIPHingeModel``), ``device``, ``config``, ``current_task``,
    ``experience_classes`` (present, new, returning and old classes of the experience),
    ``current_features`` (``(features [n, dim], labels [n])`` of the experience's training
    data, or ``None``), ``adapted_dataset``, ``dataloader``, ``clock``, ``autocast()``.
    Read and written: ``step`` (the ``StepState`` of the iteration: replayed features and
    labels, text features, loss terms) and Avalanche's ``loss``.
    """

    model: "CLIPHingeModel"
    device: "torch.device"
    config: "CLIPHingeConfig"
    current_task: int
    experience_classes: "ExperienceClasses"
    current_features: Optional[Tuple[Tensor, Tensor]]
    step: "StepState"
    loss: Any

    def autocast(self) -> ContextManager: ...


def check_strategy(plugin: object, strategy: object, attributes: Sequence[str]) -> None:
    """Raise ``TypeError`` unless ``strategy`` has every one of ``attributes``.

    The message names the plugin, the strategy's class and what it lacks.
    """
    missing = [name for name in attributes if not hasattr(strategy, name)]
    if missing:
        raise TypeError(
            f"{type(plugin).__name__} needs a strategy with {', '.join(missing)} "
            f"(avalanche_cliphinge.plugins.contract.MethodStrategy); "
            f"{type(strategy).__name__} lacks them: use it with CLIPHingeStrategy"
        )
