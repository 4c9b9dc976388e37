"""Drop-in contract: the accuracy Avalanche reports is the accuracy of the model's own predictions.

A differential matrix over the ways an Avalanche stream can carry its class ids and items
(ids remapped from zero, a fixed class order, ids with gaps and names as a mapping, PIL
images, the validation stream, evaluation on the training stream, the feature cache on and
off, task labels). For each, Avalanche's ``Top1_Acc_Stream`` after two experiences equals
the accuracy of ``CLIPHingeModel.predict`` on the same items, scored against the ids of each
experience's ``dataset.targets`` (the ids the benchmark gives its experiences). The invariant
needs no reference value. ``Naive`` runs the same check (its prediction: the argmax of its
model) on every stream of tensors, so the oracle itself is held to Avalanche's own strategy.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.validation_scenario import benchmark_with_validation_stream
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from PIL import Image

from avalanche_cliphinge import CLIPHingeStrategy
from avalanche_cliphinge.streams import class_names_for

QUICK = dict(
    init_epochs=2,
    epochs=1,
    second_stage_epochs=1,
    samples_per_old_class=4,
    text_hard_pair_threshold=-1.0,
    text_top_hard_pairs=2,
    hinge_samples_per_pair=4,
)
ORDER = [1, 4, 5, 0, 2, 3]
GAPS = [10, 11, 20, 21, 30, 31]


class Labelled(torch.utils.data.TensorDataset):
    """``(image, label)`` items with the ``targets`` list Avalanche reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.targets = labels.tolist()


class PILImages(torch.utils.data.Dataset):
    """The same images as 8-bit PIL images (what an ImageFolder serves)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        self.images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def build(variant: str, data: Dict[str, torch.Tensor], names):
    """``(benchmark, class names, the stream to evaluate)`` of one row of the matrix."""
    train_y, test_y = data["train_y"], data["test_y"]
    kind = Labelled
    options = dict(n_experiences=3, task_labels=False, seed=0, fixed_class_order=list(range(6)))
    class_names = list(names)
    if variant in ("ids_from_zero", "pil", "validation", "train_stream", "no_cache"):
        options.update(fixed_class_order=ORDER, class_ids_from_zero_from_first_exp=True)
    elif variant == "class_order":
        options.update(fixed_class_order=ORDER)
    elif variant == "gaps":
        ids = torch.tensor(GAPS)
        train_y, test_y = ids[train_y], ids[test_y]
        options.update(fixed_class_order=GAPS)
        class_names = {GAPS[i]: name for i, name in enumerate(names)}
    elif variant == "task_labels":
        options.update(task_labels=True, class_ids_from_zero_in_each_exp=False)
    if variant == "pil":
        kind = PILImages
    benchmark = nc_benchmark(
        kind(data["train_x"], train_y), kind(data["test_x"], test_y), **options
    )
    if options.get("class_ids_from_zero_from_first_exp"):
        class_names = class_names_for(list(names), benchmark)
    if variant == "validation":
        benchmark = benchmark_with_validation_stream(benchmark, validation_size=0.25, seed=0)
    stream = {
        "validation": benchmark.streams.get("valid"),
        "train_stream": benchmark.train_stream,
    }.get(variant, benchmark.test_stream)
    return benchmark, class_names, stream


def predictions_by_experience(predict, stream):
    """``[(predicted ids [n], target ids [n])]`` of every experience of ``stream``: ``predict``
    applied to the items the experience's dataset serves, the targets its ``targets``."""
    out = []
    for experience in stream:
        dataset = experience.dataset.eval()
        items = [dataset[i][0] for i in range(len(dataset))]
        out.append((predict(items), torch.tensor([int(t) for t in dataset.targets])))
    return out


