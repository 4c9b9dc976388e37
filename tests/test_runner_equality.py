"""The eager runners against the captured ones on one short epoch plan, in seconds.

The slow tests of test_compiled_step.py compile the captured steps with inductor (minutes
cold). Here the same captured steps (``compile_step``: ``step.stage1_train_step`` run by
``CompiledStep``, ``step.stage2_train_step`` run by ``CompiledStage2``, made by
``capture.compile_step``) go through ``torch.compile`` with the
``aot_eager`` backend: Dynamo traces each step whole (``fullgraph=True``, ``Tensor.backward``
and the optimizer update included) and AOT autograd makes its forward and backward graphs,
which then run op by op, without inductor's code generation. The captured steps' maths is
all there; what inductor adds (fused kernels, their order of summation) is left to the slow
tests.

The plan: 3 experiences of 60 images, 1 stage-1 epoch each in minibatches of 25 (3 steps,
the last one padded), Gaussian replay and both hinges (every pair hard) in tasks 1 and 2, the
image adapter, 1 stage-2 epoch (the heads of tasks 1 and 2, 3 steps each, the last one
padded). The captured run makes one stage-1 graph and one stage-2 graph for all its tasks.
"""

import warnings
from types import SimpleNamespace
from typing import Callable, List, Tuple

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from avalanche_cliphinge import CLIPHingeStrategy
from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.plugins import SecondStagePlugin
from avalanche_cliphinge.step import Stage1Task, Stage2Task

#: learned tensors and reported losses. Both runners do the same float32 maths but for the
#: order of some sums (a padded last minibatch, the run's padded score columns, Adam's
#: capturable form in the graph): the largest differences seen are 2.4e-6 (prompts), 3.3e-6
#: (head), 5.5e-6 (epoch loss 1.5) and 1.1e-5 (the image adapter, trained in all 3 tasks);
#: 0.1% more Adam learning rate in the graph moves the prompts by 9e-5
TOLERANCE = {"rtol": 1e-5, "atol": 3e-5}
#: stage-1 steps per task and stage-2 steps per head: 60 images in minibatches of 25
STEPS = 3
#: make_evaluator() without loggers: Avalanche warns that nothing is logged
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


@pytest.fixture(scope="module")
def plan(tiny_config):
    """Replay, both hinges with every pair hard, the image adapter; 1 epoch per stage."""
    return tiny_config(
        init_epochs=1,
        epochs=1,
        batch_size=25,
        second_stage_epochs=1,
        text_hard_pair_threshold=-1.0,
        use_image_hinge_loss=True,
        image_hard_pair_threshold=-1.0,
        use_image_adapter=True,
    )


def train_run(config, synthetic_stream, class_names):
    """Train the 3 experiences from the same initial weights; returns the strategy and its
    evaluator's metrics (the timings left out)."""
    torch.manual_seed(0)
    evaluator = make_evaluator().plugin
    strategy = CLIPHingeStrategy(
        config=config, class_names=class_names, evaluator=evaluator, progress=False
    )
    for experience in synthetic_stream.train_stream:
        strategy.train(experience)
    metrics = evaluator.get_all_metrics()
    return strategy, {k: v for k, v in metrics.items() if not k.startswith("Time_")}


def assert_same_metrics(eager: dict, captured: dict) -> None:
    """Both runs reported the same metrics at the same steps, their values within
    ``TOLERANCE``."""
    assert sorted(captured) == sorted(eager)
    for name, (steps, values) in eager.items():
        assert captured[name][0] == steps, name
        assert captured[name][1] == pytest.approx(
            values, rel=TOLERANCE["rtol"], abs=TOLERANCE["atol"]
        ), name


class CheapCompile:
    """Stands in for ``torch.compile`` while the captured run trains: the same call with
    the ``aot_eager`` backend.

    Keeps, per function it compiles (in order), the task state the step is bound to and the
    keyword arguments (``made``) and how often the compiled function was called (``calls``);
    and for each graph Dynamo hands the backend, which function's which call traced it
    (``graphs``: ``(function, call)``, both counted from 0 and 1).
    """

    def __init__(self, compile: Callable):
        self.compile = compile
        self.made: List[Tuple[object, dict]] = []
        self.calls: List[int] = []
        self.graphs: List[Tuple[int, int]] = []
        self._aot_eager = lookup_backend("aot_eager")
        self._calling: Tuple[int, int] = (-1, 0)

    def backend(self, graph, example_inputs):
        self.graphs.append(self._calling)
        return self._aot_eager(graph, example_inputs)

    def __call__(self, step, **kwargs):
        index = len(self.made)
        self.made.append((step.__self__, kwargs))
        self.calls.append(0)
        compiled = self.compile(step, **{**kwargs, "backend": self.backend})

        def call():
            self.calls[index] += 1
            self._calling = (index, self.calls[index])
            try:
                return compiled()
            finally:
                self._calling = (-1, 0)

        return call


