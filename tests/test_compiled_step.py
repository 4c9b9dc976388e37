"""The captured steps (``compile_step``) against the eager steps, and what a step costs.

The slow tests compile the whole stage-1 step and the stage-2 step with inductor on the CPU
(``fullgraph=True``, so a graph break fails them); they share one eager and one captured run
(the ``runs`` fixture), so the module compiles each graph once. The inductor cache makes later
runs faster than the first.
"""

import importlib.util
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from avalanche.evaluation.metrics import EpochAccuracy, accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates.base_sgd import PeriodicEval

from avalanche_cliphinge import CLIPHingeStrategy
from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.plugins.second_stage_compiled import CompiledStage2
from avalanche_cliphinge.runner_checks import plugin_needs
from avalanche_cliphinge.metrics import DeviceEpochLoss, metric_needs
from avalanche_cliphinge.plugins import SecondStagePlugin

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


@pytest.fixture(scope="module")
def step_config(tiny_config):
    """Replay, both hinges (every pair hard) and the image adapter in task 1; 60 training
    images per task in batches of 25 (the last one of 10, padded to the step's one shape),
    3 epochs, lr decay, 2 stage-2 epochs (task 1's head)."""
    return tiny_config(
        init_epochs=3,
        epochs=3,
        batch_size=25,
        lr_decay_epochs=[2],
        second_stage_epochs=2,
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


def speed_benchmark():
    """benchmarks/speed.py (a script, loaded from its file)."""
    spec = importlib.util.spec_from_file_location(
        "speed_benchmark", ROOT / "benchmarks" / "speed.py"
    )
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    return speed


def count_stage2(speed, strategy):
    """A ``Stage2Steps`` of benchmarks/speed.py counting task 1's stage-2 run."""
    plugin = next(p for p in strategy.plugins if isinstance(p, SecondStagePlugin))
    return speed.Stage2Steps(plugin, strategy.device, counted_task=1)


@pytest.fixture(scope="module")
def runs(step_config, synthetic_stream, class_names):
    """The eager and the captured run of ``step_config`` (2 tasks), shared by the slow tests
    (one compilation for all): the strategies, their metrics, the captured run's warnings,
    its stage-1 ``StepCounter``, both runs' stage-2 counts and the stage-2 graphs made."""
    speed = speed_benchmark()
    stage2 = {}
    eager, eager_metrics = train(
        step_config,
        synthetic_stream,
        class_names,
        on_start=lambda s: stage2.setdefault("eager", count_stage2(speed, s)),
    )
    counter = speed.StepCounter()
    graphs = []
    make = CompiledStage2.compile

    def start(strategy):
        counter.pause_inside(strategy)
        stage2["captured"] = count_stage2(speed, strategy)

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr(
            CompiledStage2,
            "compile",
            lambda runner, step: graphs.append(runner) or make(runner, step),
        )
        captured, captured_metrics = train(
            step_config.replace(compile_step=True),
            synthetic_stream,
            class_names,
            plugins=[counter],
            on_start=start,
        )
    return SimpleNamespace(
        eager=eager,
        eager_metrics=eager_metrics,
        captured=captured,
        captured_metrics=captured_metrics,
        warnings=[str(w.message) for w in caught],
        counter=counter,
        stage2={name: steps.counted for name, steps in stage2.items()},
        stage2_graphs=graphs,
    )


@pytest.mark.slow
def test_the_captured_step_learns_what_the_eager_step_learns_in_one_graph_per_run(runs):
    eager, captured = runs.eager, runs.captured
    assert not [w for w in runs.warnings if "compile_step" in w]
    # fullgraph=True: no graph break; one step shape for the run (both tasks), no guard failed
    assert captured._compiled_step.graphs_traced == 1
    assert captured._compiled_step.guard_failures == 0
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
    for name in EPOCH_METRICS:
        assert runs.captured_metrics[name] == (
            runs.eager_metrics[name][0],
            pytest.approx(runs.eager_metrics[name][1], rel=1e-4, abs=1e-6),
        ), name
    # the hinge ran in task 1 and reports its last step's terms as in the eager step
    hinges = [next(p for p in run.plugins if hasattr(p, "text_pairs")) for run in (eager, captured)]
    assert hinges[1].text_pairs and hinges[1].image_pairs
    for kind in ("text", "image"):
        assert float(hinges[1].last_losses[kind]) == pytest.approx(
            float(hinges[0].last_losses[kind]), abs=1e-5
        )
    # task 1's last epoch: every step's work is in the graph
    record = runs.counter.record()
    assert record["counted_steps"] == 6
    assert record["ops_per_step"] <= 10 and record["python_calls_per_step"] <= 150, record


@pytest.mark.slow
def test_the_captured_stage_two_trains_the_head_the_eager_stage_two_trains_in_one_graph(runs):
    eager, captured = runs.eager, runs.captured
    # task 1's head, 2 epochs of 3 steps (60 images in batches of 25, the last one padded)
    assert list(captured.model.heads) == list(eager.model.heads) == ["1"]
    # fullgraph=True: no graph break; one graph, traced once
    assert [runner.graphs_traced for runner in runs.stage2_graphs] == [1]
    for a, b in zip(eager.model.heads["1"].parameters(), captured.model.heads["1"].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=TOLERANCE)
    plugins = [
        next(p for p in run.plugins if isinstance(p, SecondStagePlugin))
        for run in (eager, captured)
    ]
    # the epoch losses within the stage-1 tolerance (the head starts from the prompted text)
    assert plugins[1].losses == pytest.approx(plugins[0].losses, rel=1e-4, abs=1e-4)
    assert len(plugins[1].losses) == 2 and plugins[1].steps == plugins[0].steps == 6
    # the whole run of task 1 per step, set-up and per-epoch checks included (on the captured
    # path also the graph's making, hundreds of calls once per task; the tracing is not
    # counted): a call into the graph holds the step's ops and calls
    eager_counts, captured_counts = runs.stage2["eager"], runs.stage2["captured"]
    assert eager_counts["counted_steps"] == captured_counts["counted_steps"] == 6
    assert captured_counts["ops_per_step"] < eager_counts["ops_per_step"] / 2, runs.stage2
    assert captured_counts["python_calls_per_step"] < eager_counts["python_calls_per_step"], (
        runs.stage2
    )


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
    config = tiny_config(init_epochs=1, epochs=1, second_stage_epochs=0)
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
    assert plugin.calls == 2 * 4  # 2 tasks, 1 epoch of 4 steps, all eager
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


def test_the_vector_instructions_come_from_atens_dispatch_on_x86_linux(monkeypatch):
    """``capture.known_vector_isa``: inductor told that the vector instructions ATen itself
    dispatches to work (no test builds); left to inductor where ATen runs no vector code or
    the user set ``cpp.vec_isa_ok``."""
    import platform
    import sys

    import torch._inductor.config as inductor

    from avalanche_cliphinge.capture import known_vector_isa

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for capability, expected in (
        ("AVX512", {"cpp.vec_isa_ok": True}),
        ("AVX2", {"cpp.vec_isa_ok": True}),
        ("DEFAULT", {}),
    ):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert known_vector_isa() == expected, capability
        with inductor.patch(known_vector_isa()):
            assert inductor.cpp.vec_isa_ok is (True if expected else None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with inductor.patch({"cpp.vec_isa_ok": False}):
        assert known_vector_isa() == {}
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert known_vector_isa() == {}
