"""``cliphinge evaluate``: a saved model's accuracy on a protocol's whole test stream.

The stream is the one ``cliphinge run`` builds for the same ``--preset``/``--config`` and
``--set`` (with the saved model's own transforms), and the model is scored the way the run
scores it after its last task (``CLIPHingeStrategy.eval`` with the application's evaluator):
a run's ``final_model.pt`` evaluated on the run's protocol gives the run's ``Last``. The
accuracy, the accuracy on each task's test classes and the protocol are printed and, with
``--output``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import ConfigError
from ..errors import BackboneError
from .cli import _one_line
from .datasets import add_dataset_arguments, dataset_entry, fit_config_to_data
from .loop import EXP_ACCURACY, metric_value
from .results import grouped_accuracy
from .run_options import RUN_PRESETS, resolve_config

#: The config a ``--preset`` starts from (as ``cliphinge run --preset``).
PRESET_BASE = "cifar100_b0_inc10"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``cliphinge evaluate``."""
    parser = argparse.ArgumentParser(
        prog="cliphinge evaluate",
        description="A saved model's accuracy on a protocol's whole test stream and on each "
        "task's test classes: the stream cliphinge run builds for the same --preset or "
        "--config and --set. A run's final_model.pt on its own protocol gives the run's Last.",
    )
    parser.add_argument(
        "--model", required=True, help="a saved model: final_model.pt in a run's output folder"
    )
    protocol = parser.add_mutually_exclusive_group(required=True)
    protocol.add_argument(
        "--preset", choices=RUN_PRESETS, help="the protocol of cliphinge run --preset NAME"
    )
    protocol.add_argument(
        "--config",
        metavar="NAME",
        help="the protocol of a shipped preset (cliphinge presets) or a JSON config file",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of the protocol, as in cliphinge run (repeatable)",
    )
    parser.add_argument("--data-root", default="data", help="dataset folder (default: data)")
    parser.add_argument(
        "--output", default=None, metavar="FILE.json", help="also write the result as JSON"
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="the frozen CLIP weights on this machine (a tag or a file with the SHA-256 "
        "recorded at training) when not where training found them",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    add_dataset_arguments(parser)
    return parser


def _request(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` as ``cli.resolve_config`` and the stream builders read a run's request."""
    return argparse.Namespace(
        **{
            **vars(args),
            "config": args.config or PRESET_BASE,
            "pretrained": None,  # the request's weights: the model brings its own
            "seed": None,
            "augment": False,
            "download": False,
            "skip_bad_images": False,
        }
    )


def missing_model(path: str) -> bool:
    """Say so (one ``error:`` line) and return ``True`` when ``path`` is not a file: before
    torch is imported, so that a mistyped path is answered at once."""
    if Path(path).is_file():
        return False
    print(
        f"error: saved model {path} does not exist; a finished run writes final_model.pt in "
        "its output folder",
        file=sys.stderr,
    )
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Evaluate; 0, or 2 with one ``error:`` line for a request that cannot run."""
    args = build_parser().parse_args(argv)
    request = _request(args)
    try:
        config = resolve_config(request)  # before anything slow: a bad --set fails at once
    except ConfigError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    if missing_model(args.model):
        return 2
    from ..model.saving import SavedModelError

    try:
        result = evaluate(args.model, request, config, args.device, args.pretrained)
    except (ConfigError, SavedModelError, BackboneError, FileNotFoundError, ValueError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.output is not None:
        from ..atomic import write_text_atomic

        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(result, indent=2) + "\n", path)
        print(f"written: {path}")
    return 0


def evaluate(
    model_path: str | Path,
    request: argparse.Namespace,
    config,
    device: Optional[str] = None,
    pretrained: Optional[str] = None,
) -> Dict[str, Any]:
    """The saved model's accuracy (percent) on the test stream of ``config`` (the request's
    config, ``cli.resolve_config``), overall and per task, with the protocol.

    Raises:
        ConfigError: the stream's classes are not the model's (another dataset).
        SavedModelError: the file is not a saved model.
        FileNotFoundError: the data is missing.
    """
    import torch

    from ..benchmarks.common import skip_unreadable_images
    from ..model.cliphinge_model import CLIPHingeModel
    from ..strategy import CLIPHingeStrategy
    from .run_options import smoke_stream
    from .evaluation import make_evaluator

    config = fit_config_to_data(request, config)
    factory = None
    if config.dataset != "synthetic":
        check_data, factory = dataset_entry(config)
        config.require_layout(f"the {config.dataset} stream builder")
        check_data(request, config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CLIPHingeModel.load(model_path, device=device, pretrained=pretrained)
    with skip_unreadable_images(False):
        if factory is None:
            named = smoke_stream(config)
        else:
            named = factory(request, config, model.backbone)
    _check_classes(model, named, model_path)
    test_stream = named.benchmark.test_stream
    with warnings.catch_warnings():  # Avalanche warns of an evaluator without loggers
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = make_evaluator().plugin
    strategy = CLIPHingeStrategy(
        config=model.config,
        class_names=model.names,
        model=model,
        device=device,
        evaluator=evaluator,
        use_default_plugins=False,
        progress=False,
    )
    metrics = strategy.eval(test_stream)
    sizes = [len(exp.dataset) for exp in test_stream]
    row = [100.0 * metric_value(metrics, EXP_ACCURACY, j) for j in range(len(sizes))]
    learned = sorted(int(c) for classes in model.task_classes for c in classes)
    return {
        "model": str(model_path),
        "accuracy": grouped_accuracy(row, sizes, len(sizes) - 1)["all"],
        "test_images": sum(sizes),
        "per_task": [
            {
                "task": j,
                "classes": named.classes_in_experience(j),
                "test_images": sizes[j],
                "accuracy": row[j],
            }
            for j in range(len(sizes))
        ],
        "learned_classes": len(learned),
        "protocol": {
            "config_file": request.config if request.preset is None else None,
            "preset": request.preset,
            "set": list(request.set),
            "dataset": config.dataset,
            "init_class": config.init_class,
            "increment": config.increment,
            "total_tasks": len(sizes),
            "class_order": list(named.class_order),
            "seed": config.seed,
            "stream": named.protocol,
        },
        "device": str(device),
    }


def _check_classes(model, named, model_path) -> None:
    """``ConfigError`` when a class of the stream has another name in the model (the model
    was trained on another dataset) or lies beyond the model's classes."""
    for c in named.class_order:
        theirs = model.names.get(int(c))
        if theirs != named.class_names[c]:
            had = "no class" if theirs is None else f"'{theirs}'"
            raise ConfigError(
                f"{model_path} was not trained on this stream: its class {c} is {had}, the "
                f"stream's is '{named.class_names[c]}'; pass the --preset or --config (and "
                "--set) the model was trained with"
            )


def format_result(result: Dict[str, Any]) -> str:
    """The result as the command prints it."""
    protocol = result["protocol"]
    source = (
        f"--preset {protocol['preset']}"
        if protocol["preset"]
        else f"--config {protocol['config_file']}"
    )
    overrides = "".join(f" --set {item}" for item in protocol["set"])
    n_classes = len(protocol["class_order"])
    lines = [
        f"model: {result['model']} ({result['learned_classes']} classes learned)",
        f"stream: {protocol['dataset']} ({source}{overrides}), {len(result['per_task'])} tasks, "
        f"{n_classes} classes, {result['test_images']} test images",
        f"accuracy: {result['accuracy']:.2f} %",
    ]
    if result["learned_classes"] < n_classes:
        lines.append(
            f"  (the model learned {result['learned_classes']} of the stream's {n_classes} "
            "classes: the others count as errors)"
        )
    for task in result["per_task"]:
        lines.append(
            f"  task {task['task']}: {task['accuracy']:6.2f} % of {task['test_images']} "
            f"images (classes {_short(task['classes'])})"
        )
    return "\n".join(lines)


def _short(ids: List[int], most: int = 8) -> str:
    shown = ", ".join(str(c) for c in ids[:most])
    return shown + (", ..." if len(ids) > most else "")
