"""A cached-feature training step never makes the host wait for the device.

On a GPU, every tensor value read into Python (``.item()``, ``float(t)``, ``bool(t)``,
``int(t)``, ``.tolist()``) and every tensor built from host data inside a step (a blocking
host-to-device copy) stalls the host until the queued kernels finish, so it cannot queue the
next step while the device runs this one. These tests run on the CPU and count those
operations where they enter PyTorch: ``aten._local_scalar_dense`` (any read of a value into
Python), ``aten.lift_fresh`` (a tensor made from Python data), and ``Tensor.tolist`` /
``Tensor.numpy``, which bypass the dispatcher.

The optimizer step is left out: on CUDA the strategy uses fused Adam, which keeps its step
count on the device, while CPU Adam reads it back by design.
"""

from typing import List

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.utils._python_dispatch import TorchDispatchMode

from avalanche_cliphinge import CLIPHingeStrategy
from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.plugins import SecondStagePlugin

HOST_OPS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default"}


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads and host-made tensors while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: List[str] = []
        self._patched = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_OPS:
            self.events.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.events.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


class StepProbe(SupervisedPlugin):
    """First in the plugin list: one counting window per training step of ``tasks``.

    A window opens at ``before_training_iteration`` and closes at the next step's
    ``before_training_iteration`` (or at the epoch's end), so it holds every plugin and
    metric callback of the step and the loader's next minibatch. The optimizer step
    (``before_update`` .. ``after_update``) is paused.
    """

    def __init__(self, tasks):
        super().__init__()
        self.tasks = set(tasks)
        self.windows: List[List[str]] = []
        self._counter = None

    def _close(self):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.windows.append(self._counter.events)
            self._counter = None

    def before_training_iteration(self, strategy, **kwargs):
        self._close()
        if strategy.current_task in self.tasks:
            self._counter = HostSyncCounter()
            self._counter.__enter__()

    def before_update(self, strategy, **kwargs):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)

    def after_update(self, strategy, **kwargs):
        if self._counter is not None:
            self._counter.__enter__()

    def after_training_epoch(self, strategy, **kwargs):
        self._close()


class ReadsTheLoss(SupervisedPlugin):
    """What a step must not do: read the loss back every iteration."""

    def before_backward(self, strategy, **kwargs):
        float(strategy.loss.detach())


def run_with_probe(config, synthetic_stream, class_names, tmp_path, extra=()):
    probe = StepProbe(tasks=[1])
    evaluator = make_evaluator(
        tensorboard_dir=tmp_path / "tb", text_log=tmp_path / "log.txt", csv_dir=tmp_path / "csv"
    ).plugin
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=config,
        class_names=class_names,
        plugins=[probe, *extra],
        evaluator=evaluator,
        progress=False,
    )
    for experience in synthetic_stream.train_stream[:2]:
        strategy.train(experience)
    return probe.windows, strategy


@pytest.fixture
def hinge_config(tiny_config):
    """Replay, both hinges (every pair hard) and the image adapter all active in task 1."""
    return tiny_config(
        init_epochs=2,
        epochs=2,
        second_stage_epochs=2,
        text_hard_pair_threshold=-1.0,
        use_image_hinge_loss=True,
        image_hard_pair_threshold=-1.0,
        use_image_adapter=True,
    )


def test_a_cached_training_step_reads_nothing_back_and_copies_nothing_from_the_host(
    hinge_config, synthetic_stream, class_names, tmp_path
):
    windows, strategy = run_with_probe(hinge_config, synthetic_stream, class_names, tmp_path)
    # task 1: 60 training images in batches of 16, 2 epochs
    assert len(windows) == 2 * 4
    hinge = next(p for p in strategy.plugins if hasattr(p, "text_pairs"))
    assert hinge.text_pairs and hinge.image_pairs  # the hinge ran in every step
    assert all(events == [] for events in windows), windows


def test_the_probe_sees_a_step_that_reads_the_loss(
    hinge_config, synthetic_stream, class_names, tmp_path
):
    windows, _ = run_with_probe(
        hinge_config, synthetic_stream, class_names, tmp_path, extra=[ReadsTheLoss()]
    )
    assert len(windows) == 8
    assert all(events == ["aten._local_scalar_dense.default"] for events in windows), windows


def test_stage_two_reads_its_loss_back_once_per_epoch_not_per_step(
    tiny_config, synthetic_stream, class_names, tmp_path
):
    config = tiny_config(init_epochs=1, epochs=1, second_stage_epochs=3)
    counts = []

    class Counted(SecondStagePlugin):
        def after_training_exp(self, strategy, **kwargs):
            with HostSyncCounter() as counter:
                super().after_training_exp(strategy, **kwargs)
            counts.append(counter.events)

    _, strategy = run_with_probe(
        config, synthetic_stream, class_names, tmp_path, extra=[Counted.from_config(config)]
    )
    plugin = next(p for p in strategy.plugins if isinstance(p, SecondStagePlugin))
    assert len(plugin.losses) == 3
    # 3 epochs of 4 steps: one read per epoch, plus the task's class ids made once
    assert sorted(counts[-1]) == sorted(
        ["aten._local_scalar_dense.default"] * 3 + ["aten.lift_fresh.default"]
    )


def test_device_epoch_metrics_log_what_avalanches_epoch_metrics_log(tiny_config, run_stream):
    from avalanche.evaluation.metrics import EpochAccuracy, EpochLoss
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_cliphinge.metrics import DeviceEpochAccuracy, DeviceEpochLoss

    config = tiny_config(init_epochs=3, epochs=3, second_stage_epochs=0)
    logged = {}
    for name, metrics in (
        ("avalanche", [EpochAccuracy(), EpochLoss()]),
        ("device", [DeviceEpochAccuracy(), DeviceEpochLoss()]),
    ):
        evaluator = EvaluationPlugin(*metrics, loggers=[])
        run_stream(config, plugins=[evaluator], n_experiences=2)
        logged[name] = {k: v for k, v in evaluator.get_all_metrics().items()}
    assert sorted(logged["device"]) == [
        "Loss_Epoch/train_phase/train_stream/Task000",
        "Top1_Acc_Epoch/train_phase/train_stream/Task000",
    ]
    accuracy = logged["device"]["Top1_Acc_Epoch/train_phase/train_stream/Task000"][1]
    assert len(accuracy) == 6 and len(set(accuracy)) > 1 and min(accuracy) < 1.0
    assert logged["device"] == logged["avalanche"]


def test_a_non_finite_loss_stops_at_the_epoch_end_naming_its_first_step(tiny_config, run_stream):
    class Poison(SupervisedPlugin):
        """Makes the loss of epoch 1, iteration 2 NaN; counts the steps that ran."""

        def __init__(self):
            super().__init__()
            self.steps = 0

        def before_backward(self, strategy, **kwargs):
            self.steps += 1
            clock = strategy.clock
            if clock.train_exp_epochs == 1 and clock.train_epoch_iterations == 2:
                strategy.loss_terms["poison"] = torch.tensor(float("inf"))
                strategy.loss = strategy.loss * float("nan")

    poison = Poison()
    with pytest.raises(FloatingPointError) as raised:
        run_stream(tiny_config(init_epochs=3), plugins=[poison], n_experiences=1)
    message = str(raised.value)
    # the terms are those of the first bad step: later steps' cross-entropy is NaN too
    assert message.startswith("non-finite loss at task 0, epoch 1, iteration 2 (cross_entropy=")
    assert "cross_entropy=nan" not in message and "poison=inf" in message
    assert poison.steps == 2 * 4  # epoch 1 ran to its end, epoch 2 never started
