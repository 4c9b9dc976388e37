"""The captured stage-1 step (``compile_step``) against the eager step, and what a step costs.

The slow tests compile the whole step with inductor on the CPU (``fullgraph=True``, so a
graph break fails them); the inductor cache makes later runs faster than the first.
"""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import EpochAccuracy, accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates.base_sgd import PeriodicEval

from avalanche_cliphinge import CLIPHingeStrategy
from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.compiled_step import plugin_needs
from avalanche_cliphinge.metrics import DeviceEpochLoss, metric_needs

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "train_phase/train_stream/Task000"
#: the epoch metrics both steps report
EPOCH_METRICS = [
    f"{name}/{TRAIN}"
    for name in (
        "Top1_Acc_Epoch",
        "Loss_Epoch",
        "Loss_Epoch_cross_entropy",
        "Loss_Epoch_text_hinge",
        "Loss_Epoch_image_hinge",
        "LR_Epoch",
    )
]
#: learned tensors: 1% of the learning rate (0.01)
TOLERANCE = 1e-4
#: make_evaluator() without loggers: Avalanche warns that nothing is logged
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


@pytest.fixture
def step_config(tiny_config):
    """Replay, both hinges (every pair hard) and the image adapter in task 1; 60 training
    images per task in batches of 25 (the last one of 10, padded to the step's one shape),
    3 epochs, lr decay, stage 2."""
    return tiny_config(
        init_epochs=3,
        epochs=3,
        batch_size=25,
        lr_decay_epochs=[2],
        second_stage_epochs=1,
        text_hard_pair_threshold=-1.0,
        use_image_hinge_loss=True,
        image_hard_pair_threshold=-1.0,
        use_image_adapter=True,
    )


def train(config, synthetic_stream, class_names, plugins=(), n_experiences=2, on_start=None):
    """Train the first experiences; returns the strategy and its evaluator's metrics.
    ``on_start(strategy)`` runs before the first experience."""
    torch.manual_seed(0)
    evaluator = make_evaluator().plugin
    strategy = CLIPHingeStrategy(
        config=config,
        class_names=class_names,
        plugins=list(plugins),
        evaluator=evaluator,
        progress=False,
    )
    if on_start is not None:
        on_start(strategy)
    for experience in synthetic_stream.train_stream[:n_experiences]:
        strategy.train(experience)
    return strategy, evaluator.get_all_metrics()


def step_counter():
    """A ``StepCounter`` of benchmarks/speed.py (a script, loaded from its file)."""
    spec = importlib.util.spec_from_file_location(
        "speed_benchmark", ROOT / "benchmarks" / "speed.py"
    )
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    return speed.StepCounter()


@pytest.mark.slow
def test_the_captured_step_learns_what_the_eager_step_learns_in_one_graph_per_task(
    step_config, synthetic_stream, class_names
):
    eager, eager_metrics = train(step_config, synthetic_stream, class_names)
    counter = step_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured, captured_metrics = train(
            step_config.replace(compile_step=True),
            synthetic_stream,
            class_names,
            plugins=[counter],
            on_start=counter.pause_inside,
        )
    assert not [w for w in caught if "compile_step" in str(w.message)]
    # fullgraph=True: no graph break; one step shape per task
    assert captured._compiled_step.graphs_traced == 2
    # float tolerance: the graph sums in another order; Adam divides each gradient by its
    # running RMS, so rounding on a gradient near zero moves its weight by a fraction of lr
    for a, b in zip(eager.model.prompts, captured.model.prompts):
        torch.testing.assert_close(b.ctx, a.ctx, rtol=1e-4, atol=TOLERANCE)
    torch.testing.assert_close(
        captured.model.adapter.linear.weight,
        eager.model.adapter.linear.weight,
        rtol=1e-4,
        atol=TOLERANCE,
    )
    assert list(captured.model.heads) == list(eager.model.heads) == ["1"]
    for a, b in zip(eager.model.heads["1"].parameters(), captured.model.heads["1"].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=TOLERANCE)
    for name in EPOCH_METRICS:
        assert captured_metrics[name] == (
            eager_metrics[name][0],
            pytest.approx(eager_metrics[name][1], rel=1e-4, abs=1e-6),
        ), name
    # the hinge ran in task 1 and reports its last step's terms as in the eager step
    hinges = [next(p for p in run.plugins if hasattr(p, "text_pairs")) for run in (eager, captured)]
    assert hinges[1].text_pairs and hinges[1].image_pairs
    for kind in ("text", "image"):
        assert float(hinges[1].last_losses[kind]) == pytest.approx(
            float(hinges[0].last_losses[kind]), abs=1e-5
        )
    # task 1's last epoch: every step's work is in the graph
    record = counter.record()
    assert record["counted_steps"] == 6
    assert record["ops_per_step"] <= 10 and record["python_calls_per_step"] <= 150, record


