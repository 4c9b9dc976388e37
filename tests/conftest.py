"""Shared fixtures: a tiny learnable class-incremental stream and a config factory.

avalanche-lib installs its own top-level ``tests`` package, so nothing here is imported as
``tests.conftest``: helpers reach the test files as fixtures only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

# `make test` runs the suite in pytest-xdist workers: share the cores out instead of every
# worker's torch using all of them
torch.set_num_threads(
    max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
)

#: Class c: colour channel c % 3, vertical stripes when c >= 3 (ids follow the stream order).
CLASS_NAMES = ["red", "green", "blue", "red stripes", "green stripes", "blue stripes"]
N_CLASSES = len(CLASS_NAMES)
TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 10


class LabelledTensorDataset(TensorDataset):
    """``TensorDataset(images, labels)`` with the ``targets`` list Avalanche reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.targets: List[int] = labels.tolist()


#: CLIP's normalisation: the synthetic images are what CLIP's eval transform would serve.
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def make_images(n_per_class: int, generator: torch.Generator):
    """``[6 * n, 3, 32, 32]`` CLIP-normalised images (every pixel the image of one in
    ``[0, 1]``) and ``[6 * n]`` labels, grouped by class in id order."""
    images, labels = [], []
    for c in range(N_CLASSES):
        base = torch.zeros(3, 32, 32)
        base[c % 3] = 1.5
        if c >= 3:
            base[:, :, ::4] = -1.5
        images.append(base + 0.3 * torch.randn(n_per_class, 3, 32, 32, generator=generator))
        labels += [c] * n_per_class
    images = torch.cat(images)
    images = torch.maximum(torch.minimum(images, (1 - CLIP_MEAN) / CLIP_STD), -CLIP_MEAN / CLIP_STD)
    return images, torch.tensor(labels)


@pytest.fixture(scope="session")
def class_names() -> List[str]:
    """Names indexed by the synthetic stream's class ids."""
    return list(CLASS_NAMES)


@pytest.fixture(scope="session")
def synthetic_data() -> Dict[str, torch.Tensor]:
    """The raw tensors behind ``synthetic_stream`` (train 30 / test 10 images per class)."""
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = make_images(TRAIN_PER_CLASS, generator)
    test_x, test_y = make_images(TEST_PER_CLASS, generator)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


@pytest.fixture(scope="session")
def synthetic_stream(synthetic_data):
    """3 experiences of 2 classes each (classes 0-1, 2-3, 4-5), ids unchanged, no task labels."""
    from avalanche.benchmarks import nc_benchmark

    train = LabelledTensorDataset(synthetic_data["train_x"], synthetic_data["train_y"])
    test = LabelledTensorDataset(synthetic_data["test_x"], synthetic_data["test_y"])
    return nc_benchmark(
        train,
        test,
        n_experiences=3,
        task_labels=False,
        seed=0,
        fixed_class_order=list(range(N_CLASSES)),
    )


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., "CLIPHingeConfig"]:  # noqa: F821
    """Factory: a ``CLIPHingeConfig`` for the tiny offline CLIP on the synthetic stream.

    Small enough that a 3-experience run takes seconds on 2 CPU cores; keyword arguments
    override any key.
    """
    from avalanche_cliphinge import CLIPHingeConfig

    def make(**overrides) -> CLIPHingeConfig:
        values = dict(
            model_name="cliphinge-tiny",
            pretrained=None,
            init_class=2,
            increment=2,
            total_tasks=3,
            init_epochs=10,
            epochs=10,
            lr=0.01,
            init_lr=0.01,
            batch_size=16,
            eval_batch_size=64,
            seed=0,
            lr_decay_epochs=[100],
            second_stage_epochs=2,
        )
        values.update(overrides)
        return CLIPHingeConfig(**values)

    return make


@pytest.fixture(scope="session")
def evaluator_factory():
    """Factory: Avalanche's accuracy and forgetting metrics (experience and stream level)."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin

    def make():
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            loggers=[],
        )

    return make


@pytest.fixture(scope="session")
def run_stream(synthetic_stream, class_names, evaluator_factory):
    """Factory: train a ``CLIPHingeStrategy`` experience by experience, evaluating after each.

    ``run(config, plugins=None, use_default_plugins=True, n_experiences=3, on_start=None,
    after_exp=None, torch_seed=0)`` returns ``(strategy, results)`` where ``results[i]`` is
    the dict of ``strategy.eval(test_stream)`` after training experience i. ``torch_seed``
    seeds the global RNG before the random tiny backbone is built, so two runs share weights.
    ``on_start(strategy)`` runs before the first experience, ``after_exp(strategy, i)`` right
    after ``train`` (before the eval).
    """
    from avalanche_cliphinge import CLIPHingeStrategy

    def run(
        config,
        *,
        plugins: Optional[Sequence] = None,
        use_default_plugins: bool = True,
        n_experiences: int = 3,
        on_start=None,
        after_exp=None,
        torch_seed: int = 0,
    ):
        torch.manual_seed(torch_seed)
        strategy = CLIPHingeStrategy(
            config=config,
            class_names=class_names,
            plugins=list(plugins or []),
            use_default_plugins=use_default_plugins,
            evaluator=evaluator_factory(),
        )
        if on_start is not None:
            on_start(strategy)
        results = []
        for i, experience in enumerate(synthetic_stream.train_stream[:n_experiences]):
            strategy.train(experience)
            if after_exp is not None:
                after_exp(strategy, i)
            results.append(strategy.eval(synthetic_stream.test_stream))
        return strategy, results

    return run


SHARED_JPEGS = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg-subset"
CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


@pytest.fixture(scope="session")
def cifar10_jpegs(tmp_path_factory) -> Path:
    """The shared real CIFAR-10 JPEG subset (10 classes, 40 training and 10 test 32x32 JPEGs
    each, ``root/{train,test}/<class>/*.jpg``) where the checkout has ``../shared``; elsewhere
    (a clone of the repository, which does not ship it) a generated tree of that layout,
    random pixels saved as JPEG."""
    from PIL import Image

    if SHARED_JPEGS.is_dir():
        return SHARED_JPEGS
    root = tmp_path_factory.mktemp("cifar10-jpeg-subset")
    rng = np.random.default_rng(0)
    for side, count in (("train", 40), ("test", 10)):
        for name in CIFAR10_CLASSES:
            folder = root / side / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
    return root
