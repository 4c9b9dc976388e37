"""Class-incremental stream builders for avalanche-cliphinge.

Every builder returns a `NamedBenchmark`: an Avalanche benchmark whose targets are the original
class ids, the class names indexed by those ids, the task order of the classes, and a
JSON-serialisable protocol record to store next to the results.
"""

from .cifar100 import CIFAR100_ORDERS, device_resize_transforms, split_cifar100
from .common import NamedBenchmark, check_task_split
from .image_folder import split_image_folder
from .imagenet_r import split_imagenet_r
from .imagenet_r_classes import IMAGENET_R_CLASS_NAMES, IMAGENET_R_WNIDS
from .synthetic import CLIP_MEAN, CLIP_STD, synthetic

__all__ = [
    "NamedBenchmark",
    "split_cifar100",
    "device_resize_transforms",
    "split_imagenet_r",
    "split_image_folder",
    "synthetic",
    "check_task_split",
    "CIFAR100_ORDERS",
    "IMAGENET_R_WNIDS",
    "IMAGENET_R_CLASS_NAMES",
    "CLIP_MEAN",
    "CLIP_STD",
]
