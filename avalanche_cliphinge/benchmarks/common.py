"""What every stream builder shares: the returned named_benchmark, the task-split check, the class-order
check, a file-backed image dataset and the call into Avalanche's `nc_benchmark`."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark

from ..streams import to_rgb8

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class NamedBenchmark:
    """A class-incremental stream plus what is needed to name and report it.

    Attributes:
        benchmark: the Avalanche benchmark (an `NCScenario`): `.train_stream` and `.test_stream`
            are index-aligned, experience k holds the classes `class_order[start_k:end_k]`, and
            targets are the ORIGINAL class ids (no remapping).
        class_names: human-readable names indexed by original class id (length = n classes).
        class_order: the class ids in the order the tasks see them.
        protocol: JSON-serialisable description of the stream (dataset, root, order, split,
            per-experience class counts and sizes, seed), to be written next to every result.
    """

    benchmark: object
    class_names: list[str]
    class_order: list[int]
    protocol: dict = field(default_factory=dict)

    @property
    def n_experiences(self) -> int:
        """Number of experiences (tasks) in the stream."""
        return len(self.benchmark.train_stream)

    def classes_in_experience(self, index: int) -> list[int]:
        """Original class ids of experience `index` in task order (Avalanche's own
        `classes_in_this_experience` holds the same ids in set-iteration order)."""
        sizes = self.benchmark.n_classes_per_exp
        start = sum(sizes[:index])
        return list(self.class_order[start : start + sizes[index]])


def check_task_split(
    n_classes: int, init_class: int, increment: int, total_tasks: Optional[int] = None
) -> int:
    """Check that `init_class + increment * (tasks - 1) == n_classes`; return the task count.

    Args:
        n_classes: classes in the dataset.
        init_class: classes in the first task.
        increment: classes in every later task.
        total_tasks: if given, the task count the caller expects (e.g. a config's `total_tasks`).

    Returns:
        The number of experiences, `1 + (n_classes - init_class) // increment`.

    Raises:
        ValueError: the numbers do not add up; the message says which would.
    """
    if init_class < 1 or increment < 1:
        raise ValueError(f"init_class={init_class} and increment={increment} must both be >= 1.")
    rest = n_classes - init_class
    if rest < 0 or rest % increment != 0:
        divisors = [d for d in range(1, rest + 1) if rest % d == 0] if rest > 0 else []
        hint = (
            f"with init_class={init_class} the increment must divide {rest} (one of {divisors})"
            if divisors
            else f"init_class must be at most {n_classes}"
        )
        raise ValueError(
            f"init_class + increment * (tasks - 1) must equal the {n_classes} classes, but "
            f"init_class={init_class}, increment={increment} never do: {hint}."
        )
    n_experiences = 1 + rest // increment
    if total_tasks is not None and total_tasks != n_experiences:
        raise ValueError(
            f"total_tasks={total_tasks} does not fit: {init_class} + {increment} * "
            f"({total_tasks} - 1) = {init_class + increment * (total_tasks - 1)}, not the "
            f"{n_classes} classes; {n_classes} classes give {n_experiences} tasks."
        )
    return n_experiences


def check_class_order(order: Sequence[int], n_classes: int) -> list[int]:
    """Return `order` as a list of ints after checking it is a permutation of 0..n_classes-1."""
    try:
        order = [int(c) for c in order]
    except (TypeError, ValueError):
        raise ValueError(
            f"class_order must be a list of {n_classes} integer class ids, got {order!r}."
        ) from None
    if sorted(order) != list(range(n_classes)):
        missing = sorted(set(range(n_classes)) - set(order))[:5]
        extra = sorted({c for c in order if not 0 <= c < n_classes})[:5]
        repeated = sorted({c for c in order if order.count(c) > 1})[:5]
        raise ValueError(
            f"class_order must be a permutation of 0..{n_classes - 1} ({n_classes} ids), got "
            f"{len(order)} ids (missing {missing}, out of range {extra}, repeated {repeated})."
        )
    return order


def default_transform():
    """The transform used when a builder gets `None`: PIL image -> float tensor [3, H, W] in
    [0, 1], so batches collate. Pass CLIP's own preprocessing for real runs."""
    return transforms.ToTensor()


class BadImageError(ValueError):
    """An image file that cannot be read (corrupt, truncated, empty, not an image)."""


#: What PIL raises for a file it cannot decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'unreadable'}"


def _read_error(path: Path) -> Optional[str]:
    """Why the image at `path` cannot be decoded, or `None` when it can."""
    try:
        with Image.open(path) as image:
            image.load()
    except _DECODE_ERRORS as err:
        return _reason(err)
    return None


class ImageFileDataset(Dataset):
    """Images on disk with integer labels, in the form Avalanche reads (`targets` attribute).

    Item `i` is `(PIL RGB image, targets[i])`; Avalanche applies the stream's transforms.
    A file that cannot be decoded raises `BadImageError` naming it.
    """

    def __init__(self, paths: Sequence[Path], targets: Sequence[int]):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets.")
        self.paths = [Path(p) for p in paths]
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return to_rgb8(image), self.targets[index]  # 16-bit scaled, not clipped
        except _DECODE_ERRORS as err:
            raise BadImageError(
                f"cannot read image {path} ({_reason(err)}); replace or delete it, or pass "
                f"--skip-bad-images to leave unreadable files out"
            ) from None

    def without_unreadable(self) -> tuple["ImageFileDataset", list[Path]]:
        """A copy without the files that cannot be decoded, and those files' paths.

        Every file is decoded once (in threads: PIL releases the GIL while decoding).
        """
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            errors = list(pool.map(_read_error, self.paths))
        bad = [p for p, e in zip(self.paths, errors) if e is not None]
        if not bad:
            return self, []
        kept = [(p, t) for p, t, e in zip(self.paths, self.targets, errors) if e is None]
        return ImageFileDataset([p for p, _ in kept], [t for _, t in kept]), bad


_SKIP_UNREADABLE = False


@contextmanager
def skip_unreadable_images(enabled: bool = True) -> Iterator[None]:
    """While active (and `enabled`), `make_nc_benchmark` decodes every image of an
    `ImageFileDataset` once and leaves out the files that cannot be read, with one warning
    giving their count and the first paths (the CLI's `--skip-bad-images`)."""
    global _SKIP_UNREADABLE
    previous, _SKIP_UNREADABLE = _SKIP_UNREADABLE, bool(enabled) or _SKIP_UNREADABLE
    try:
        yield
    finally:
        _SKIP_UNREADABLE = previous


def _drop_unreadable(dataset):
    """`dataset` without unreadable image files when `skip_unreadable_images` is active."""
    if not (_SKIP_UNREADABLE and isinstance(dataset, ImageFileDataset)):
        return dataset
    kept, bad = dataset.without_unreadable()
    if bad:
        shown = ", ".join(str(p) for p in bad[:3])
        warnings.warn(
            f"--skip-bad-images: left out {len(bad)} unreadable image file(s) of "
            f"{len(dataset)}: {shown}{', ...' if len(bad) > 3 else ''}",
            stacklevel=3,
        )
    return kept


def list_images(folder: Path) -> list[Path]:
    """Image files (jpg, jpeg, png; any case) directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def make_nc_benchmark(
    train_dataset,
    test_dataset,
    class_order: list[int],
    init_class: int,
    increment: int,
    train_transform: Optional[Callable],
    eval_transform: Optional[Callable],
    class_names: Optional[Sequence[str]] = None,
):
    """Class-incremental benchmark over `class_order` with original class ids as targets."""
    n_experiences = check_task_split(len(class_order), init_class, increment)
    train_dataset, test_dataset = _drop_unreadable(train_dataset), _drop_unreadable(test_dataset)
    # nc_benchmark fails with a bare KeyError when a class has no test (or train) sample.
    for side, dataset in (("training", train_dataset), ("test", test_dataset)):
        targets = dataset.targets if hasattr(dataset, "targets") else dataset.tensors[1]
        empty = sorted(set(class_order) - {int(t) for t in targets})
        if empty:
            shown = [f"{c} ({class_names[c]})" if class_names else str(c) for c in empty[:5]]
            raise ValueError(
                f"Class(es) {', '.join(shown)} have no {side} image; every class needs at least "
                f"one training and one test image (add images or drop those classes)."
            )
    return nc_benchmark(
        train_dataset,
        test_dataset,
        n_experiences,
        task_labels=False,
        fixed_class_order=class_order,
        per_exp_classes={0: init_class} if init_class != increment else None,
        class_ids_from_zero_from_first_exp=False,
        class_ids_from_zero_in_each_exp=False,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


def describe_stream(benchmark, **fields) -> dict:
    """Protocol dict: the given fields plus per-experience classes and sizes read off the
    benchmark itself (so the record shows what was built, not what was asked for)."""
    train_stream, test_stream = benchmark.train_stream, benchmark.test_stream
    classes = benchmark.classes_in_experience["train"]
    return {
        **fields,
        "n_experiences": len(train_stream),
        "classes_per_experience": [len(classes[k]) for k in range(len(train_stream))],
        "train_sizes": [len(exp.dataset) for exp in train_stream],
        "test_sizes": [len(exp.dataset) for exp in test_stream],
        "train_size": sum(len(exp.dataset) for exp in train_stream),
        "test_size": sum(len(exp.dataset) for exp in test_stream),
    }
