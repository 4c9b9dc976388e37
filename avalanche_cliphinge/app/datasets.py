"""The streams a run builds, chosen by the config's ``dataset``: CIFAR-100, ImageNet-R or an
image folder (``synthetic`` is the smoke preset's, built in ``cli``). An image folder's config
is fitted to the folder first (``fit_image_folder``: layout, class order, resizing).

Each dataset has a check, run before CLIP loads so a missing folder fails at once, and a
factory that builds the stream with the backbone's transforms.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from ..config import (
    CLIPHingeConfig,
    ConfigError,
    resolve_config_path,
)
from ..config_checks import random_order_seed

if TYPE_CHECKING:  # imports torch and open_clip: not for the command line's parser
    from ..model.backbone import CLIPBackbone

CIFAR_FOLDER = "cifar-100-python"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
#: Config keys of the task layout.
LAYOUT_KEYS = ("init_class", "increment", "total_tasks")
#: Class orders named after a dataset's published order (not of an arbitrary folder).
NAMED_ORDERS = ("icarl", "rapf", "pycil")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that only some datasets read."""
    parser.add_argument(
        "--split-list",
        default=None,
        help="ImageNet-R: a folder holding train.txt and test.txt "
        "('relative/path label' lines), or RAPF's "
        "imgr_train_test_split.txt ('train', paths, 'test', paths); "
        "default: seeded 80/20 split per class",
    )
    parser.add_argument(
        "--image-folder",
        default=None,
        metavar="PATH",
        help="run on your own images: PATH/<class>/*.jpg (each class split 80/20 with the "
        "seed) or PATH/{train,test}/<class>/*.jpg; the same as --set dataset=image_folder "
        "--data-root PATH. Unless set, the tasks hold the config's increment of classes "
        "(the first one also the remainder; half the classes where that leaves one task) "
        "and the class order is natural (sorted folder names): --set increment=3, "
        "--set class_order=random:0",
    )


def class_order_ids(order: Any, n_classes: int) -> Any:
    """A config's ``class_order`` as the stream builders take it: ``None`` for ``natural``
    (ascending ids), ``numpy.random.RandomState(seed).permutation(n_classes)`` as a list for
    ``random:<seed>``, anything else (a named order, a list) unchanged."""
    if order == "natural":
        return None
    seed = random_order_seed(order)
    if seed is not None:
        import numpy as np

        return np.random.RandomState(seed).permutation(n_classes).tolist()
    return order


def given_keys(config_name: str, assignments: Iterable[str]) -> Set[str]:
    """Config keys the request itself sets for an image folder: the ``--set`` keys and, when
    the config file is an image-folder config (``"dataset": "image_folder"``), every key it
    holds. The other values (a preset's CIFAR-100 layout...) are defaults a folder may
    replace."""
    keys = {item.split("=", 1)[0].strip() for item in assignments if "=" in item}
    try:
        values = json.loads(resolve_config_path(config_name).read_text(encoding="utf-8"))
    except (ConfigError, OSError, ValueError, RecursionError):
        values = None
    if isinstance(values, dict) and values.get("dataset") == "image_folder":
        keys |= set(values)
    return keys


def fit_config_to_data(args: argparse.Namespace, config: CLIPHingeConfig) -> CLIPHingeConfig:
    """The request's config fitted to its data: ``--image-folder PATH`` is ``--set
    dataset=image_folder --data-root PATH``, and an image folder's config is
    ``fit_image_folder``'s. Other datasets' configs are returned as they are."""
    folder = getattr(args, "image_folder", None)
    if folder is not None:
        args.data_root = folder
        config = config.replace(dataset="image_folder")
    if config.dataset != "image_folder":
        return config
    return fit_image_folder(
        config,
        args.data_root,
        given_keys(args.config, args.set),
        where="pass your folder with --image-folder PATH",
    )