class PoisonsAFeature(SupervisedPlugin):
    """Makes one cached training feature NaN, after the class statistics were fitted."""

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        feats, labels = strategy.current_features
        feats = feats.clone()
        feats[7] = float("nan")
        strategy.current_features = (feats, labels)


@pytest.mark.slow
def test_a_non_finite_captured_step_stops_at_the_epoch_end_naming_its_first_step(
    step_config, synthetic_stream, class_names
):
    messages = []
    for compile_step in (False, True):
        with pytest.raises(FloatingPointError) as raised:
            train(
                step_config.replace(compile_step=compile_step),
                synthetic_stream,
                class_names,
                plugins=[PoisonsAFeature()],
                n_experiences=1,
            )
        messages.append(str(raised.value))
    assert messages[0].startswith("non-finite loss at task 0, epoch 0, iteration ")
    assert "(cross_entropy=nan)" in messages[0]
    assert messages[1] == messages[0]


class EditsTheLoss(SupervisedPlugin):
    """A user plugin that adds to the loss in a callback; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def before_backward(self, strategy, **kwargs):
        self.calls += 1
        strategy.loss = strategy.loss + 0.1 * strategy.model.prompts[0].ctx.square().sum()


def test_a_plugin_editing_the_loss_gets_the_eager_step_and_one_warning(
    tiny_config, synthetic_stream, class_names
):
    config = tiny_config(init_epochs=2, epochs=2, second_stage_epochs=0)
    eager, _ = train(config, synthetic_stream, class_names, plugins=[EditsTheLoss()])
    plugin = EditsTheLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallen, _ = train(
            config.replace(compile_step=True), synthetic_stream, class_names, plugins=[plugin]
        )
    said = [str(w.message) for w in caught if "compile_step" in str(w.message)]
    assert said == [
        "compile_step: plugin EditsTheLoss implements before_backward, which the "
        "captured step cannot run; this task trains with the eager step "
        "(Avalanche's loop and callbacks)"
    ]
    assert plugin.calls == 2 * 2 * 4  # 2 tasks, 2 epochs of 4 steps, all eager
    for a, b in zip(eager.model.prompts, fallen.model.prompts):
        assert torch.equal(a.ctx, b.ctx)
    assert fallen._compiled_step.graphs_traced == 0


def test_per_step_callbacks_go_only_to_what_needs_them():
    evaluator = make_evaluator().plugin
    # the package's metrics: per-step work only without the captured step's epoch sums
    assert plugin_needs(evaluator, "after_training_iteration", False)
    assert not plugin_needs(evaluator, "after_training_iteration", True)
    assert not plugin_needs(evaluator, "before_training_iteration", False)
    assert not plugin_needs(evaluator, "before_backward", False)
    assert plugin_needs(evaluator, "after_eval_iteration", True)
    assert metric_needs(EpochAccuracy(), "after_training_iteration", True)
    assert not metric_needs(DeviceEpochLoss(), "after_training_iteration", True)
    assert not any(
        metric_needs(m, "after_training_iteration", False)
        for m in accuracy_metrics(experience=True, stream=True)
    )
    assert plugin_needs(EvaluationPlugin(EpochAccuracy()), "after_training_iteration", True)
    assert not plugin_needs(PeriodicEval(eval_every=1), "after_training_iteration", True)
    assert plugin_needs(
        PeriodicEval(eval_every=1, peval_mode="iteration"), "after_training_iteration", True
    )
    assert plugin_needs(EditsTheLoss(), "before_backward", True)
    assert not plugin_needs(EditsTheLoss(), "after_backward", True)


def test_the_lean_evaluator_logs_what_avalanches_logs_with_one_logging_view_per_experience(
    tiny_config, synthetic_stream, class_names, monkeypatch
):
    from avalanche_cliphinge.app.evaluation import make_metrics

    config = tiny_config(init_epochs=2, epochs=2, second_stage_epochs=1)
    logged, views = {}, []
    experience_type = type(synthetic_stream.train_stream[0])
    logging = experience_type.logging
    monkeypatch.setattr(
        experience_type, "logging", lambda self: views.append(self) or logging(self)
    )
    for name, evaluator in (
        ("avalanche", EvaluationPlugin(*make_metrics(), loggers=[])),
        ("lean", make_evaluator().plugin),
    ):
        views.clear()
        torch.manual_seed(0)
        strategy = CLIPHingeStrategy(
            config=config, class_names=class_names, evaluator=evaluator, progress=False
        )
        for experience in synthetic_stream.train_stream[:2]:
            strategy.train(experience)
            strategy.eval(synthetic_stream.test_stream)
        logged[name] = {
            k: v for k, v in evaluator.get_all_metrics().items() if not k.startswith("Time_")
        }
        logged[name + " views"] = len(views)
    assert logged["lean"] == logged["avalanche"]
    # Avalanche: one copy per callback; here one per experience seen (2 train, 3 test, twice)
    assert logged["lean views"] == 2 + 2 * 3
    assert logged["avalanche views"] > 20 * logged["lean views"]
