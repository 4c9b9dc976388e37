"""Command line shared by ``experiments/run_split_cifar.py`` and ``run_imagenet_r.py``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from .checkpoint import CheckpointError
from .config import CLIPHingeConfig, ConfigError
from .experiment import RunError, print_summary, run_experiment
from .model.backbone import TINY_MODEL, BackboneError, CLIPBackbone, load_clip

#: Overrides of ``--preset smoke``: tiny random CLIP and the built-in synthetic stream.
SMOKE = {"dataset": "synthetic", "model_name": TINY_MODEL, "pretrained": None,
         "init_class": 4, "increment": 2, "total_tasks": 4, "init_epochs": 8, "epochs": 8,
         "batch_size": 16, "lr": 0.01, "init_lr": 0.01, "lr_decay_epochs": [6],
         "text_hard_pair_threshold": 0.5, "second_stage_epochs": 3, "eval_batch_size": 128,
         "class_order": "natural", "num_workers": 0}

StreamFactory = Callable[[argparse.Namespace, CLIPHingeConfig, CLIPBackbone], object]


def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    """The options of both experiment scripts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config,
                        help="JSON file of config keys (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (JSON value), repeatable: --set epochs=5")
    parser.add_argument("--data-root", default="data", help="dataset folder (default: data)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip tag (openai) or a local checkpoint file; overrides the "
                             "config's 'pretrained'")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if "
                                                       "available)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--output-dir", default=None, help="where results go (default: "
                                                           "runs/<config name>)")
    parser.add_argument("--preset", choices=["smoke"], default=None,
                        help="smoke: tiny random CLIP on the built-in synthetic stream, "
                             "offline, under a minute on 2 CPU cores")
    parser.add_argument("--download", action="store_true",
                        help="download the dataset when it is missing (needs internet)")
    parser.add_argument("--augment", action="store_true",
                        help="random-resized-crop training augmentation (off by default, as in "
                             "RAPF; turns the feature cache off)")
    parser.add_argument("--resume", action="store_true",
                        help="continue after the last complete experience in --output-dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --output-dir that holds a run")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: accept a checkpoint made with another config")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def resolve_config(args: argparse.Namespace) -> CLIPHingeConfig:
    """Config file, then the preset, then ``--set``, ``--pretrained`` and ``--seed``."""
    config = CLIPHingeConfig.from_json(args.config)
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
    """The synthetic stream of ``--preset smoke``, sized by the config's task layout."""
    from benchmarks import synthetic

    return synthetic(n_classes=config.n_classes, init_class=config.init_class,
                     increment=config.increment, train_per_class=30, test_per_class=15,
                     noise=0.25, seed=config.seed)


def main(argv: Optional[List[str]], description: str, default_config: str,
         stream_factory: StreamFactory,
         add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> int:
    """Parse, build the stream with the model's transforms, run, print the report.

    ``add_arguments`` adds a script's own options to the shared parser. Returns the process
    exit code; every expected failure prints one ``error:`` line.
    """
    parser = build_parser(description, default_config)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        import torch

        config = resolve_config(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        output_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)
        began = time.perf_counter()
        backbone = load_clip(config.model_name, config.pretrained, device=device)
        if args.preset == "smoke":
            bundle = smoke_stream(config)
        else:
            bundle = stream_factory(args, config, backbone)
        protocol = {"stream": bundle.protocol.get("name", config.dataset),
                    "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
        results = run_experiment(config, bundle, output_dir, backbone=backbone, device=device,
                                 resume=args.resume, overwrite=args.overwrite,
                                 force=args.force, wandb=args.wandb,
                                 interactive=not args.quiet, protocol=protocol)
    except (ConfigError, BackboneError, RunError, CheckpointError, FileNotFoundError,
            NotADirectoryError, PermissionError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(results)
    print(f"results: {output_dir / 'results.txt'} | TensorBoard: tensorboard --logdir "
          f"{output_dir / 'tb'} | this process: {time.perf_counter() - began:.1f} s")
    return 0
