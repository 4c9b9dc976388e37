"""What a run refuses before it starts (the stream, the paths, W&B, the prompt length) and
on resume (a checkpoint another config or stream made), and the check of every evaluation's
scores (``FiniteScoresCheck``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from avalanche.training.plugins import SupervisedPlugin

from . import checkpoint as ckpt
from ..config import CLIPHingeConfig, ConfigError
from ..errors import RunError
from .evaluation import EvaluatorError, require_wandb


def stream_fingerprint(named_benchmark) -> Dict[str, Any]:
    """What must stay the same for a checkpoint to continue on a stream: the class order,
    the classes and sizes of every experience."""
    benchmark = named_benchmark.benchmark
    return {
        "class_order": [int(c) for c in named_benchmark.class_order],
        "train_sizes": [len(exp.dataset) for exp in benchmark.train_stream],
        "test_sizes": [len(exp.dataset) for exp in benchmark.test_stream],
    }


def check_stream(config: CLIPHingeConfig, named_benchmark) -> None:
    """Refuse a stream the run cannot use, before anything is written.

    Raises ``ConfigError`` (class counts) or ``RunError`` (task count, empty experiences).
    """
    config.check_class_count(len(named_benchmark.class_names), "the stream")
    train_stream, test_stream = (
        named_benchmark.benchmark.train_stream,
        named_benchmark.benchmark.test_stream,
    )
    n_exps = len(train_stream)
    if n_exps != config.total_tasks:
        raise RunError(
            f"the stream has {n_exps} experiences but total_tasks="
            f"{config.total_tasks}; make them agree"
        )
    if len(test_stream) != n_exps:
        raise RunError(
            f"the stream has {n_exps} training but {len(test_stream)} test "
            "experiences; they must be index-aligned (one test experience per task)"
        )
    for name, stream in (("training", train_stream), ("test", test_stream)):
        for index, exp in enumerate(stream):
            if len(exp.dataset) == 0:
                raise RunError(
                    f"{name} experience {index} of the stream is empty; every "
                    "experience needs training and test samples (check the split "
                    "and the class order)"
                )


def check_run_paths(config: CLIPHingeConfig) -> None:
    """Refuse (``RunError``) a ``feature_cache_dir`` that exists but is not a folder."""
    folder = config.feature_cache_dir
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise RunError(
            f"feature_cache_dir {folder} is a file, not a folder; choose another "
            "feature_cache_dir or set it to null"
        )


def check_wandb() -> None:
    """Refuse (``RunError``) W&B logging without a ``wandb`` package that imports."""
    try:
        require_wandb()
    except EvaluatorError as err:
        raise RunError(str(err)) from None


def check_prompt_length(tokenizer, class_names: Sequence[str], config: CLIPHingeConfig) -> None:
    """Refuse (``ConfigError``) class names whose prompt (``n_ctx`` context tokens, the name,
    a full stop) or template text does not fit the text encoder's context: the tokenizer
    would cut the name off silently."""
    encode = getattr(tokenizer, "encode", None)
    limit = getattr(tokenizer, "context_length", None)
    if encode is None or limit is None:
        return
    for name in class_names:
        for what, text in (
            ("the prompt", f"{'X ' * config.n_ctx}{name}."),
            ("prompt_template", config.prompt_template.format(name)),
        ):
            length = len(encode(text)) + 2  # start and end of text
            if length > limit:
                raise ConfigError(
                    f"class name {name!r} makes {what} {length} tokens long, beyond the text "
                    f"encoder's {limit} (n_ctx={config.n_ctx}); lower n_ctx or shorten the "
                    "name or the template"
                )


def load_resume_state(
    checkpoints: Path,
    config: CLIPHingeConfig,
    fingerprint: Dict[str, Any],
    resume: bool,
    force: bool,
    log: Callable[[str], None],
) -> Optional[Dict[str, Any]]:
    """The checkpoint to resume from, checked against the config and the stream."""
    if not resume:
        return None
    state = ckpt.load_latest(checkpoints, warn=log)
    if state is None:
        log(f"--resume: no checkpoint in {checkpoints}; starting from the first experience")
        return None
    differences = ckpt.config_differences(state["config"], config.to_dict())
    saved_stream = state.get("stream")
    if saved_stream is not None:
        differences += [f"stream {k}" for k in fingerprint if saved_stream.get(k) != fingerprint[k]]
    if differences and not force:
        raise RunError(
            f"{Path(state['path']).name} was made with another config ("
            + "; ".join(differences)
            + "); pass --force to resume anyway"
        )
    if differences:
        log("--force: resuming although " + "; ".join(differences))
    return state


def check_resumable(state: Dict[str, Any], config: CLIPHingeConfig, named_benchmark) -> None:
    """Refuse, even with ``--force``, a checkpoint this stream and config cannot continue:
    more experiences done than the stream has, another task layout, another prompt length."""
    name = Path(state["path"]).name
    done, n_exps = state["completed"], len(named_benchmark.benchmark.train_stream)
    ending = (
        "; --force cannot bridge that: resume with the config and data it was made "
        "with, or start again with --overwrite"
    )
    order, layout, begin = list(named_benchmark.class_order), [], 0
    for task in range(min(done, n_exps)):
        size = config.task_size(task)
        layout.append(sorted(int(c) for c in order[begin : begin + size]))
        begin += size
    saved = state["model"]["task_classes"]
    differ = [k for k, classes in enumerate(layout) if sorted(saved[k]) != classes]
    if differ:
        k = differ[0]
        raise RunError(
            f"{name} was trained on tasks of {[len(t) for t in saved]} classes, but "
            f"this stream's first {len(layout)} tasks hold "
            f"{[len(t) for t in layout]} (task {k}: classes {sorted(saved[k])} "
            f"there, {layout[k]} here){ending}"
        )
    width = len(state["run"]["matrix"][0])
    if done > n_exps or width != n_exps:
        raise RunError(
            f"{name} holds {done} experiences of a {width}-experience stream, but "
            f"this stream has {n_exps}{ending}"
        )
    n_ctx = {int(p.shape[1]) for p in state["model"]["prompts"]}
    if n_ctx != {config.n_ctx}:
        raise RunError(
            f"{name} has prompts of {sorted(n_ctx)} context tokens, the config "
            f"n_ctx={config.n_ctx}{ending}"
        )


class FiniteScoresCheck(SupervisedPlugin, supports_distributed=True):
    """Stops an evaluation whose scores hold NaN or Inf (non-finite test features).

    Counted on the device per minibatch, read back once per test experience; raises
    ``FloatingPointError`` naming the experience before its accuracy is logged.
    """

    def __init__(self):
        super().__init__()
        self._bad: Optional[torch.Tensor] = None

    def before_eval_exp(self, strategy, **kwargs):
        self._bad = torch.zeros((), dtype=torch.long, device=strategy.device)

    def after_eval_forward(self, strategy, **kwargs):
        scores = strategy.mb_output.detach()
        self._bad += (~torch.isfinite(scores).all(dim=1)).sum()

    def after_eval_exp(self, strategy, **kwargs):
        bad = int(self._bad)
        if bad:
            exp = strategy.experience
            raise FloatingPointError(
                f"test experience {exp.current_experience}: {bad} of {len(exp.dataset)} "
                "samples give NaN or Inf scores (non-finite image features); check that "
                "experience's test images and the transforms"
            )
