"""What a captured runner can run: the plugin callbacks and strategy methods inside a step.

``compiled_step.CompiledStep`` runs a step as one graph, so a plugin that works inside a step
(``INSIDE_STEP``) or a strategy subclass that overrides a method of the eager step
(``STEP_METHODS``) makes it run the eager loop instead; per-iteration callbacks run only for
the plugins that do something in them (``plugin_needs``).
"""

from __future__ import annotations

from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates.base_sgd import PeriodicEval

from .metrics import metric_needs

#: Avalanche's callbacks inside a step (around forward, backward and the update): a plugin
#: implementing one can see or change the step's loss, gradients or weights, which the
#: captured step does not expose.
INSIDE_STEP = tuple(
    name
    for name in dir(SupervisedPlugin)
    if name.startswith(("before_", "after_"))
    and name.split("_", 1)[1] in ("forward", "backward", "update")
)
#: The strategy's methods that make the eager step (Avalanche's loop and its hooks); the
#: captured step calls the ``step`` functions instead, so a subclass overriding one runs eagerly.
STEP_METHODS = (
    "training_epoch",
    "_before_forward",
    "forward",
    "criterion",
    "backward",
    "optimizer_step",
)


def overrides(obj, name: str) -> bool:
    """Whether ``obj``'s class implements callback ``name`` (not Avalanche's empty one)."""
    implementation = getattr(type(obj), name, None)
    return implementation is not None and implementation is not getattr(
        SupervisedPlugin, name, None
    )


def plugin_needs(plugin, name: str, sums_kept: bool) -> bool:
    """Whether ``plugin`` does any work in callback ``name`` of a training step.

    An ``EvaluationPlugin`` needs it when one of its metrics does (``metrics.metric_needs``)
    or one of its loggers implements it; ``PeriodicEval`` only when it evaluates every few
    iterations; any other plugin when its class implements the callback.
    """
    if isinstance(plugin, EvaluationPlugin):
        return plugin.active and (
            any(metric_needs(m, name, sums_kept) for m in plugin.metrics)
            or any(overrides(logger, name) for logger in plugin.loggers)
        )
    if isinstance(plugin, PeriodicEval):
        return (
            name == "after_training_iteration"
            and plugin.peval_mode == "iteration"
            and plugin.eval_every > 0
        )
    return overrides(plugin, name)