def check_reported(results, stream, predictions) -> None:
    """Assert Avalanche's experience and stream accuracies equal those of ``predictions``."""
    prefix = f"eval_phase/{stream.name}_stream"
    for j, (predicted, targets) in enumerate(predictions):
        (key,) = [
            k
            for k in results
            if k.startswith(f"Top1_Acc_Exp/{prefix}") and k.endswith(f"Exp{j:03d}")
        ]
        expected = float((predicted == targets).double().mean())
        assert results[key] == pytest.approx(expected, abs=1e-6), key
    (key,) = [k for k in results if k.startswith(f"Top1_Acc_Stream/{prefix}")]
    hits = torch.cat([p == t for p, t in predictions]).double()
    assert results[key] == pytest.approx(float(hits.mean()), abs=1e-6), key


def evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


VARIANTS = [
    "plain",
    "ids_from_zero",
    "class_order",
    "gaps",
    "pil",
    "validation",
    "train_stream",
    "no_cache",
    "task_labels",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_reported_accuracy_is_the_models_own_predictions(
    variant, synthetic_data, class_names, tiny_config
):
    benchmark, names, stream = build(variant, synthetic_data, class_names)
    torch.manual_seed(0)
    config = tiny_config(**QUICK, cache_features=variant != "no_cache")
    strategy = CLIPHingeStrategy(
        config=config,
        class_names=names,
        evaluator=evaluator(),
        progress=False,
    )
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    results = strategy.eval(stream)
    model = strategy.model
    predictions = predictions_by_experience(lambda x: model.predict(x, k=1).class_ids[:, 0], stream)
    check_reported(results, stream, predictions)
    # items of the learned classes and of the unseen third experience; above chance (1 / 4)
    # on the learned ones
    predicted, targets = (torch.cat(t) for t in zip(*predictions))
    seen = torch.isin(targets, model.class_of_column)
    assert bool(seen.any()) and bool((~seen).any())
    assert float((predicted[seen] == targets[seen]).float().mean()) > 0.25 + 0.1


@pytest.mark.parametrize(
    "variant", ["plain", "ids_from_zero", "class_order", "gaps", "validation", "task_labels"]
)
def test_naive_reports_its_models_own_predictions_too(variant, synthetic_data, class_names):
    benchmark, _, stream = build(variant, synthetic_data, class_names)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 32))
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=16,
        eval_mb_size=64,
        train_epochs=1,
        evaluator=evaluator(),
    )
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    results = strategy.eval(stream)

    def predict(items):
        with torch.no_grad():
            return model(torch.stack(items)).argmax(1)

    check_reported(results, stream, predictions_by_experience(predict, stream))


def test_items_whose_ids_disagree_with_targets_are_refused(
    synthetic_data, class_names, tiny_config
):
    from avalanche_cliphinge.streams import StreamInputError

    shifted = Labelled(synthetic_data["test_x"], synthetic_data["test_y"])
    shifted.targets = [(t + 1) % 6 for t in shifted.targets]  # items say t, targets t + 1
    benchmark = nc_benchmark(
        shifted, shifted, n_experiences=3, task_labels=False, fixed_class_order=list(range(6))
    )
    strategy = CLIPHingeStrategy(
        config=tiny_config(**QUICK), class_names=class_names, evaluator=evaluator(), progress=False
    )
    with pytest.raises(
        StreamInputError,
        match=r"^train experience 0: item 0 carries class id 5 but the dataset's targets say 0;",
    ):
        strategy.train(benchmark.train_stream[0])


def test_freezing_keeps_the_remapping_of_every_group(synthetic_data):
    from avalanche_cliphinge.dataset_transforms import freeze_transforms

    pick = torch.arange(0, 60, 5)  # 2 items of each of the 6 classes
    data = Labelled(synthetic_data["test_x"][pick], synthetic_data["test_y"][pick])
    benchmark = nc_benchmark(
        data,
        data,
        n_experiences=3,
        task_labels=False,
        fixed_class_order=ORDER,
        class_ids_from_zero_from_first_exp=True,
    )
    for experience in benchmark.test_stream:
        for group in ("train", "eval"):
            dataset = getattr(experience.dataset, group)()
            frozen = freeze_transforms(dataset)
            remapped = [
                ORDER.index(int(y))
                for y in data.targets
                if ORDER.index(int(y)) in experience.classes_in_this_experience
            ]
            assert [int(frozen[i][1]) for i in range(len(frozen))] == remapped
            assert list(frozen.targets) == remapped