@pytest.fixture(scope="module")
def runs(plan, synthetic_stream, class_names):
    """The eager run and the captured run of ``plan``, the captured run's compiles and
    warnings. ``torch.compile`` is replaced for the captured run only (on the CPU nothing
    else calls it: the model compiles its prompt encoder on CUDA only)."""
    eager, eager_metrics = train_run(plan, synthetic_stream, class_names)
    cheap = CheapCompile(torch.compile)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(torch, "compile", cheap)
        captured, captured_metrics = train_run(
            plan.replace(compile_step=True), synthetic_stream, class_names
        )
    return SimpleNamespace(
        eager=eager,
        eager_metrics=eager_metrics,
        captured=captured,
        captured_metrics=captured_metrics,
        compiles=cheap,
        warnings=[str(w.message) for w in caught],
    )


def test_the_captured_runners_learn_and_report_what_the_eager_runners_do(runs):
    eager, captured, compiles = runs.eager, runs.captured, runs.compiles
    # every task ran captured: no fallback; one stage-1 graph for the 3 tasks (one shape for
    # the run: task 0, without old classes, included) and one stage-2 graph for the heads of
    # tasks 1 and 2, each made whole (fullgraph) at its first call and called at every step
    assert eager._compiled_step is None
    assert not [w for w in runs.warnings if "compile_step" in w]
    tasks = [task for task, _ in compiles.made]
    assert [type(t) for t in tasks] == [Stage1Task, Stage2Task]
    for _, kwargs in compiles.made:
        assert kwargs["fullgraph"] and "backend" not in kwargs, kwargs
    runner = captured._compiled_step
    assert runner.graphs_traced == 1 and runner.guard_failures == 0
    assert compiles.calls == [3 * STEPS, 2 * STEPS]
    # one graph per function, made at its first call: no guard failed (task 1 included), and
    # Dynamo traced each step once (it traced stage 1 twice, a restart of its analysis, while
    # the epoch sums were 0-d float64 CPU tensors)
    assert compiles.graphs == [(0, 1), (1, 1)], compiles.graphs

    # stage 1: every prompt's context, the image adapter
    assert len(captured.model.prompts) == len(eager.model.prompts) == 3
    for a, b in zip(eager.model.prompts, captured.model.prompts):
        torch.testing.assert_close(b.ctx, a.ctx, **TOLERANCE)
    for a, b in zip(eager.model.adapter.parameters(), captured.model.adapter.parameters()):
        torch.testing.assert_close(b, a, **TOLERANCE)
    # stage 2: the heads of tasks 1 and 2, each trained from its own initial weights
    assert list(captured.model.heads) == list(eager.model.heads) == ["1", "2"]
    for key in ("1", "2"):
        for a, b in zip(
            eager.model.heads[key].parameters(), captured.model.heads[key].parameters()
        ):
            torch.testing.assert_close(b, a, **TOLERANCE)

    # every metric both tasks reported (stage-1 epoch loss, its terms, accuracy, lr; stage
    # 2's epoch loss) at the same steps
    assert "Loss_Epoch_image_hinge/train_phase/train_stream/Task000" in runs.eager_metrics
    assert "Loss_Stage2_Epoch/train_phase/train_stream/Task000" in runs.eager_metrics
    assert_same_metrics(runs.eager_metrics, runs.captured_metrics)
    stage2 = [
        next(p for p in run.plugins if isinstance(p, SecondStagePlugin))
        for run in (eager, captured)
    ]
    assert len(stage2[1].losses) == 1 and stage2[1].steps == stage2[0].steps == 2 * STEPS
    assert stage2[1].losses == pytest.approx(
        stage2[0].losses, rel=TOLERANCE["rtol"], abs=TOLERANCE["atol"]
    )
    # the hinge's terms of the last step (task 1 had pairs on both sides)
    hinges = [next(p for p in run.plugins if hasattr(p, "text_pairs")) for run in (eager, captured)]
    assert hinges[1].text_pairs and hinges[1].image_pairs
    for kind in ("text", "image"):
        assert float(hinges[1].last_losses[kind]) == pytest.approx(
            float(hinges[0].last_losses[kind]), rel=TOLERANCE["rtol"], abs=TOLERANCE["atol"]
        ), kind


