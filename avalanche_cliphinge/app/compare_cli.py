"""``cliphinge compare`` and ``experiments/compare.py``: the options and the command.

Only light modules at the top: ``--help`` and a refused request (unknown names, bad settings)
are answered without importing torch or Avalanche; a run imports them as it starts
(``compare_runs``, ``compare_report``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from ..config import CLIPHingeConfig, ConfigError
from ..errors import BackboneError
from . import process
from .comparison import (
    ABLATIONS,
    DEFAULT_STRATEGIES,
    BaselineSettings,
    CompareError,
    did_you_mean,
    resolve_entries,
    strategy_names,
)
from .datasets import DATASETS, fit_image_folder, given_keys

if TYPE_CHECKING:
    from ..model.backbone import CLIPBackbone

BENCHMARKS = ("split_cifar100", "imagenet_r", "image_folder", "smoke")
DEFAULT_CONFIGS = {
    "split_cifar100": "cifar100_b0_inc10",
    "imagenet_r": "imagenet_r_b0_inc20",
    "image_folder": "cifar100_b0_inc10",
    "smoke": "cifar100_b0_inc10",
}
#: ``--benchmark`` -> the ``dataset`` of its stream builder (``app.datasets``).
BENCHMARK_DATASETS = {
    "split_cifar100": "cifar100",
    "imagenet_r": "imagenet_r",
    "image_folder": "image_folder",
}


# ---- command line ---------------------------------------------------------------------------
def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Options of ``cliphinge compare`` and ``experiments/compare.py`` (``prog``: the name in
    the usage line; default the script's)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="CLIPHingeStrategy, its ablations, Avalanche baselines, the CLIP "
        "baselines (SimpleCIL, CoOp, RAPF, joint upper bounds) and zero-shot CLIP on one "
        "stream with one frozen CLIP: one table, one plot, TensorBoard runs.",
    )
    parser.add_argument(
        "--benchmark",
        required=True,
        metavar="|".join(BENCHMARKS),
        help="smoke: tiny random CLIP on the synthetic stream, offline; image_folder: "
        "your own images, --data-root PATH holding PATH/<class>/*.jpg (or "
        "PATH/{train,test}/<class>/*.jpg), the task layout and class order read from "
        "the folder unless --set",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(DEFAULT_STRATEGIES),
        metavar="NAME",
        help=f"entries among {', '.join(strategy_names())} (default: %(default)s)",
    )
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=list(ABLATIONS),
        metavar="NAME",
        help=f"CLIPHinge ablations among {', '.join(ABLATIONS)}; 'none' or no "
        "name for none (default: all)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds (default: the config's seed); mean ± std over several",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where the table, plot and TensorBoard runs go (default: runs/compare_<benchmark>)",
    )
    parser.add_argument("--data-root", default="data", help="dataset folder (default: data)")
    parser.add_argument(
        "--split-list",
        default=None,
        help="imagenet_r: folder with train.txt / test.txt (default: seeded 80/20 split)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="split_cifar100: download CIFAR-100 when missing (needs internet)",
    )
    parser.add_argument(
        "--pretrained", default=None, help="open_clip tag or local checkpoint; overrides the config"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a shipped preset name or a JSON config file (default: "
        "cifar100_b0_inc10, or imagenet_r_b0_inc20 for ImageNet-R)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (JSON value), repeatable; "
        "baseline.<key>=... sets a baseline setting (baseline.lr=0.05)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for smoke, where the tiny model runs "
        "about 10x faster single-threaded, else torch's default)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier comparison in --output-dir"
    )
    parser.add_argument("--quiet", action="store_true", help="only the final table")
    return parser


def resolve_settings(args: argparse.Namespace) -> Tuple[CLIPHingeConfig, BaselineSettings]:
    """Config file, the smoke preset, ``--set`` (config and ``baseline.`` keys), --pretrained."""
    from .run_options import SMOKE

    benchmark = args.benchmark
    config = CLIPHingeConfig.from_json(args.config or DEFAULT_CONFIGS[benchmark])
    if benchmark == "smoke":
        config = config.replace(**SMOKE)
    config_sets, baseline_sets = [], {}
    for item in args.set:
        key = item.split("=", 1)[0].strip()
        if key.startswith("baseline."):
            if "=" not in item:
                raise CompareError(f"--set expects key=value, got '{item}'")
            raw = item.split("=", 1)[1]
            try:
                baseline_sets[key[len("baseline.") :]] = json.loads(raw)
            except json.JSONDecodeError:
                baseline_sets[key[len("baseline.") :]] = raw
        else:
            config_sets.append(item)
    if benchmark == "image_folder":
        config = config.replace(dataset="image_folder")
    config = config.with_overrides(config_sets)
    if benchmark == "image_folder":
        given = given_keys(args.config or DEFAULT_CONFIGS[benchmark], config_sets)
        config = fit_image_folder(
            config, args.data_root, given, where="pass your folder with --data-root PATH"
        )
    if args.pretrained is not None:
        config = config.replace(pretrained=args.pretrained)
    # every entry shares streams built with CLIP's full CPU-side eval transform, so the
    # CLIPHinge entries must not resize and normalise a second time on the device
    config = config.replace(resize_on_device=False)
    return config, BaselineSettings().with_overrides(baseline_sets)


def stream_factory_for(
    args: argparse.Namespace, backbone: CLIPBackbone
) -> Callable[[CLIPHingeConfig], Any]:
    """``config -> NamedBenchmark`` for ``--benchmark``: the run command's stream builder of the
    dataset (``app.datasets``) with CLIP's eval transform for training too (no augmentation, as
    in RAPF)."""
    if args.benchmark == "smoke":
        from .run_options import smoke_stream

        return smoke_stream
    _, build = DATASETS[BENCHMARK_DATASETS[args.benchmark]]
    plain = argparse.Namespace(**{**vars(args), "augment": False})
    return lambda config: build(plain, config, backbone)


def _launched() -> bool:
    """``distributed.launched()``, importing torch only where ``WORLD_SIZE`` may make it true:
    unset, empty or 1 is one process."""
    if os.environ.get("WORLD_SIZE", "") in ("", "1"):
        return False
    from .. import distributed

    return distributed.launched()


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Parse, load CLIP once, run every entry on every seed, write and print the table.

    Returns the exit code: 0, or 2 with one ``error:`` line for an expected failure.
    """
    from .cli import process_seconds

    args = build_parser(prog).parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        if _launched():
            # the baselines are Avalanche's own strategies: under torchrun they would split
            # their data without sharing gradients; every process would also write the folder
            raise CompareError(
                "cliphinge compare runs in one process: start it with python, "
                "not torchrun (cliphinge run uses several)"
            )
        if args.benchmark not in BENCHMARKS:
            raise CompareError(
                f"unknown benchmark '{args.benchmark}'"
                + did_you_mean(args.benchmark, BENCHMARKS)
                + f" (choose from {', '.join(BENCHMARKS)})"
            )
        ablations = [a for a in args.ablations if a.lower() != "none"]
        entries = resolve_entries(args.strategies, ablations)
        config, settings = resolve_settings(args)
        seeds = args.seeds if args.seeds else [config.seed]
        if len(set(seeds)) != len(seeds):
            raise CompareError(f"--seeds lists a seed twice: {seeds}")
        # a request that stands: torch, open_clip and Avalanche from here on
        with process.heavy_imports():
            import torch

            from ..model.backbone import check_device
            from .compare_report import markdown_table, prepare_output, summarize, write_outputs
            from .compare_runs import load_backbone, run_comparison

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)  # before CLIP loads
        threads = args.threads or (1 if args.benchmark == "smoke" else None)
        if threads is not None:
            if threads < 1:
                raise CompareError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        output_dir = Path(args.output_dir or Path("runs") / f"compare_{args.benchmark}")
        prepare_output(output_dir, args.overwrite)
        output_dir.mkdir(parents=True, exist_ok=True)
        backbone = load_backbone(config, seeds[0], device)
        comparison = run_comparison(
            entries,
            config=config,
            stream_factory=stream_factory_for(args, backbone),
            backbone=backbone,
            seeds=seeds,
            output_dir=output_dir,
            settings=settings,
            device=device,
            log=log,
        )
        # as typed: `cliphinge compare ...` passes argv, the script reads its own
        comparison.protocol["command"] = shlex.join(
            ["cliphinge", "compare", *argv]
            if argv is not None
            else ["python", sys.argv[0] or "experiments/compare.py", *sys.argv[1:]]
        )
        write_outputs(comparison, output_dir)
    except (
        CompareError,
        ConfigError,
        BackboneError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        FloatingPointError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(summarize(comparison)), end="")
    print(
        f"report: {output_dir / 'comparison.md'} | TensorBoard: tensorboard --logdir "
        f"{output_dir / 'tb'} | this process: {process_seconds():.1f} s"
    )
    return 0
