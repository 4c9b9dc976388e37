"""Drop-in contracts: what an Avalanche script sees of ``Naive`` it sees of ``CLIPHingeStrategy``.

Each contract runs both strategies on the same small stream and compares what a user can
observe (callback order, metric names, learning rates, hooks, task labels...). Where the
method differs by design (its own preprocessing, unseen classes scored ``UNSEEN_SCORE``),
the expected values are worked out here from torchvision/open_clip directly.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.evaluation.metrics import (
    MAC_metrics,
    accuracy_matrix_metrics,
    accuracy_metrics,
    amca_metrics,
    bwt_metrics,
    class_accuracy_metrics,
    confusion_matrix_metrics,
    cpu_usage_metrics,
    disk_usage_metrics,
    forgetting_metrics,
    forward_transfer_metrics,
    images_samples_metrics,
    labels_repartition_metrics,
    loss_metrics,
    mean_scores_metrics,
    ram_usage_metrics,
    timing_metrics,
    topk_acc_metrics,
)
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    EvaluationPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    ReplayPlugin,
    SupervisedPlugin,
)
from avalanche.training.supervised import Naive
from PIL import Image
from torchvision import transforms

from avalanche_cliphinge import CLIPHingeStrategy, ConfigError, build_model
from avalanche_cliphinge.model.cliphinge_model import UNSEEN_SCORE
from avalanche_cliphinge.streams import (
    ClipInput,
    StreamInputError,
    class_names_for,
    stream_transforms,
)

FAST = dict(
    init_epochs=2,
    epochs=2,
    second_stage_epochs=1,
    samples_per_old_class=4,
    text_hard_pair_threshold=-1.0,
    text_top_hard_pairs=2,
    hinge_samples_per_pair=4,
)


class Labelled(torch.utils.data.TensorDataset):
    """``(image, label)`` items with the ``targets`` list Avalanche reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.targets = labels.tolist()


def quiet_evaluator(*metrics, loggers=()):
    return EvaluationPlugin(
        *(metrics or (accuracy_metrics(experience=True, stream=True),)), loggers=list(loggers)
    )


@pytest.fixture
def clip_strategy(tiny_config, class_names):
    """Factory: a fast ``CLIPHingeStrategy`` with the given keyword arguments."""

    def make(config=None, names=None, **kwargs):
        torch.manual_seed(0)
        kwargs.setdefault("evaluator", quiet_evaluator())
        return CLIPHingeStrategy(
            config=config or tiny_config(**FAST),
            class_names=names or class_names,
            progress=False,
            **kwargs,
        )

    return make


@pytest.fixture
def naive_strategy():
    """Factory: Avalanche's ``Naive`` on a linear model over the same images."""

    def make(n_classes=6, **kwargs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, n_classes))
        kwargs.setdefault("evaluator", quiet_evaluator())
        kwargs.setdefault("train_epochs", 2)
        return Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=16,
            eval_mb_size=64,
            **kwargs,
        )

    return make


