"""What a stream must serve, and how the strategy brings any Avalanche stream to CLIP's input.

A stream may serve PIL images, uint8 tensors ``[3, h, w]``, float tensors in ``[0, 1]`` of any
size, or CLIP's own input (what the backbone's eval transform makes: ``[3, S, S]`` normalised
with CLIP's mean and std). ``ClipInput`` turns each item into what the model reads, the same
way as the package's own stream builders (PIL bicubic resize, centre crop, CLIP's mean/std).
Float tensors normalised with other statistics (Avalanche's default CIFAR transforms, for
instance) are refused: their pixels cannot be recovered without knowing the statistics.

Also here: the transforms to give one's own Avalanche benchmark (``stream_transforms``), class
names for a benchmark (``class_names_for``) and its task layout (``task_layout``). The checks
on a dataset's transforms (random ones, a foreign ``Normalize``) and their freezing are in
``dataset_transforms``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

from .dataset_transforms import walk_transforms

#: OpenAI CLIP's normalisation, used when a backbone's transform names none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

STREAM_FIX = (
    "serve PIL images or [0, 1] tensors (transforms.ToTensor() only, no Normalize), or "
    "use avalanche_cliphinge.stream_transforms(...)"
)


class StreamInputError(ValueError):
    """An item the strategy cannot bring to CLIP's input (normalised by someone else)."""