def _auto_layout(n_classes: int, increment: int) -> Dict[str, int]:
    """Tasks of ``increment`` classes, the first one also taking the remainder."""
    return {
        "init_class": increment + n_classes % increment,
        "increment": increment,
        "total_tasks": n_classes // increment,
    }


def image_folder_layout(
    n_classes: int, config: CLIPHingeConfig, given: Set[str]
) -> Tuple[Optional[Dict[str, int]], Dict[str, int]]:
    """``(layout, automatic layout)`` of ``n_classes`` folders: ``init_class``, ``increment``
    and ``total_tasks``.

    The layout keys in ``given`` are kept; the others are filled so that
    ``init_class + increment * (total_tasks - 1) == n_classes``. With none given: tasks of
    the config's ``increment`` classes (``n_classes // 2`` when it leaves fewer than two
    tasks), the first task taking the remainder (7 classes by 2: 3 + 2 + 2). The layout is
    ``None`` when the given keys cannot add up; the automatic one is what none given gives.
    """
    n = n_classes
    fallback = config.increment if config.increment and 2 * config.increment <= n else n // 2
    fallback = max(1, fallback)
    auto = _auto_layout(n, fallback)
    init, inc, tasks = (getattr(config, k) if k in given else None for k in LAYOUT_KEYS)
    layout: Optional[Dict[str, int]] = None
    if init is None and inc is None and tasks is None:
        layout = auto
    elif init is None and tasks is None:
        layout = _auto_layout(n, inc) if inc <= n else None
    elif init is None and inc is None:
        if tasks <= n:
            step = n // tasks
            layout = {"init_class": n - step * (tasks - 1), "increment": step, "total_tasks": tasks}
    elif inc is None and tasks is None:
        rest = n - init
        if rest == 0:
            layout = {"init_class": init, "increment": fallback, "total_tasks": 1}
        elif rest > 0:  # the largest increment up to the fallback that divides the rest
            step = max(d for d in range(1, min(fallback, rest) + 1) if rest % d == 0)
            layout = {"init_class": init, "increment": step, "total_tasks": 1 + rest // step}
    elif tasks is None:
        rest = n - init
        if rest >= 0 and rest % inc == 0:
            layout = {"init_class": init, "increment": inc, "total_tasks": 1 + rest // inc}
    elif inc is None:
        rest = n - init
        if tasks == 1 and rest == 0:
            layout = {"init_class": init, "increment": fallback, "total_tasks": 1}
        elif tasks > 1 and rest > 0 and rest % (tasks - 1) == 0:
            layout = {"init_class": init, "increment": rest // (tasks - 1), "total_tasks": tasks}
    elif init is None:
        if n - inc * (tasks - 1) >= 1:
            layout = {"init_class": n - inc * (tasks - 1), "increment": inc, "total_tasks": tasks}
    elif init + inc * (tasks - 1) == n:
        layout = {"init_class": init, "increment": inc, "total_tasks": tasks}
    return layout, auto


def fit_image_folder(
    config: CLIPHingeConfig, root: str | Path, given: Set[str], where: str = ""
) -> CLIPHingeConfig:
    """``config`` fitted to the image folder ``root``, read without opening an image.

    What the request did not set (``given``: ``given_keys``) follows the folder: the task
    layout (``image_folder_layout``), ``class_order`` (a CIFAR-100 or ImageNet-R order, or a
    list that is not a permutation of the folder's classes, becomes ``natural``) and
    ``resize_on_device`` (false: images of any size). What the request set and the folder
    cannot take is refused in ONE ``ConfigError`` listing every change to make.

    Raises:
        ConfigError: the folder is missing or holds no class folder (``where`` says how to
            name another), or set values that do not fit it.
    """
    from ..folders import find_image_folder_layout

    root = Path(root).expanduser()
    try:
        kind, folders = find_image_folder_layout(root)
    except FileNotFoundError as err:
        raise ConfigError(f"{err}; {where}" if where else str(err)) from None
    n = len(folders)
    problems: List[str] = []
    changes: Dict[str, Any] = {}
    if config.resize_on_device:
        if "resize_on_device" in given:
            problems.append(
                "resize_on_device=true resizes CIFAR's 32-px tensors on the device, but a "
                "folder's images come in any size: --set resize_on_device=false"
            )
        else:
            changes["resize_on_device"] = False
    order = config.class_order
    named = isinstance(order, str) and order in NAMED_ORDERS
    wrong_list = isinstance(order, list) and sorted(order) != list(range(n))
    if named or wrong_list:
        if "class_order" not in given:
            changes["class_order"] = "natural"
        else:
            what = (
                f"class_order '{order}' is a published order of another dataset"
                if named
                else f"class_order {_short(order)} is not a permutation of 0..{n - 1}"
            )
            problems.append(
                f"{what}; a folder takes natural (sorted folder names: "
                f"{_short([f'{i}={name}' for i, name in enumerate(folders)])}), "
                f"random:<seed> or a list of its {n} class ids: --set class_order=natural"
            )
    if n < 2:
        problems.append(
            f"it holds {n} class folder ({folders[0]}); a class-incremental run needs at least "
            "2: add class folders"
        )
    else:
        layout, auto = image_folder_layout(n, config, given)
        if layout is None:
            set_here = ", ".join(f"{k}={getattr(config, k)}" for k in LAYOUT_KEYS if k in given)
            problems.append(
                f"{set_here} cannot split its {n} classes (init_class + increment * "
                f"(total_tasks - 1) must be {n}): leave the layout out to read it off the "
                f"folder ({', '.join(f'{k}={v}' for k, v in auto.items())}) or set values that "
                f"add up to {n}"
            )
        else:
            changes.update(layout)
    if problems:
        listed = (
            problems[0]
            if len(problems) == 1
            else "; ".join(f"({i}) {text}" for i, text in enumerate(problems, 1))
        )
        raise ConfigError(f"image folder {root} ({n} classes, {kind}): {listed}")
    return config.replace(**changes)


def _short(items: Sequence[Any], most: int = 6) -> str:
    """``[a, b, c, ...]``: at most ``most`` items of a list, for one-line messages."""
    shown = ", ".join(str(x) for x in items[:most])
    return f"[{shown}{', ...' if len(items) > most else ''}]"


def _train_transform(args, backbone: CLIPBackbone):
    return backbone.train_transform if args.augment else backbone.eval_transform


def check_cifar_files(args, config: CLIPHingeConfig) -> None:
    """``<data-root>/cifar-100-python/{train,test,meta}`` exist (or ``--download``)."""
    if args.download:
        return
    root = Path(args.data_root).expanduser()
    folder = root / CIFAR_FOLDER
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected {folder}/{{train,test,meta}} (missing "
            f"{', '.join(missing)}); add --download on a machine with internet, or extract "
            f"{CIFAR_URL} into {root}"
        )


def cifar_stream(args, config: CLIPHingeConfig, backbone: CLIPBackbone):
    """Avalanche's SplitCIFAR100 (or nc_benchmark for unequal tasks) with CLIP's transforms."""
    from ..benchmarks import device_resize_transforms, split_cifar100

    order = class_order_ids(config.class_order, 100)
    order = list(range(100)) if order is None else order
    train_tf, eval_tf = _train_transform(args, backbone), backbone.eval_transform
    if config.resize_on_device:
        # 32-px uint8 tensors; the model resizes to its input size and normalises on its device
        train_tf, eval_tf = device_resize_transforms(args.augment)
    return split_cifar100(
        args.data_root,
        init_class=config.init_class,
        increment=config.increment,
        class_order=order,
        train_transform=train_tf,
        eval_transform=eval_tf,
        download=args.download,
    )


def check_imagenet_r_files(args, config: CLIPHingeConfig) -> None:
    """Class folders under ``--data-root`` and, when given, the ``--split-list`` files."""
    from ..benchmarks import IMAGENET_R_WNIDS

    root = Path(args.data_root).expanduser()
    if not any(
        (folder / wnid).is_dir()
        for folder in (root / "imagenet-r", root)
        for wnid in IMAGENET_R_WNIDS
    ):
        raise FileNotFoundError(
            f"ImageNet-R not found: expected {root}/imagenet-r/<wnid>/*.jpg (class folders "
            f"such as n01443537); download {IMAGENET_R_URL} and extract it into {root}"
        )
    if args.split_list is not None and not Path(args.split_list).is_file():
        lists = [Path(args.split_list) / name for name in ("train.txt", "test.txt")]
        missing = [str(p) for p in lists if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"--split-list {args.split_list} lacks {', '.join(missing)}: pass a folder "
                "holding train.txt and test.txt ('imagenet-r/<wnid>/<file> <label>' lines) or "
                "RAPF's imgr_train_test_split.txt file"
            )


def imagenet_r_stream(args, config: CLIPHingeConfig, backbone: CLIPBackbone):
    """ImageNet-R with CLIP's transforms and the requested split."""
    if config.resize_on_device:
        raise ValueError(
            "resize_on_device needs images of one size (CIFAR); ImageNet-R images "
            "differ in size: --set resize_on_device=false"
        )
    from ..benchmarks import split_imagenet_r

    order = class_order_ids(config.class_order, config.n_classes)
    return split_imagenet_r(
        args.data_root,
        init_class=config.init_class,
        increment=config.increment,
        split=args.split_list or "seeded",
        seed=config.seed,
        class_order=order,
        train_transform=_train_transform(args, backbone),
        eval_transform=backbone.eval_transform,
    )


def check_image_folder(args, config: CLIPHingeConfig) -> None:
    """``<data-root>/<class>/`` or ``<data-root>/{train,test}/<class>/`` folders exist."""
    from ..folders import find_image_folder_layout

    find_image_folder_layout(args.data_root)


def image_folder_stream(args, config: CLIPHingeConfig, backbone: CLIPBackbone):
    """Any ``<class>/*`` or ``{train,test}/<class>/*`` tree (class ids: sorted folder names;
    a folder per class is split 80/20 per class with the config's seed)."""
    from ..benchmarks import split_image_folder

    if config.resize_on_device:
        raise ValueError(
            "resize_on_device needs images of one size; an image folder may hold "
            "any size: --set resize_on_device=false"
        )
    if isinstance(config.class_order, str) and config.class_order in NAMED_ORDERS:
        raise ConfigError(
            f"class_order '{config.class_order}' is a CIFAR-100 order; an image folder takes "
            "'natural' (sorted folder names), 'random:<seed>' or a list of class ids"
        )
    return split_image_folder(
        args.data_root,
        init_class=config.init_class,
        increment=config.increment,
        class_order=class_order_ids(config.class_order, config.n_classes),
        train_transform=_train_transform(args, backbone),
        eval_transform=backbone.eval_transform,
        seed=config.seed,
    )


StreamFactory = Callable[[argparse.Namespace, CLIPHingeConfig, "CLIPBackbone"], object]
DataCheck = Callable[[argparse.Namespace, CLIPHingeConfig], None]

#: ``dataset`` config value -> (its check, its stream factory).
DATASETS: Dict[str, Tuple[DataCheck, StreamFactory]] = {
    "cifar100": (check_cifar_files, cifar_stream),
    "imagenet_r": (check_imagenet_r_files, imagenet_r_stream),
    "image_folder": (check_image_folder, image_folder_stream),
}


def dataset_entry(config: CLIPHingeConfig) -> Tuple[DataCheck, StreamFactory]:
    """The check and factory of ``config.dataset``; ``ConfigError`` for an unknown one."""
    if config.dataset not in DATASETS:
        raise ConfigError(
            f"dataset '{config.dataset}' has no stream builder; use one of "
            f"{', '.join(DATASETS)} (--set dataset=...), or --preset smoke"
        )
    return DATASETS[config.dataset]
