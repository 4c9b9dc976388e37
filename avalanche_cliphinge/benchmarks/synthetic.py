"""A deterministic offline stream of coloured patterns, for demos and tests without data.

Class c is one (colour, pattern) pair, e.g. "red horizontal stripes". Each image draws its own
phase, brightness and pixel noise, so a model has to learn the class structure rather than
memorise images; a tiny random-weight CLIP separates the classes once prompts are learned.

The stream serves plain 8-bit RGB images (uint8 ``[3, h, w]``, what ``PILToTensor`` makes), not
one backbone's input: the strategy (``streams.ClipInput``) resizes and normalises them for
whichever CLIP it runs, so the same stream feeds the 32-px tiny model and a 224-px ViT-B/16.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

# CLIP's normalisation, re-exported as ``benchmarks.CLIP_MEAN`` / ``CLIP_STD`` for their importers;
# the stream serves unnormalised images.
from ..streams import CLIP_MEAN, CLIP_STD  # noqa: F401
from .common import (
    NamedBenchmark,
    check_class_order,
    check_task_split,
    describe_stream,
    make_nc_benchmark,
)

_COLOURS = (
    ("red", (0.90, 0.10, 0.10)),
    ("green", (0.10, 0.75, 0.15)),
    ("blue", (0.10, 0.25, 0.95)),
    ("yellow", (0.95, 0.90, 0.10)),
    ("cyan", (0.10, 0.85, 0.90)),
    ("magenta", (0.90, 0.10, 0.85)),
    ("orange", (1.00, 0.55, 0.00)),
    ("purple", (0.50, 0.10, 0.70)),
    ("white", (0.95, 0.95, 0.95)),
    ("brown", (0.55, 0.30, 0.10)),
    ("pink", (1.00, 0.60, 0.75)),
    ("teal", (0.00, 0.50, 0.50)),
)
# (name, shape, cycles per image side)
_PATTERNS = (
    ("horizontal stripes", "horizontal", 2),
    ("vertical stripes", "vertical", 2),
    ("diagonal stripes", "diagonal", 2),
    ("checkerboard", "checker", 2),
    ("rings", "rings", 2),
    ("thin horizontal stripes", "horizontal", 5),
    ("thin vertical stripes", "vertical", 5),
    ("thin diagonal stripes", "diagonal", 5),
    ("fine checkerboard", "checker", 5),
    ("thin rings", "rings", 5),
)
MAX_SYNTHETIC_CLASSES = len(_COLOURS) * len(_PATTERNS)


def synthetic_class(c: int) -> tuple[int, int]:
    """(colour index, pattern index) of class `c`.

    Consecutive classes differ in both colour and pattern (the first ten use ten colours and
    ten patterns), and every pair occurs once over the `MAX_SYNTHETIC_CLASSES` classes.
    """
    colour = c % len(_COLOURS)
    pattern = (c // len(_COLOURS) + colour) % len(_PATTERNS)
    return colour, pattern


def synthetic_class_names(n_classes: int) -> list[str]:
    """Readable, unique names of the first `n_classes` synthetic classes."""
    names = []
    for c in range(n_classes):
        colour, pattern = synthetic_class(c)
        names.append(f"{_COLOURS[colour][0]} {_PATTERNS[pattern][0]}")
    return names


def synthetic(
    *,
    n_classes: int = 10,
    init_class: int = 5,
    increment: int = 5,
    train_per_class: int = 40,
    test_per_class: int = 20,
    image_size: int = 32,
    noise: float = 0.1,
    seed: int = 0,
    class_order: Optional[Sequence[int]] = None,
) -> NamedBenchmark:
    """Class-incremental stream of synthetic coloured-pattern images, fully offline.

    Args:
        n_classes: number of classes, at most `MAX_SYNTHETIC_CLASSES` (120).
        init_class: classes in the first task.
        increment: classes in every later task.
        train_per_class: training images per class.
        test_per_class: test images per class.
        image_size: side of the square images in pixels.
        noise: standard deviation of the Gaussian pixel noise, in [0, 1] pixel units.
        seed: the same seed gives identical tensors.
        class_order: the class ids in task order (a permutation of 0..n_classes-1);
            `None` -> ascending. The images of a class do not depend on the order.

    Returns:
        NamedBenchmark whose experiences hold `(image, target, task_label)` items with images
        uint8 `[3, image_size, image_size]` (RGB, 0..255, unnormalised: `CLIPHingeStrategy`
        brings them to its backbone's input size and normalisation; for another model divide
        by 255); targets are class ids 0..n_classes-1, visited in `class_order`;
        `class_names` like "red horizontal stripes".

    Raises:
        ValueError: more than 120 classes, non-positive sizes, class counts that do not
            add up, or a `class_order` that is not a permutation of the class ids.
    """
    if not 1 <= n_classes <= MAX_SYNTHETIC_CLASSES:
        raise ValueError(
            f"n_classes must be in 1..{MAX_SYNTHETIC_CLASSES} ({len(_COLOURS)} colours x "
            f"{len(_PATTERNS)} patterns), got {n_classes}."
        )
    if train_per_class < 1 or test_per_class < 1 or image_size < 4:
        raise ValueError(
            f"train_per_class ({train_per_class}) and test_per_class ({test_per_class}) must "
            f"be >= 1 and image_size ({image_size}) >= 4."
        )
    check_task_split(n_classes, init_class, increment)

    rng = np.random.RandomState(seed)
    train = _render_split(rng, n_classes, train_per_class, image_size, noise)
    test = _render_split(rng, n_classes, test_per_class, image_size, noise)
    if class_order is None:
        order, order_name = list(range(n_classes)), "ascending"
    else:
        order, order_name = check_class_order(class_order, n_classes), "explicit"
    benchmark = make_nc_benchmark(
        TensorDataset(*train), TensorDataset(*test), order, init_class, increment, None, None
    )
    protocol = describe_stream(
        benchmark,
        name="synthetic",
        dataset="synthetic coloured patterns",
        root=None,
        class_order_name=order_name,
        class_order=order,
        init_class=init_class,
        increment=increment,
        n_classes=n_classes,
        split=f"generated: {train_per_class} train / {test_per_class} test images per class",
        image_size=image_size,
        noise=noise,
        seed=seed,
    )
    return NamedBenchmark(benchmark, synthetic_class_names(n_classes), order, protocol)


def _render_split(rng, n_classes, per_class, size, noise):
    """Images [n_classes * per_class, 3, size, size] uint8 and int64 targets."""
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")  # [size, size], in (0, 1)
    images, targets = [], []
    for c in range(n_classes):
        colour, pattern = synthetic_class(c)
        _, shape, cycles = _PATTERNS[pattern]
        phase = rng.uniform(0, 2 * np.pi, size=(per_class, 2, 1, 1))
        centre = rng.uniform(0.4, 0.6, size=(per_class, 2, 1, 1))
        brightness = rng.uniform(0.8, 1.2, size=(per_class, 1, 1, 1))
        pixel_noise = rng.normal(0.0, noise, size=(per_class, 3, size, size))
        wave = _wave(shape, cycles, x, y, phase, centre)  # [per_class, size, size] in [-1, 1]
        intensity = 0.3 + 0.35 * (1.0 + wave[:, None])  # [per_class, 1, size, size]
        rgb = np.asarray(_COLOURS[colour][1]).reshape(1, 3, 1, 1)
        image = np.clip(rgb * intensity * brightness + pixel_noise, 0.0, 1.0)
        images.append(np.round(image * 255.0).astype(np.uint8))
        targets.append(np.full(per_class, c))
    return (
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(targets).astype(np.int64)),
    )


def _wave(shape, cycles, x, y, phase, centre):
    k = 2 * np.pi * cycles
    if shape == "horizontal":
        return np.sin(k * y + phase[:, 0])
    if shape == "vertical":
        return np.sin(k * x + phase[:, 0])
    if shape == "diagonal":
        return np.sin(k * (x + y) / np.sqrt(2) + phase[:, 0])
    if shape == "checker":
        return np.sin(k * x + phase[:, 0]) * np.sin(k * y + phase[:, 1])
    radius = np.sqrt((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2)
    return np.sin(k * radius + phase[:, 0])