def clip_mean_std(backbone) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` of the ``Normalize`` step of ``backbone.eval_transform`` (CLIP's default)."""
    for step in walk_transforms(backbone.eval_transform):
        if isinstance(step, transforms.Normalize):
            return tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
    return CLIP_MEAN, CLIP_STD


#: PIL modes with more than 8 bits per pixel, which ``convert("RGB")`` clips instead of scaling.
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def to_rgb8(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB PIL image of ``image``, pixels of deeper modes scaled, not clipped.

    PIL's ``convert("RGB")`` clips 16-bit (``I;16``), 32-bit integer (``I``) and float
    (``F``) grey levels to 0..255, which turns a 16-bit image white. Here 16-bit values, and
    ``I`` values within 0..65535 (16-bit files open as ``I`` in older Pillow), are divided by
    257 and ``F`` values in ``[0, 1]`` multiplied by 255, then rounded: a 16-bit image saved as
    ``value * 257`` gives exactly its 8-bit twin. Other modes go through ``convert("RGB")``
    (a copy for an RGB image: the result outlives the file ``image`` was opened from).
    ``ClipInput``, ``cliphinge predict`` and the package's image-file datasets all read PIL
    images through this function.

    Raises:
        StreamInputError: float pixels that are NaN or Inf or outside ``[0, 1]``, or integer
            pixels outside 0..65535 (their range cannot be told); one line saying what to do.
    """
    if image.mode not in DEEP_MODES:
        return image.convert("RGB")
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if values.size == 0:
        return Image.new("RGB", image.size)
    fix = "save the image with 8 or 16 bits per channel"
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise StreamInputError(
                f"a float image (PIL mode F) with non-finite pixel values (NaN or Inf); "
                f"replace them, or {fix}"
            )
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise StreamInputError(
                f"a float image (PIL mode F) with values in [{low:.3g}, {high:.3g}]; float "
                f"pixels must lie in [0, 1]: rescale them, or {fix}"
            )
        values = values * 255.0
    else:
        low, high = int(values.min()), int(values.max())
        if image.mode == "I" and (low < 0 or high > 65535):
            raise StreamInputError(
                f"a 32-bit integer image (PIL mode I) with values in [{low}, {high}], beyond "
                f"16 bits (0..65535), so its white level is unknown; {fix}"
            )
        values = values / 257.0
    return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")


class ClipInput:
    """Per-item conversion of what a stream serves into what ``CLIPHingeModel`` reads.

    Without ``resize_on_device`` the output is CLIP's input ``[3, S, S]``, made by
    ``eval_transform`` (the backbone's: bicubic resize, centre crop, CLIP's mean/std) from a
    PIL image; uint8 tensors and ``[0, 1]`` float tensors are turned into that PIL image
    first (floats rounded to 8 bits, lossless for ``ToTensor`` output). With
    ``resize_on_device`` the output is an unnormalised image (uint8 ``[3, h, w]`` or float in
    ``[0, 1]``) that the model resizes and normalises on its device. A float tensor already
    normalised with CLIP's mean and std at ``[3, S, S]`` passes (de-normalised for the device
    path); any other float tensor outside ``[0, 1]`` raises ``StreamInputError``.

    Args:
        eval_transform: the backbone's eval transform (PIL -> normalised ``[3, S, S]``).
        size: ``S``, the backbone's input side in pixels.
        mean, std: CLIP's normalisation (3 values each).
        resize_on_device: see above.
    """

    def __init__(
        self,
        eval_transform: Callable,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize_on_device: bool = False,
    ):
        self.eval_transform, self.size = eval_transform, int(size)
        self.resize_on_device = resize_on_device
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def for_backbone(cls, backbone, resize_on_device: bool = False) -> "ClipInput":
        """The conversion for a ``CLIPBackbone``."""
        mean, std = clip_mean_std(backbone)
        return cls(backbone.eval_transform, backbone.image_size, mean, std, resize_on_device)

    def is_clip_input(self, x: Tensor) -> bool:
        """Whether float ``x`` is ``[3, S, S]`` with every channel in CLIP's normalised range."""
        if tuple(x.shape) != (3, self.size, self.size):
            return False
        low, high = (0 - self.mean) / self.std, (1 - self.mean) / self.std
        flat = x.reshape(3, -1)
        return bool(
            (flat.amin(1) >= low.flatten() - 1e-3).all()
            and (flat.amax(1) <= high.flatten() + 1e-3).all()
        )

    def __call__(self, x):
        if isinstance(x, Image.Image):
            if x.mode != "RGB":
                x = to_rgb8(x)  # 16-bit, 32-bit and float modes scaled, not clipped
            if self.resize_on_device:
                return transforms.functional.pil_to_tensor(x)
            return self.eval_transform(x)
        if not isinstance(x, Tensor):
            raise StreamInputError(f"the stream serves {type(x).__name__} items; {STREAM_FIX}")
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise StreamInputError(
                f"the stream serves tensors of shape {tuple(x.shape)}, not "
                f"images [3, h, w]; {STREAM_FIX}"
            )
        if x.dtype == torch.uint8:
            return x if self.resize_on_device else self.eval_transform(to_pil_image(x))
        x = x.float()
        low, high = float(x.min()), float(x.max())  # NaN when any pixel is NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            raise StreamInputError(
                "the stream serves a float image with non-finite pixel values (NaN or Inf); "
                "repair or drop such items (a transform dividing by zero?), then serve [0, 1] "
                "values"
            )
        if low >= 0.0 and high <= 1.0:
            if self.resize_on_device:
                return x
            return self.eval_transform(to_pil_image((x * 255).round().to(torch.uint8)))
        if self.is_clip_input(x):
            return (x * self.std + self.mean).clamp(0, 1) if self.resize_on_device else x
        raise StreamInputError(
            f"the stream serves float images with values in [{low:.3g}, "
            f"{high:.3g}], normalised by someone else; {STREAM_FIX}"
        )


def check_item_labels(dataset, where: str) -> None:
    """Refuse a dataset whose items carry other class ids than its ``targets``.

    The strategy reads labels from the items (Avalanche's minibatches) and the metrics
    compare them with the scores' class ids, so items and ``targets`` must agree; the first,
    middle and last items are read.

    Raises:
        StreamInputError: an item's label differs from ``targets``, or ``ClipInput``
            refuses one of the items read (one line, naming the item and its class).
    """
    targets = getattr(dataset, "targets", None)
    n = len(dataset)
    if targets is None or n == 0:
        return
    for index in sorted({0, n // 2, n - 1}):
        target = int(targets[index])
        try:
            item = dataset[index]
        except StreamInputError as err:  # ClipInput sees one item: say which
            raise StreamInputError(f"{where}: item {index} (class {target}): {err}") from None
        label = int(torch.as_tensor(item[1]))
        if label != target:
            raise StreamInputError(
                f"{where}: item {index} carries class id {label} but the dataset's targets "
                f"say {target}; a transform changes the labels: give the benchmark's own "
                "datasets, or apply class remapping through the benchmark"
            )


def stream_transforms(
    backbone, *, augment: bool = False, resize_on_device: bool = False
) -> Tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` to give one's own Avalanche benchmark.

    The stream then serves what the package's own builders serve: CLIP's input (the
    backbone's eval transform) or, with ``resize_on_device``, uint8 tensors the model resizes
    on its device. ``augment`` makes the training transform the backbone's random training
    preprocessing (or a light random crop on the device path), which turns the feature cache
    off for training. ``backbone`` is a ``CLIPBackbone``, a ``CLIPHingeModel``, a
    ``CLIPHingeStrategy`` or an open_clip architecture name (e.g. ``"ViT-B-16-quickgelu"``;
    its transforms do not depend on the weights, so none are loaded).
    """
    if isinstance(backbone, str):
        from .model.backbone import load_clip

        backbone = load_clip(backbone, pretrained=None)
    backbone = getattr(getattr(backbone, "model", backbone), "backbone", backbone)
    if resize_on_device:
        eval_tf = transforms.PILToTensor()
        train_tf = (
            transforms.Compose(
                [transforms.RandomResizedCrop(backbone.image_size, scale=(0.9, 1.0)), eval_tf]
            )
            if augment
            else eval_tf
        )
        return train_tf, eval_tf
    return (
        backbone.train_transform if augment else backbone.eval_transform,
        backbone.eval_transform,
    )


def task_layout(benchmark) -> Dict[str, int]:
    """``{"init_class", "increment", "total_tasks"}`` of a class-incremental benchmark.

    Read off its training experiences (``classes_in_this_experience``), for
    ``CLIPHingeConfig(**task_layout(benchmark), ...)``. The strategy still checks every
    experience against the config, so a stream and a config that disagree stay an error.

    Raises:
        ValueError: the tasks after the first differ in size (the config's layout is
            ``init_class`` then ``increment`` classes per task).
    """
    sizes = [len(set(exp.classes_in_this_experience)) for exp in benchmark.train_stream]
    later = sorted(set(sizes[1:]))
    if len(later) > 1:
        raise ValueError(
            f"the stream's tasks have {sizes} classes: after the first, every "
            "task must have the same number (increment)"
        )
    return {
        "init_class": sizes[0],
        "increment": later[0] if later else sizes[0],
        "total_tasks": len(sizes),
    }


def _find_classes(source, depth: int = 0) -> Optional[List[str]]:
    """The ``classes`` list of ``source`` or of a dataset nested in it (Avalanche, Subset)."""
    if source is None or depth > 12:
        return None
    classes = getattr(source, "classes", None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    for name in ("original_train_dataset", "_flat_data", "dataset"):
        found = _find_classes(getattr(source, name, None), depth + 1)
        if found is not None:
            return found
    for child in getattr(source, "_datasets", None) or []:
        found = _find_classes(child, depth + 1)
        if found is not None:
            return found
    return None


def class_names_for(source, benchmark=None) -> Union[List[str], Dict[int, str]]:
    """Class names for ``CLIPHingeStrategy(class_names=...)``, underscores read as spaces.

    Args:
        source: an Avalanche benchmark built from a dataset with ``classes`` (the classic
            ``SplitCIFAR100``, ``SplitCIFAR10``, ``SplitFMNIST``... or ``nc_benchmark`` over a
            torchvision dataset), a dataset with ``classes``, or a list of names indexed by
            the dataset's original class ids.
        benchmark: the benchmark whose class ids the names must follow, when ``source`` is
            not the benchmark itself.

    Returns:
        A list indexed by class id, or, when the benchmark remapped the class ids
        (``class_ids_from_zero_from_first_exp`` and the like), a dict ``{stream id: name}``.

    Raises:
        ValueError: no class names could be found; the message says what to pass.
    """
    names = list(source) if isinstance(source, (list, tuple)) else _find_classes(source)
    if names is None:
        raise ValueError(
            f"no class names found in {type(source).__name__}; pass a dataset "
            "with a 'classes' list or the names themselves"
        )
    names = [str(n).replace("_", " ") for n in names]
    benchmark = source if benchmark is None and not isinstance(source, (list, tuple)) else benchmark
    mapping = getattr(benchmark, "class_mapping", None)
    if not mapping or list(mapping) == list(range(len(mapping))):
        return names
    return {int(new): names[old] for old, new in enumerate(mapping) if int(new) >= 0}
