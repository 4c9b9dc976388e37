"""The declared strategy/plugin contract: the method's plugins say what they need, and a
strategy without it is refused when training starts, naming what is missing."""

from __future__ import annotations

import pytest
import torch
from avalanche.training import Naive

from avalanche_cliphinge import (
    CLIPHingeStrategy,
    GaussianReplayPlugin,
    HardPairHingePlugin,
    SecondStagePlugin,
)
from avalanche_cliphinge.plugins.contract import MethodStrategy


def test_cliphinge_strategy_provides_what_every_plugin_declares(tiny_config, class_names):
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(config=tiny_config(), class_names=class_names, evaluator=None)
    assert isinstance(strategy, MethodStrategy)
    for plugin in (GaussianReplayPlugin, HardPairHingePlugin, SecondStagePlugin):
        assert all(hasattr(strategy, name) for name in plugin.STRATEGY_NEEDS), plugin


@pytest.mark.parametrize(
    "plugin", [GaussianReplayPlugin(), HardPairHingePlugin(), SecondStagePlugin()]
)
def test_a_method_plugin_on_another_strategy_is_refused_at_once(plugin, synthetic_stream):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 6))
    naive = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=torch.nn.CrossEntropyLoss(),
        plugins=[plugin],
        evaluator=None,
    )
    assert not isinstance(naive, MethodStrategy)
    with pytest.raises(TypeError) as info:
        naive.train(synthetic_stream.train_stream[0])
    message = str(info.value)
    assert message.startswith(f"{type(plugin).__name__} needs a strategy with ")
    missing = [n for n in plugin.STRATEGY_NEEDS if not hasattr(naive, n)]
    assert missing and all(name in message for name in missing)
    assert "Naive lacks them: use it with CLIPHingeStrategy" in message
