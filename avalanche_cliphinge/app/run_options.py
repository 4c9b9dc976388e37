"""What ``cliphinge run`` is asked: its options, its ``--preset``, and the config they make.

``build_parser`` holds the options of ``cliphinge run`` and of the experiment scripts;
``resolve_config`` turns them into a ``CLIPHingeConfig`` (config file or shipped preset, then
``--preset``, ``--set``, ``--pretrained``, ``--seed``); ``--preset smoke`` is ``SMOKE`` on the
stream of ``smoke_stream``. ``cli`` runs the request.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

# Only light modules here: --help, a bad request and a missing config file are answered
# without importing torch, open_clip or Avalanche (seconds); a run imports them as it starts.
from .datasets import add_dataset_arguments, class_order_ids
from ..config import TINY_MODEL, CLIPHingeConfig, ConfigError, list_presets
from ..errors import DEFAULT_TIMEOUT_MINUTES

#: The values of ``--preset``.
RUN_PRESETS = ("smoke",)
#: What each ``--preset`` runs (``--help`` and ``cliphinge presets``).
RUN_PRESET_NOTES = {
    "smoke": "tiny random CLIP on the built-in synthetic stream, offline, under a minute on "
    "2 CPU cores (--set changes it further)",
}
#: Overrides of ``--preset smoke``: tiny random CLIP and the built-in synthetic stream.
SMOKE = {
    "dataset": "synthetic",
    "model_name": TINY_MODEL,
    "pretrained": None,
    "init_class": 4,
    "increment": 2,
    "total_tasks": 4,
    "init_epochs": 8,
    "epochs": 8,
    "batch_size": 16,
    "lr": 0.01,
    "init_lr": 0.01,
    "lr_decay_epochs": [6],
    "text_hard_pair_threshold": 0.5,
    "second_stage_epochs": 3,
    "eval_batch_size": 128,
    "class_order": "natural",
    "num_workers": 0,
    "resize_on_device": False,
}


def build_parser(
    description: str, default_config: str, prog: Optional[str] = None
) -> argparse.ArgumentParser:
    """The options of ``cliphinge run`` and of the experiment scripts."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=default_config,
        help="a shipped preset (listed below) or a JSON file of config keys (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, repeatable; the value is read as JSON "
        '(5, 0.1, true, null, [4, 10], "text") and otherwise taken as '
        "a string: --set epochs=5 --set pretrained=null",
    )
    parser.add_argument("--data-root", default="data", help="dataset folder (default: data)")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag (openai) or a local checkpoint file; overrides the "
        "config's 'pretrained'",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    seeds.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="one run per seed, one after the other, each in "
        "<output-dir>/seed_<SEED> and each resumable; combine them with "
        "cliphinge aggregate",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where results go (default: runs/<config name>, runs/smoke with --preset smoke, "
        "runs/<folder name> with --image-folder)",
    )
    parser.add_argument(
        "--preset",
        choices=RUN_PRESETS,
        default=None,
        help="; ".join(f"{name}: {note}" for name, note in RUN_PRESET_NOTES.items()),
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download the dataset when it is missing (needs internet)",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out image files that cannot be read (one warning with "
        "their count and the first paths) instead of stopping at the "
        "first; reads every image once before the run",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="random-resized-crop training augmentation (off by default, as in "
        "RAPF; turns the feature cache off)",
    )
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue after the last complete experience in --output-dir "
        "(from its newest readable checkpoint)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --output-dir that holds a run (deletes its "
        "results, logs and checkpoints)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept a checkpoint made with another config",
    )
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars and no per-epoch metric lines"
    )
    parser.add_argument(
        "--progress-only",
        action="store_true",
        help="progress bars (each cleared when done) but no per-epoch or per-evaluation "
        "metric lines: the console shows one line per task and the summary (log.txt keeps "
        "every metric)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the cores this process may use, at "
        "most 8, shared out among torchrun's processes on the machine; "
        "1 on a machine with 2 cores or fewer)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=_positive_minutes,
        default=DEFAULT_TIMEOUT_MINUTES,
        metavar="MINUTES",
        help="under torchrun: how long a process waits for the others before "
        "the run stops with an error (default: %(default)s)",
    )
    add_dataset_arguments(parser)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error instead of one line",
    )
    return parser


def presets_epilog() -> str:
    """The shipped presets, one line each, for ``--help``."""
    width = max(map(len, list_presets()))
    lines = [f"  {name:<{width}}  {note.split(':')[0]}" for name, note in list_presets().items()]
    return "shipped presets (--config NAME):\n" + "\n".join(lines)


def _positive_minutes(text: str) -> float:
    """``--dist-timeout``'s value: a positive number of minutes."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of minutes")
    return value


def resolve_config(args: argparse.Namespace) -> CLIPHingeConfig:
    """Config file, then the preset, then ``--set``, ``--pretrained`` and ``--seed``."""
    try:
        config = CLIPHingeConfig.from_json(args.config)
    except ConfigError:
        if args.config not in RUN_PRESETS or Path(args.config).exists():
            raise
        raise ConfigError(  # `--config smoke`: the option meant is --preset
            f"config '{args.config}' is neither a file nor a shipped preset of --config; "
            f"'{args.config}' is a --preset: pass --preset {args.config} instead of --config "
            f"{args.config} (--config presets: {', '.join(list_presets())})"
        ) from None
    if args.preset == "smoke":
        config = config.replace(**SMOKE)
    config = config.with_overrides(args.set)
    if args.pretrained is not None:
        config = config.replace(pretrained=args.pretrained)
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    if args.augment:
        config = config.replace(cache_features=False)
    return config


def smoke_stream(config: CLIPHingeConfig):
    """The synthetic stream of ``--preset smoke``, sized by the config's task layout and in
    its class order (``natural``, ``random:<seed>`` or a list of class ids; the CIFAR-100
    orders are refused)."""
    from ..benchmarks import synthetic

    order = class_order_ids(config.class_order, config.n_classes)
    if isinstance(order, str):
        raise ConfigError(
            f"class_order '{order}' is a CIFAR-100 order; the smoke stream has "
            f"{config.n_classes} classes: use 'natural' or a list of its class "
            "ids"
        )
    return synthetic(
        n_classes=config.n_classes,
        init_class=config.init_class,
        increment=config.increment,
        train_per_class=30,
        test_per_class=15,
        noise=0.25,
        seed=config.seed,
        class_order=order,
    )