class CallbackRecorder(SupervisedPlugin):
    """Records the name of every callback Avalanche calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.startswith(("before_", "after_")) and callable(attr):

            def record(strategy, *args, **kwargs):
                object.__getattribute__(self, "calls").append(name)
                return attr(strategy, *args, **kwargs)

            return record
        return attr


def both(clip_strategy, naive_strategy, **kwargs):
    return {"clip": clip_strategy(**kwargs), "naive": naive_strategy(**kwargs)}


# ---- evaluation before training, periodic evaluation, callbacks --------------------------
def test_eval_before_training_scores_every_class_unseen(
    clip_strategy, naive_strategy, synthetic_stream, synthetic_data
):
    results = {
        name: s.eval(synthetic_stream.test_stream)
        for name, s in both(clip_strategy, naive_strategy).items()
    }
    assert set(results["clip"]) == set(results["naive"])
    clip = clip_strategy()
    with torch.no_grad():
        scores = clip.model(synthetic_data["test_x"][:5])
    assert scores.shape == (5, 6) and bool((scores == UNSEEN_SCORE).all())


def test_callback_order_equals_naive_with_eval_every_and_peval_mode(
    clip_strategy, naive_strategy, synthetic_stream
):
    recorded = {}
    for name, strategy in both(
        clip_strategy, naive_strategy, eval_every=1, peval_mode="iteration"
    ).items():
        recorder = CallbackRecorder()
        strategy.plugins.insert(0, recorder)
        strategy.train(
            synthetic_stream.train_stream[0], eval_streams=[synthetic_stream.test_stream[:2]]
        )
        strategy.eval(synthetic_stream.test_stream[1:])
        recorded[name] = recorder.calls
    assert recorded["clip"] == recorded["naive"]
    assert recorded["clip"][:2] == ["before_training", "before_eval"]
    assert recorded["clip"].count("before_eval") == 1 + 8 + 1 + 1  # initial, 8 its, final, eval


def test_train_on_a_list_of_experiences_and_early_stopping(
    clip_strategy, naive_strategy, synthetic_stream
):
    epochs = {}
    for name, strategy in both(clip_strategy, naive_strategy, eval_every=1).items():
        stopper = EarlyStoppingPlugin(
            patience=1, val_stream_name="test_stream", metric_name="Top1_Acc_Stream"
        )
        strategy.plugins.insert(0, stopper)
        result = strategy.train(
            synthetic_stream.train_stream[:2], eval_streams=[synthetic_stream.test_stream[:2]]
        )
        assert any(k.startswith("Top1_Acc_Stream/eval_phase/test_stream") for k in result)
        epochs[name] = strategy.clock.train_exp_counter
    assert epochs["clip"] == epochs["naive"] == 2


# ---- model state, deepcopy, LwF, hooks -----------------------------------------------------
def graph_tensors(module: torch.nn.Module):
    """Tensors held as plain attributes by ``module`` or a submodule that are in a graph."""
    found = []
    for sub in module.modules():
        for key, value in vars(sub).items():
            values = value.values() if isinstance(value, dict) else [value]
            found += [key for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    return found


class DeepCopyProbe(SupervisedPlugin):
    """Looks for graph tensors on the model after every step; copies it after each epoch."""

    def __init__(self):
        super().__init__()
        self.steps, self.copies, self.graph = 0, 0, []

    def after_training_iteration(self, strategy, **kwargs):
        self.graph += graph_tensors(strategy.model)
        self.steps += 1

    def after_training_epoch(self, strategy, **kwargs):
        copy.deepcopy(strategy.model)
        self.copies += 1


def test_no_graph_on_the_model_between_steps_deepcopy_and_lwf(
    clip_strategy, naive_strategy, synthetic_stream, tiny_config
):
    # LwF needs something earlier experiences trained to move (else it is refused)
    clip = clip_strategy(config=tiny_config(**FAST, update_old_text_prompts=True))
    for strategy in (clip, naive_strategy()):
        probe = DeepCopyProbe()
        strategy.plugins[:0] = [LwFPlugin(alpha=1.0, temperature=2.0), probe]
        for experience in synthetic_stream.train_stream[:2]:
            strategy.train(experience)
        assert (probe.steps, probe.copies, probe.graph) == (16, 4, [])


def test_forward_hooks_fire_in_training(clip_strategy, naive_strategy, synthetic_stream):
    calls = {}
    for name, strategy in both(clip_strategy, naive_strategy).items():
        seen = []
        strategy.model.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape[1]))
        strategy.train(synthetic_stream.train_stream[0])
        calls[name] = seen
    assert len(calls["clip"]) == len(calls["naive"]) >= 8
    assert set(calls["clip"]) == {6}


# ---- learning rate ------------------------------------------------------------------------
class LrRecorder(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.lrs = []

    def before_training_epoch(self, strategy, **kwargs):
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


def test_a_user_lr_scheduler_takes_over_the_method_decay(
    tiny_config, class_names, naive_strategy, synthetic_stream
):
    config = tiny_config(**{**FAST, "init_epochs": 3, "epochs": 3, "lr_decay_epochs": [1]})
    lrs = {}
    for name in ("clip", "naive", "clip_default"):
        torch.manual_seed(0)
        recorder = LrRecorder()
        if name == "naive":
            strategy = naive_strategy(train_epochs=3)
            optimizer = strategy.optimizer
        else:
            model = build_model(config, class_names)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
            strategy = CLIPHingeStrategy(
                config=config,
                class_names=class_names,
                model=model,
                optimizer=optimizer if name == "clip" else None,
                evaluator=quiet_evaluator(),
                progress=False,
            )
        plugins = [recorder]
        if name != "clip_default":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.5)
            plugins.insert(0, LRSchedulerPlugin(scheduler))
        strategy.plugins[:0] = plugins
        for experience in synthetic_stream.train_stream[:2]:
            strategy.train(experience)
        lrs[name] = recorder.lrs
    base = 0.01
    assert lrs["naive"] == pytest.approx([base, base, base / 2] * 2)
    assert lrs["clip"] == pytest.approx([0.05, 0.05, 0.025] * 2)
    # without a scheduler plugin the method's step decay (x0.1 from epoch 1) applies
    assert lrs["clip_default"] == pytest.approx(
        [
            config.init_lr,
            config.init_lr * 0.1,
            config.init_lr * 0.1,
            config.lr,
            config.lr * 0.1,
            config.lr * 0.1,
        ]
    )


# ---- plugins and metrics alongside --------------------------------------------------------
@pytest.mark.slow
def test_replay_plugin_and_every_metric_family_with_loggers(
    clip_strategy, naive_strategy, synthetic_stream, tmp_path
):
    names = {}
    for name in ("clip", "naive"):
        folder = tmp_path / name
        folder.mkdir()
        text, csv = open(folder / "log.txt", "w"), CSVLogger(str(folder / "csv"))
        board = TensorboardLogger(str(folder / "tb"))
        evaluator = EvaluationPlugin(
            accuracy_metrics(minibatch=True, epoch=True, experience=True, stream=True),
            loss_metrics(minibatch=True, epoch=True, experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True),
            forward_transfer_metrics(experience=True, stream=True),
            class_accuracy_metrics(stream=True),
            timing_metrics(epoch=True),
            confusion_matrix_metrics(num_classes=6, save_image=False, stream=True),
            accuracy_matrix_metrics(),
            amca_metrics(),
            topk_acc_metrics(top_k=2, stream=True),
            labels_repartition_metrics(),
            mean_scores_metrics(),
            images_samples_metrics(n_cols=2, n_rows=1),
            MAC_metrics(experience=True),
            cpu_usage_metrics(epoch=True),
            ram_usage_metrics(epoch=True, every=0.05),
            disk_usage_metrics(epoch=True, paths_to_monitor=[str(folder)]),
            loggers=[TextLogger(text), csv, board, InteractiveLogger()],
        )
        factory = clip_strategy if name == "clip" else naive_strategy
        strategy = factory(evaluator=evaluator, eval_every=0, plugins=[ReplayPlugin(mem_size=20)])
        for experience in synthetic_stream.train_stream[:2]:
            strategy.train(experience, eval_streams=[synthetic_stream.test_stream])
            strategy.eval(synthetic_stream.test_stream)
        names[name] = set(evaluator.get_all_metrics())
        csv.close()
        board.writer.close()
        text.close()
        assert (folder / "csv" / "eval_results.csv").is_file()
    assert names["clip"] == names["naive"]


def test_task_labels_reach_the_metrics(clip_strategy, naive_strategy, synthetic_data):
    train = Labelled(synthetic_data["train_x"], synthetic_data["train_y"])
    test = Labelled(synthetic_data["test_x"], synthetic_data["test_y"])
    stream = nc_benchmark(
        train,
        test,
        n_experiences=3,
        task_labels=True,
        seed=0,
        fixed_class_order=list(range(6)),
        class_ids_from_zero_in_each_exp=False,
    )
    keys = {}
    for name, strategy in both(clip_strategy, naive_strategy).items():
        strategy.train(stream.train_stream[0])
        keys[name] = {k for k in strategy.eval(stream.test_stream) if "Task" in k}
    assert keys["clip"] == keys["naive"]
    assert any("/Task002/" in k for k in keys["clip"])


# ---- class ids, names, classes that come back ----------------------------------------------
def test_class_ids_with_gaps_and_a_name_mapping(tiny_config, synthetic_data):
    ids = torch.tensor([10, 11, 20, 21, 30, 31])
    train = Labelled(synthetic_data["train_x"], ids[synthetic_data["train_y"]])
    test = Labelled(synthetic_data["test_x"], ids[synthetic_data["test_y"]])
    stream = nc_benchmark(
        train, test, n_experiences=3, task_labels=False, seed=0, fixed_class_order=ids.tolist()
    )
    names = {
        10: "red",
        11: "green",
        20: "blue",
        21: "red stripes",
        30: "green stripes",
        31: "blue stripes",
    }
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=tiny_config(**FAST), class_names=names, evaluator=quiet_evaluator(), progress=False
    )
    for experience in stream.train_stream[:2]:
        strategy.train(experience)
    result = strategy.eval(stream.test_stream)
    assert strategy.model.seen_classes == [10, 11, 20, 21]
    assert strategy.model.prompts[1].class_names == ["blue", "red stripes"]
    assert result["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002"] == 0.0
    with torch.no_grad():
        assert strategy.model(synthetic_data["test_x"][:2]).shape == (2, 32)


def test_more_class_names_than_the_stream_has_and_the_layout_checked_on_the_stream(
    tiny_config, synthetic_stream
):
    names = [f"class {i}" for i in range(10)]  # 10 names for a 6-class stream
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=tiny_config(**FAST), class_names=names, evaluator=quiet_evaluator(), progress=False
    )
    strategy.train(synthetic_stream.train_stream[0])
    assert strategy.model.prompts[0].class_names == ["class 0", "class 1"]
    assert strategy.model.n_outputs == 10
    short = tiny_config(**{**FAST, "total_tasks": 2})  # 2 + 2 classes for a 6-class stream
    strategy = CLIPHingeStrategy(
        config=short, class_names=names, evaluator=quiet_evaluator(), progress=False
    )
    with pytest.raises(ConfigError, match=r"= 4, but the stream has 6 classes"):
        strategy.train(synthetic_stream.train_stream[0])
    with pytest.raises(ConfigError, match=r"class_names has 3 names but .* = 6 classes"):
        CLIPHingeStrategy(config=tiny_config(**FAST), class_names=names[:3])


def test_class_names_for_follows_the_remapping():
    class Source(torch.utils.data.Dataset):
        classes = ["apple_pie", "bus", "sea_lion"]

        def __init__(self):
            self.targets = [0, 1, 2] * 4

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), self.targets[i]

    assert class_names_for(Source()) == ["apple pie", "bus", "sea lion"]
    remapped = nc_benchmark(
        Source(),
        Source(),
        n_experiences=3,
        task_labels=False,
        fixed_class_order=[2, 0, 1],
        class_ids_from_zero_from_first_exp=True,
    )
    assert class_names_for(remapped) == {0: "sea lion", 1: "apple pie", 2: "bus"}
    assert class_names_for(Source.classes, remapped) == class_names_for(remapped)
    kept = nc_benchmark(
        Source(), Source(), n_experiences=3, task_labels=False, fixed_class_order=[2, 0, 1]
    )
    assert class_names_for(kept) == ["apple pie", "bus", "sea lion"]


def test_classes_come_back_train_twice_and_freeze_option(
    tiny_config, class_names, synthetic_stream
):
    ctx = {}
    for mode in ("train", "freeze"):
        torch.manual_seed(0)
        strategy = CLIPHingeStrategy(
            config=tiny_config(**FAST, returning_class_prompts=mode),
            class_names=class_names,
            evaluator=quiet_evaluator(),
            progress=False,
        )
        strategy.train(synthetic_stream.train_stream[0])
        before = strategy.model.prompts[0].ctx.detach().clone()
        strategy.train(synthetic_stream.train_stream[0])  # the same classes again
        assert strategy.model.n_tasks == 1 and strategy.experience_classes.task is None
        assert int(strategy.model.gaussians.counts.sum()) == 2 * 60
        ctx[mode] = (before, strategy.model.prompts[0].ctx.detach().clone())
    assert not torch.equal(*ctx["train"])
    assert torch.equal(*ctx["freeze"])


def test_an_experience_mixing_new_and_returning_classes(tiny_config, class_names, synthetic_data):
    from avalanche.benchmarks.scenarios.deprecated.generators import dataset_benchmark

    x, y = synthetic_data["train_x"], synthetic_data["train_y"]

    def classes(*ids):
        keep = torch.isin(y, torch.tensor(ids))
        return Labelled(x[keep], y[keep])

    stream = dataset_benchmark([classes(0, 1), classes(1, 2, 3)], [classes(0, 1, 2, 3)])
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=tiny_config(**FAST),
        class_names=class_names,
        evaluator=quiet_evaluator(),
        progress=False,
    )
    strategy.train(stream.train_stream[0])
    before = strategy.model.prompts[0].ctx.detach().clone()
    strategy.train(stream.train_stream[1])
    model, seen = strategy.model, strategy.experience_classes
    assert (seen.new, seen.returning, seen.old, seen.task) == ([2, 3], [1], [0], 1)
    assert model.task_classes == [[0, 1], [2, 3]]
    after = model.prompts[0].ctx.detach()
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    gaussians = model.gaussians
    assert gaussians.counts[gaussians.index_of([0, 1, 2])].tolist() == [30, 60, 30]
    ones = x[y == 1]
    with torch.no_grad():
        feats = model.clip.encode_image(ones).double()
    merged = torch.cat([feats, feats]).numpy()  # class 1 was seen twice, 30 images each
    np.testing.assert_allclose(gaussians.mean_of([1])[0].numpy(), merged.mean(0), atol=1e-4)
    np.testing.assert_allclose(
        gaussians.covs[gaussians.index_of([1])][0].numpy(),
        np.cov(merged, rowvar=False),
        rtol=1e-3,
        atol=1e-5,
    )
    assert model.heads["1"].linear.weight.shape[0] == 2  # stage 2: the new task's head


def test_lora_stage_two_on_pil_images_of_new_and_returning_classes(
    tiny_config, class_names, synthetic_data
):
    from avalanche.benchmarks import ni_benchmark

    x, y = synthetic_data["train_x"], synthetic_data["train_y"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)

    class Photos(torch.utils.data.Dataset):  # PIL images, as an ImageFolder serves
        def __init__(self, *ids):
            keep = torch.nonzero(torch.isin(y, torch.tensor(ids))).flatten().tolist()
            self.images = [Image.fromarray(pixels[i].permute(1, 2, 0).numpy()) for i in keep]
            self.targets = [int(y[i]) for i in keep]

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.images[i], self.targets[i]

    # a new-instances stream (Avalanche subsets of one dataset, whose own subset() drops a
    # transform set on top): class 1 in both experiences, 2 and 3 new in the second
    photos = Photos(0, 1, 2, 3)
    rows = {c: [i for i, t in enumerate(photos.targets) if t == c] for c in range(4)}
    stream = ni_benchmark(
        photos,
        Photos(0, 1, 2, 3),
        n_experiences=2,
        task_labels=False,
        fixed_exp_assignment=[rows[0] + rows[1][:15], rows[1][15:] + rows[2] + rows[3]],
    )
    config = tiny_config(
        **FAST,
        use_lora_in_second_stage=True,
        lora_layers=[1],
        lora_rank=2,
        init_class=None,
        increment=None,
        total_tasks=None,
    )
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=config, class_names=class_names, evaluator=quiet_evaluator(), progress=False
    )
    strategy.train(stream.train_stream[0])
    encoded = []
    encode = strategy.model.run_image_encoder

    def counted(images):
        if strategy.model.lora.active is not None:  # stage 2 of the new task, adapter on
            encoded.append(images.shape[0])
        return encode(images)

    strategy.model.run_image_encoder = counted
    strategy.train(stream.train_stream[1])  # class 1 returns; 2 and 3 are new
    # stage 2 of task 1 trains its head on the images of the new classes only (2 x 30)
    assert sum(encoded) == config.second_stage_epochs * 60
    assert strategy.model.heads["1"].linear.weight.shape[0] == 2


def test_an_online_stream_runs(clip_strategy, naive_strategy, synthetic_stream):
    for strategy in both(clip_strategy, naive_strategy).values():
        torch.manual_seed(0)
        online = split_online_stream(synthetic_stream.train_stream[:2], experience_size=20, seed=0)
        for experience in online:
            strategy.train(experience)
        result = strategy.eval(synthetic_stream.test_stream[:2])
        assert "Top1_Acc_Stream/eval_phase/test_stream/Task000" in result


# ---- what the stream serves ---------------------------------------------------------------
def pil_images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for _ in range(n)]


def test_pil_uint8_and_unit_float_items_give_the_builders_input(tiny_config, class_names):
    model = build_model(tiny_config(), class_names)
    convert = ClipInput.for_backbone(model.backbone)
    for image in pil_images(3):
        expected = model.backbone.eval_transform(image)  # what the package's builders serve
        assert torch.equal(convert(image), expected)
        assert torch.equal(convert(transforms.PILToTensor()(image)), expected)
        assert torch.equal(convert(transforms.ToTensor()(image)), expected)
        assert torch.equal(convert(expected), expected)  # CLIP's input passes as it is
    device = ClipInput.for_backbone(model.backbone, resize_on_device=True)
    image = pil_images(1)[0]
    assert torch.equal(device(image), transforms.PILToTensor()(image))


def test_avalanche_default_cifar_transforms_are_refused_with_the_fix(clip_strategy):
    from avalanche.benchmarks.classic.ccifar100 import (
        _default_cifar100_eval_transform,
        _default_cifar100_train_transform,
    )

    class Cifar(torch.utils.data.Dataset):
        def __init__(self):
            self.images, self.targets = pil_images(12), [0, 1, 2, 3, 4, 5] * 2

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return self.images[i], self.targets[i]

    stream = nc_benchmark(
        Cifar(),
        Cifar(),
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(6)),
        train_transform=_default_cifar100_train_transform,
        eval_transform=_default_cifar100_eval_transform,
    )
    strategy = clip_strategy()
    with pytest.raises(StreamInputError, match=r"Normalize.*transforms\.ToTensor\(\) only"):
        strategy.train(stream.train_stream[0])
    with pytest.raises(StreamInputError, match="stream_transforms"):
        strategy.eval(stream.test_stream)
    train, test = stream_transforms(strategy)
    assert train is test is strategy.model.backbone.eval_transform
    features = []
    for transform in (None, transforms.ToTensor(), transforms.PILToTensor(), train):
        accepted = nc_benchmark(
            Cifar(),
            Cifar(),
            n_experiences=3,
            task_labels=False,
            fixed_class_order=list(range(6)),
            train_transform=transform,
            eval_transform=transform,
        )
        strategy = clip_strategy()
        strategy.train(accepted.train_stream[0])
        features.append(strategy.current_features[0])
    # PIL, ToTensor, PILToTensor: the same features as the package's builders (CLIP's transform)
    assert all(torch.equal(f, features[-1]) for f in features)


class InputRecorder(SupervisedPlugin):
    """The number of dimensions of the minibatch inputs, in training and in evaluation."""

    def __init__(self):
        super().__init__()
        self.train_dims, self.eval_dims = set(), set()

    def before_forward(self, strategy, **kwargs):
        self.train_dims.add(strategy.mb_x.ndim)

    def before_eval_forward(self, strategy, **kwargs):
        self.eval_dims.add(strategy.mb_x.ndim)


def test_random_train_transform_turns_the_cache_off_and_warns_once(
    clip_strategy, tiny_config, synthetic_data
):
    unit = (synthetic_data["train_x"] * 0.2 + 0.5).clamp(0, 1)
    train = Labelled(unit, synthetic_data["train_y"])
    stream = nc_benchmark(
        train,
        train,
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(6)),
        train_transform=transforms.RandomHorizontalFlip(),
        eval_transform=None,
    )
    one_epoch = tiny_config(**{**FAST, "init_epochs": 1, "epochs": 1, "second_stage_epochs": 0})
    strategy = clip_strategy(config=one_epoch)
    inputs = InputRecorder()
    strategy.plugins.insert(0, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy.train(stream.train_stream[0])
        strategy.train(stream.train_stream[1])
    messages = [str(w.message) for w in caught if "random training transform" in str(w.message)]
    assert len(messages) == 1 and "RandomHorizontalFlip" in messages[0]
    assert inputs.train_dims == {4}  # images every step: no cached features
    strategy.eval(stream.test_stream[:1])
    assert inputs.eval_dims == {2}  # evaluation stays on cached features

    class Jitter:  # random, but not a torchvision class
        def __call__(self, x):
            return (x + 0.01 * torch.rand_like(x)).clamp(0, 1)

    custom = nc_benchmark(
        train,
        train,
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(6)),
        train_transform=Jitter(),
    )
    strategy = clip_strategy(config=one_epoch)
    with pytest.warns(UserWarning, match="an item read twice came out different"):
        strategy.train(custom.train_stream[0])


def test_task_layout_read_off_the_stream(synthetic_data):
    from avalanche_cliphinge import task_layout

    train = Labelled(synthetic_data["train_x"], synthetic_data["train_y"])
    b3_inc1 = nc_benchmark(
        train,
        train,
        n_experiences=4,
        task_labels=False,
        fixed_class_order=list(range(6)),
        per_exp_classes={0: 3},
    )
    assert task_layout(b3_inc1) == {"init_class": 3, "increment": 1, "total_tasks": 4}
    uneven = nc_benchmark(
        train,
        train,
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(6)),
        per_exp_classes={0: 1, 1: 3},
    )
    with pytest.raises(ValueError, match=r"\[1, 3, 2\] classes"):
        task_layout(uneven)


@pytest.mark.slow
def test_layout_left_unset_is_taken_from_the_stream(
    clip_strategy, synthetic_data, tiny_config, class_names, tmp_path
):
    from avalanche_cliphinge.app.experiment import run_experiment
    from avalanche_cliphinge.benchmarks import NamedBenchmark

    train = Labelled(synthetic_data["train_x"], synthetic_data["train_y"])
    test = Labelled(synthetic_data["test_x"], synthetic_data["test_y"])
    uneven = nc_benchmark(
        train,
        test,
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(6)),
        per_exp_classes={0: 1, 1: 3},
    )
    config = tiny_config(**{**FAST, "init_class": None, "increment": None, "total_tasks": None})
    assert config.n_classes is None and not config.layout_is_set
    strategy = clip_strategy(config=config)
    for experience in uneven.train_stream:  # 1, 3 and 2 classes: any layout runs
        strategy.train(experience)
    assert [len(c) for c in strategy.model.task_classes] == [1, 3, 2]
    with pytest.raises(
        ConfigError,
        match=r"init_class, increment, total_tasks are unset; "
        r"set --set init_class=\.\.\. ",
    ):
        config.require_layout("the cifar100 stream builder")
    # the application reads an unset layout off the stream and records it
    even = nc_benchmark(
        train, test, n_experiences=3, task_labels=False, fixed_class_order=list(range(6))
    )
    named_benchmark = NamedBenchmark(even, list(class_names), list(range(6)), {"name": "even"})
    torch.manual_seed(0)
    results = run_experiment(config, named_benchmark, tmp_path / "run", interactive=False)
    saved = results["protocol"]["config"]
    assert (saved["init_class"], saved["increment"], saved["total_tasks"]) == (2, 2, 3)


def test_wrong_layout_still_errors(clip_strategy, synthetic_stream, tiny_config):
    strategy = clip_strategy(
        config=tiny_config(**{**FAST, "init_class": 3, "increment": 1, "total_tasks": 4})
    )
    with pytest.raises(ConfigError, match="experience 0 has 2 classes but the config expects 3"):
        strategy.train(synthetic_stream.train_stream[0])


def test_readme_own_script_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(
        r"## Use it in your own Avalanche script.*?```python\n(.*?)```", readme, re.S
    ).group(1)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert printed.count("Top1_Acc_Stream/eval_phase/test_stream/Task000") == 2
    section = readme[readme.index("## Use it in your own Avalanche script") :]
    expected = re.search(r"Expected output: `([^`]+)`", section).group(1)
    assert [line for line in printed.splitlines() if line.startswith("{")] == [expected] * 2


def test_stream_transforms_by_architecture_name(tiny_config, class_names):
    train, test = stream_transforms("cliphinge-tiny")
    model = build_model(tiny_config(), class_names)
    image = pil_images(1)[0]
    assert torch.equal(test(image), model.backbone.eval_transform(image)) and train is test
    train, test = stream_transforms("cliphinge-tiny", augment=True)
    assert any(type(t).__name__ == "RandomResizedCrop" for t in train.transforms)