def test_tasks_of_unequal_sizes_share_one_graph_and_learn_what_the_eager_runner_learns(
    plan, synthetic_data, class_names
):
    """ImageNet-R's tasks differ in size: a task with fewer samples (fewer steps, more replayed
    rows per step) reuses the graph made for the first task, whose buffers have room for it."""
    from avalanche.benchmarks import nc_benchmark
    from conftest import LabelledTensorDataset

    # tasks of 60, 50 and 44 training images (classes 2-5 lose some), minibatches of 25
    y = synthetic_data["train_y"]
    keep = torch.ones_like(y, dtype=torch.bool)
    for cls, drop in ((2, 5), (3, 5), (4, 8), (5, 8)):
        keep[torch.nonzero(y == cls).flatten()[:drop]] = False
    train = LabelledTensorDataset(synthetic_data["train_x"][keep], y[keep])
    test = LabelledTensorDataset(synthetic_data["test_x"], synthetic_data["test_y"])
    stream = nc_benchmark(
        train, test, n_experiences=3, task_labels=False, seed=0, fixed_class_order=list(range(6))
    )
    assert [len(e.dataset) for e in stream.train_stream] == [60, 50, 44]
    eager, eager_metrics = train_run(plan, stream, class_names)
    cheap = CheapCompile(torch.compile)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", cheap)
        captured, captured_metrics = train_run(plan.replace(compile_step=True), stream, class_names)
    # one stage-1 graph for the 3 sizes (3 + 2 + 2 steps), one stage-2 graph for the heads
    # of tasks 1 and 2 (50 and 44 images: 2 + 2 steps)
    assert [type(task) for task, _ in cheap.made] == [Stage1Task, Stage2Task]
    assert captured._compiled_step.graphs_traced == 1
    assert cheap.calls == [3 + 2 + 2, 2 + 2]
    for key in ("1", "2"):
        for a, b in zip(
            eager.model.heads[key].parameters(), captured.model.heads[key].parameters()
        ):
            torch.testing.assert_close(b, a, **TOLERANCE)
    for a, b in zip(eager.model.prompts, captured.model.prompts):
        torch.testing.assert_close(b.ctx, a.ctx, **TOLERANCE)
    for a, b in zip(eager.model.adapter.parameters(), captured.model.adapter.parameters()):
        torch.testing.assert_close(b, a, **TOLERANCE)
    assert_same_metrics(eager_metrics, captured_metrics)


def test_a_task_with_half_the_classes_reuses_the_graph_its_prompts_padded(
    plan, synthetic_stream, class_names
):
    """B4 Inc2 (the smoke preset's layout): task 1's 2 prompts and 60 images fit the shape
    made for task 0's 4 prompts and 120 images: its prompt buffers' last 2 rows are zero
    padding whose text goes to a column no class has, so they learn nothing and change no
    score; the minibatch keeps the config's size (task 1's last one padded)."""
    from avalanche.benchmarks import nc_benchmark

    stream = nc_benchmark(
        synthetic_stream.original_train_dataset,
        synthetic_stream.original_test_dataset,
        n_experiences=2,
        task_labels=False,
        seed=0,
        fixed_class_order=list(range(6)),
        per_exp_classes={0: 4},
    )
    assert [len(e.dataset) for e in stream.train_stream] == [120, 60]
    config = plan.replace(init_class=4, increment=2, total_tasks=2)
    eager, eager_metrics = train_run(config, stream, class_names)
    cheap = CheapCompile(torch.compile)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", cheap)
        captured, captured_metrics = train_run(
            config.replace(compile_step=True), stream, class_names
        )
    assert [type(task) for task, _ in cheap.made] == [Stage1Task, Stage2Task]
    assert captured._compiled_step.graphs_traced == 1
    assert cheap.calls[0] == 5 + 3
    task = cheap.made[0][0]
    assert task.ctx.shape[0] == 4 and task.bank.shape[0] == 6 + 1
    # after task 1: its 2 classes' columns (4, 5) and the padding column (6)
    assert task.train_rows.tolist() == [4, 5, 6, 6]
    assert not task.column_mask[6] and torch.count_nonzero(task.ctx[2:]) == 0
    for a, b in zip(eager.model.prompts, captured.model.prompts):
        assert a.ctx.shape == b.ctx.shape
        torch.testing.assert_close(b.ctx, a.ctx, **TOLERANCE)
    kept = captured.optimizer.state[captured.model.prompts[1].ctx]
    assert kept["exp_avg"].shape == captured.model.prompts[1].ctx.shape
    for a, b in zip(eager.model.heads["1"].parameters(), captured.model.heads["1"].parameters()):
        torch.testing.assert_close(b, a, **TOLERANCE)
    assert_same_metrics(eager_metrics, captured_metrics)


def test_a_guard_failure_is_counted_warned_and_reported(plan, synthetic_stream, class_names):
    """Something the captured graph reads changes between tasks (here Adam's ``maximize``,
    which the graph holds as a constant): torch traces the graph again at task 1's first
    step, and the run counts it, warns it and reports it (``compile_report``)."""
    cheap = CheapCompile(torch.compile)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(torch, "compile", cheap)
        torch.manual_seed(0)
        strategy = CLIPHingeStrategy(
            config=plan.replace(compile_step=True),
            class_names=class_names,
            evaluator=make_evaluator().plugin,
            progress=False,
        )
        assert set(strategy.compile_report().values()) == {0}
        strategy.train(synthetic_stream.train_stream[0])
        cheap.made[0][0].hyper["maximize"] = True
        strategy.train(synthetic_stream.train_stream[1])
    # task 1's first step traced stage 1 again; stage 2 (task 1's head) traced once
    assert strategy.compile_report() == {
        "stage1_graphs": 2,
        "stage2_graphs": 1,
        "stage2_guard_failures": 0,
        "guard_failures": 1,
    }
    warned = [str(w.message) for w in caught if "guard of the captured" in str(w.message)]
    assert len(warned) == 1 and "stage-1 graph failed" in warned[0] and "(1 so far" in warned[0]
    strategy.release_graphs()  # what the run freed is still reported
    assert strategy.compile_report()["stage2_graphs"] == 1
    assert strategy.compile_report()["guard_failures"] == 1
