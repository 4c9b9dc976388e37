"""A whole class-incremental run: loggers, eval after every experience, report, checkpoints.

Used by ``experiments/run_split_cifar.py`` and ``experiments/run_imagenet_r.py``; usable from
Python as ``run_experiment(config, named_benchmark, output_dir, ...)``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin

from . import checkpoint as ckpt
from . import run_lock
from .. import distributed
from ..atomic import kill_point, remove_temp_files, write_bytes_atomic, write_text_atomic
from ..config import CLIPHingeConfig, ConfigError, config_reproduces
from ..errors import RunError, first_line
from ..model.backbone import CLIPBackbone
from ..plugins.hard_pair_hinge import HardPairHingePlugin
from ..seeding import seed_everything
from .figures import (
    SCREEN_DPI,
    accuracy_matrix_figure,
    confusion_matrix_figure,
    figure_files,
    render_pixels,
    run_curve_figure,
    run_title,
    save_figure,
    write_png,
)
from .confusion import ConfusionMatrixPlugin
from .evaluation import Evaluation, EvaluatorError, make_evaluator, require_wandb
from .loop import SEEN_ACCURACY, metric_value, train_and_evaluate
from .results import cil_metrics, format_report, format_results, grouped_accuracy
from ..strategy import CLIPHingeStrategy, build_model
from ..streams import task_layout
from ..wandb_logger import WandBLogger

PACKAGES = (
    "avalanche-cliphinge",
    "avalanche-lib",
    "torch",
    "torchvision",
    "open_clip_torch",
    "peft",
    "numpy",
)


def package_versions() -> Dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


#: Config keys that make a run another protocol than its config file's: the data, the task
#: layout, the class order.
PROTOCOL_KEYS = ("dataset", "init_class", "increment", "total_tasks", "class_order")
#: The folder of this package's source checkout (when it is one): ``git_commit`` reads it.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def config_record(
    config_file: str | Path, config: CLIPHingeConfig, preset: Optional[str] = None
) -> Dict[str, Any]:
    """What results.json says of the config a run started from.

    ``config_file`` (a preset name or a JSON file) and what it ``reproduces`` (its
    ``"reproduces"`` note) while the run keeps the file's ``PROTOCOL_KEYS``; once the preset
    or ``--set`` changed one of them (another dataset, layout or class order) both are
    ``None`` and ``config_modified`` names the file and the keys changed, so neither the
    record nor the figures' titles claim a protocol the run did not follow.
    """
    try:
        base: Optional[CLIPHingeConfig] = CLIPHingeConfig.from_json(config_file)
    except ConfigError:
        base = None
    changed = [k for k in PROTOCOL_KEYS if base is None or getattr(base, k) != getattr(config, k)]
    if not changed:
        return {
            "config_file": str(config_file),
            "preset": preset,
            "reproduces": config_reproduces(config_file),
            "config_modified": None,
        }
    return {
        "config_file": None,
        "preset": preset,
        "reproduces": None,
        "config_modified": {"config_file": str(config_file), "changed": changed},
    }


def now_iso() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def git_commit(folder: str | Path = SOURCE_ROOT) -> Optional[Dict[str, Any]]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout whose top folder is ``folder``
    (default: this package's source tree); ``dirty``: tracked files changed or files git
    does not ignore added. ``None`` when ``folder`` is not the top of a checkout (an
    installed package) or git is missing or fails; never raises."""
    folder = Path(folder)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env=env,
        ).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != folder.resolve():
            return None  # inside another project's checkout
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


#: The figures of a run (``_write_plots``), each as PNG and PDF; the confusion matrix once the
#: last task is evaluated.
PLOT_FILES = (
    *figure_files("accuracy_matrix"),
    *figure_files("accuracy_curve"),
    *figure_files("confusion_matrix"),
)
#: Resolution of the PNG previews written after each task before the last (the pixels
#: TensorBoard gets).
PREVIEW_DPI = SCREEN_DPI
#: Files and folders a run writes into its output folder (``--overwrite`` removes these only).
RUN_FILES = (
    "results.json",
    "results.txt",
    "log.txt",
    "config.json",
    "csv",
    "tb",
    "checkpoints",
    "final_model.pt",
    *PLOT_FILES,
)
#: Files written whole through a temporary file, fsync and rename (``atomic.write_atomic``).
ATOMIC_FILES = ("results.json", "results.txt", "config.json", *PLOT_FILES)
#: What an attempt that failed before its first checkpoint leaves behind.
LOG_FILES = ("log.txt", "csv", "tb")


def restore_logs(output_dir: Path, state: Dict[str, Any], log: Callable[[str], None]) -> None:
    """Cut the CSV and TensorBoard files back to what they held when ``state`` was saved.

    Each CSV file is rewritten (temporary file, fsync, rename; never truncated in place) to
    the checkpoint's line count. Each TensorBoard event file is rewritten to its size at the
    checkpoint, and event files made after it (by a process killed before its first
    checkpoint) are deleted: every event of the interrupted experience goes, whatever its
    tag or step axis. A checkpoint of an older version without TensorBoard sizes falls back
    to TensorBoard's restart marker at the checkpoint's training step.
    """
    csv_dir = Path(output_dir) / "csv"
    for name, rows in state["csv_rows"].items():
        path = csv_dir / name
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        if len(lines) < rows:
            log(
                f"warning: {path} holds {len(lines)} lines but the checkpoint counted {rows}; "
                "its missing rows cannot be restored"
            )
        elif len(lines) > rows:
            write_text_atomic("".join(lines[:rows]), path)
    tb_dir = Path(output_dir) / "tb"
    sizes = state.get("tb_files")
    if sizes is None:
        if tb_dir.is_dir():
            _purge_tensorboard_from(tb_dir, state["clock"]["train_iterations"] + 1)
        return
    for path in sorted(tb_dir.rglob("*")) if tb_dir.is_dir() else []:
        if not path.is_file():
            continue
        keep = sizes.get(path.relative_to(tb_dir).as_posix())
        if keep is None:
            path.unlink()
        elif path.stat().st_size > keep:
            with open(path, "rb") as file:
                write_bytes_atomic(file.read(keep), path)


def tensorboard_sizes(output_dir: Path, tb_logger) -> Dict[str, int]:
    """``{path under tb/: bytes}`` of every TensorBoard file, after a flush (for checkpoints)."""
    tb_logger.writer.flush()
    tb_dir = Path(output_dir) / "tb"
    return {
        p.relative_to(tb_dir).as_posix(): p.stat().st_size
        for p in sorted(tb_dir.rglob("*"))
        if p.is_file()
    }


def _purge_tensorboard_from(tb_dir: Path, step: int) -> None:
    """Write TensorBoard's restart marker: readers drop earlier events at ``step`` or later.

    The same two events ``SummaryWriter(purge_step=step)`` writes, in a file of their own.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir), filename_suffix=".purge")
    file_writer = writer._get_file_writer()
    file_writer.add_event(Event(step=step, file_version="brain.Event:2"))
    file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
    writer.close()


def csv_row_counts(output_dir: Path) -> Dict[str, int]:
    """Lines (header included) of each Avalanche CSV file, to cut them back on resume."""
    counts = {}
    for path in (Path(output_dir) / "csv").glob("*.csv"):
        counts[path.name] = len(path.read_text().splitlines())
    return counts


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


@dataclass
class RunState:
    """What a run has measured so far (saved in every checkpoint and in results.json)."""

    matrix: List[List[float]] = field(default_factory=list)
    per_task: List[Dict[str, Any]] = field(default_factory=list)
    stream_forgetting: List[Optional[float]] = field(default_factory=list)
    hard_pairs: List[Dict[str, Any]] = field(default_factory=list)
    seen_stream_accuracy: List[Optional[float]] = field(default_factory=list)
    #: ``[true, predicted]`` test counts after the last task, rows and columns in class order
    confusion: Optional[List[List[int]]] = None
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    #: when the run began (ISO 8601; a resumed run keeps its first start), ``None`` unknown
    created: Optional[str] = None
    #: ``git_commit()`` when the run began
    git_commit: Optional[Dict[str, Any]] = None


def named_pair(pair: Sequence, names: Sequence[str]) -> Dict[str, Any]:
    """A hard pair ``(old_id, new_id, similarity)`` with its class names, for the reports."""
    old, new, similarity = pair
    return {
        "old": int(old),
        "new": int(new),
        "old_name": names[int(old)],
        "new_name": names[int(new)],
        "similarity": float(similarity),
    }


def hard_pairs_of(hinge: Optional[HardPairHingePlugin]) -> Dict[str, List[Sequence]]:
    """The text and image pairs the hinge plugin chose for the experience just trained."""
    if hinge is None:
        return {"text": [], "image": []}
    return {"text": list(hinge.text_pairs), "image": list(hinge.image_pairs)}


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


def prepare_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir``; ``RunError`` if it is a file or cannot be written."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(
            f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise RunError(
            f"cannot write to --output-dir {output_dir} ({err.strerror or err}); "
            "choose a writable folder"
        ) from None
    return output_dir


def check_output_dir(
    output_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> None:
    """Cheap checks of the output folder, before a model or a dataset is loaded.

    Creates the folder; refuses (``RunError``) one that cannot be written, one another run
    is writing into (its lock is held: ``run_lock.RunLockedError``), one that holds a
    finished run (unless ``overwrite``) and one that holds an unfinished run unless
    ``resume`` or ``overwrite``. Deletes nothing.
    """
    output_dir = prepare_output_dir(output_dir)
    with run_lock.hold(output_dir):
        if overwrite:
            return
        results_path = output_dir / "results.json"
        checkpoints = ckpt.list_checkpoints(output_dir / "checkpoints")
        if _is_finished(results_path, checkpoints):
            raise RunError(
                f"{output_dir} already holds a finished run (results.json); pass "
                "--overwrite to run again or choose another --output-dir"
            )
        if not resume and (checkpoints or results_path.exists()):
            done = f" ({checkpoints[0][0] + 1} experiences done)" if checkpoints else ""
            raise RunError(
                f"{output_dir} holds an unfinished run{done}; pass --resume to "
                "continue it or --overwrite to start again"
            )


def _is_finished(results_path: Path, checkpoints) -> bool:
    """results.json says finished and the newest checkpoint covers every task it reports.

    A run killed after results.json and before its last checkpoint (written by an older
    version, which marked the run finished first) is not finished: ``--resume`` redoes the
    last experience and brings the plots, TensorBoard and checkpoints up to date. A
    finished run whose checkpoints were deleted stays finished.
    """
    try:
        results = json.loads(results_path.read_text())
        done = int(results.get("completed_tasks", 0))
        return bool(results.get("finished")) and (not checkpoints or checkpoints[0][0] + 1 >= done)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _remove_run_files(output_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_experiment(
    config: CLIPHingeConfig,
    named_benchmark,
    output_dir: str | Path,
    *,
    backbone: Optional[CLIPBackbone] = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    wandb: bool = False,
    interactive: bool = True,
    protocol: Optional[Dict[str, Any]] = None,
    plugins: Sequence[Any] = (),
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train on every experience of ``named_benchmark``, evaluating the full test stream after each.

    After every experience the results so far (``results.json``, ``results.txt``, plots,
    TensorBoard) and a checkpoint (``checkpoints/exp_<k>.pt``, the last two kept) are written
    atomically, in that order, and the run is marked finished only after the last of them, so
    an interrupted run continues with ``resume=True`` exactly as if it had not stopped.

    Args:
        config: the method's settings (checked against the stream's class count; layout keys
            left unset are read off the stream and recorded in the results).
        named_benchmark: a ``benchmarks.NamedBenchmark`` (Avalanche benchmark, class names and order).
        output_dir: where results, logs, TensorBoard events, plots and checkpoints go.
        backbone: the already loaded CLIP (its transforms built the stream); loaded from the
            config when ``None``. With random weights (``pretrained=None``) seed the global
            RNG with ``config.seed`` before loading it, or a resumed run gets another CLIP.
        device: torch device.
        resume: continue after the last complete experience of a run in ``output_dir``.
        overwrite: start again in a folder that holds a run.
        force: resume even when the checkpoint's config or stream differs.
        wandb: also log to Weights & Biases.
        interactive: show Avalanche's progress bars.
        protocol: extra protocol fields (stream, class order, data source...).
        plugins: extra Avalanche plugins for the strategy.
        log: where one-line status messages go.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError, RunError, CheckpointError: the request cannot run (nothing is deleted).
        run_lock.RunLockedError: another process is running in ``output_dir`` (the folder is
            locked for the whole run; the lock of a dead process never blocks).
        FloatingPointError: a non-finite loss, stage-2 weight or test score; the checkpoints
            written so far are intact.
        OSError: the disk or the folder failed (full, quota, read-only); the files written
            so far are intact and ``resume=True`` continues.
    """
    if resume and overwrite:
        raise RunError(
            "resume and overwrite exclude each other: continue the run or start it again"
        )
    output_dir = Path(output_dir)
    if not config.layout_is_set:  # the keys left unset are read off the stream
        layout = task_layout(named_benchmark.benchmark)
        config = config.replace(**{k: v for k, v in layout.items() if getattr(config, k) is None})
    check_stream(config, named_benchmark)
    check_run_paths(config)
    if wandb:
        check_wandb()
    if not distributed.is_main():  # under torchrun rank 0 alone prints and shows bars
        log, interactive = _quiet, False
    with ExitStack() as held:
        locks: List[run_lock.RunLock] = []

        def take_folder() -> None:
            prepare_output_dir(output_dir)
            locks.append(held.enter_context(run_lock.hold(output_dir)))
            check_output_dir(output_dir, resume=resume, overwrite=overwrite)

        # the folder is rank 0's (torchrun); its verdict stops every rank alike
        distributed.on_main(take_folder)
        return _run_locked(
            config,
            named_benchmark,
            output_dir,
            locks[0] if locks else None,
            backbone=backbone,
            device=device,
            resume=resume,
            overwrite=overwrite,
            force=force,
            wandb=wandb,
            interactive=interactive,
            protocol=protocol,
            plugins=plugins,
            log=log,
        )


def _run_locked(
    config: CLIPHingeConfig,
    named_benchmark,
    output_dir: Path,
    lock,
    *,
    backbone,
    device,
    resume,
    overwrite,
    force,
    wandb,
    interactive,
    protocol,
    plugins,
    log,
):
    """``run_experiment`` once the folder is locked and checked."""
    checkpoints = output_dir / "checkpoints"
    n_exps = len(named_benchmark.benchmark.train_stream)
    fingerprint = stream_fingerprint(named_benchmark)
    # read on rank 0 (the output folder may be on its machine only), sent to every rank
    state = distributed.on_main(
        lambda: _load_resume_state(checkpoints, config, fingerprint, resume, force, log)
    )
    if state is not None:
        _check_resumable(state, config, named_benchmark)
    seed_everything(config.seed)
    model = build_model(config, named_benchmark.class_names, device, backbone=backbone)
    backbone = model.backbone
    check_prompt_length(backbone.tokenizer, named_benchmark.class_names, config)
    if state is not None:
        try:
            ckpt.load_model_state(model, state["model"])
        except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {state['path']} does not fit this model "
                f"({first_line(err, 160)}); resume with the config it was made "
                "with, or start again with --overwrite"
            ) from None
    made: List[Evaluation] = []

    def claim_folder() -> None:
        # Everything is checked: from here on the folder is this run's.
        lock.announce()
        _remove_temp_files(output_dir)
        if state is None:
            # --overwrite, --resume of a run without checkpoint, or a start after an attempt
            # that failed before its first checkpoint: old logs would mix with the new run's.
            _remove_run_files(output_dir, RUN_FILES if overwrite or resume else LOG_FILES)
        else:
            restore_logs(output_dir, state, log)
            ckpt.prune_checkpoints(checkpoints)
        write_text_atomic(config.to_json(), output_dir / "config.json")
        try:
            made.append(
                make_evaluator(
                    tensorboard_dir=output_dir / "tb",
                    text_log=output_dir / "log.txt",
                    csv_dir=output_dir / "csv",
                    interactive=interactive,
                    wandb_run=output_dir.name if wandb else None,
                    wandb_dir=output_dir,
                    wandb_config=config.to_dict(),
                    append=state is not None,
                )
            )
        except EvaluatorError as err:
            raise RunError(str(err)) from None

    # files and loggers on rank 0; the other ranks measure the same metrics, log nothing
    distributed.on_main(claim_folder)
    evaluation = made[0] if made else make_evaluator()
    evaluator, tb_logger = evaluation.plugin, evaluation.tensorboard
    try:
        checks = [FiniteScoresCheck(), ConfusionMatrixPlugin(len(named_benchmark.class_names))]
        strategy = CLIPHingeStrategy(
            config=config,
            class_names=named_benchmark.class_names,
            model=model,
            plugins=[*plugins, *checks],
            evaluator=evaluator,
            device=device,
            progress=interactive,
        )
        run = RunState(created=now_iso(), git_commit=git_commit())
        start = 0
        if state is not None:
            ckpt.set_clock_state(strategy.clock, state["clock"])
            ckpt.set_evaluator_state(evaluator, state["evaluator"])
            ckpt.set_rng_state(state["rng"])
            strategy.current_task = model.n_tasks - 1
            run = RunState(**state["run"])
            start = state["completed"]
            message = (
                f"resuming from {Path(state['path']).name}: after experience "
                f"{start - 1} ({start} of {n_exps} done)"
            )

            def announce() -> None:
                log(message)
                print(f"=== {message} ===", file=evaluation.files[0])
                kill_point("resume_loggers", start)

            distributed.on_main(announce)
        _train_and_evaluate(
            strategy,
            named_benchmark,
            output_dir,
            run,
            start,
            config,
            fingerprint,
            backbone,
            protocol,
            device,
            tb_logger,
            evaluator,
            log,
        )
    finally:
        evaluation.close()
    return distributed.on_main(lambda: json.loads((output_dir / "results.json").read_text()))


def _remove_temp_files(output_dir: Path) -> None:
    """Temporary files of atomic writes a killed run left (results, plots, checkpoints)."""
    remove_temp_files(output_dir, lambda name: name in ATOMIC_FILES)
    remove_temp_files(output_dir / "checkpoints", ckpt.is_checkpoint_name)


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


def check_wandb() -> None:
    """Refuse (``RunError``) W&B logging without a ``wandb`` package that imports."""
    try:
        require_wandb()
    except EvaluatorError as err:
        raise RunError(str(err)) from None


def check_run_paths(config: CLIPHingeConfig) -> None:
    """Refuse (``RunError``) a ``feature_cache_dir`` that exists but is not a folder."""
    folder = config.feature_cache_dir
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise RunError(
            f"feature_cache_dir {folder} is a file, not a folder; choose another "
            "feature_cache_dir or set it to null"
        )


def _load_resume_state(
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


def _check_resumable(state: Dict[str, Any], config: CLIPHingeConfig, named_benchmark) -> None:
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


def _train_and_evaluate(
    strategy,
    named_benchmark,
    output_dir: Path,
    run: RunState,
    start: int,
    config: CLIPHingeConfig,
    fingerprint: Dict[str, Any],
    backbone,
    protocol: Optional[Dict[str, Any]],
    device: str,
    tb_logger,
    evaluator,
    log: Callable[[str], None],
) -> None:
    n_exps = len(named_benchmark.benchmark.train_stream)
    test_sizes = fingerprint["test_sizes"]
    full_protocol = {
        "model": config.model_name,
        "pretrained": backbone.pretrained,
        "weights_sha256": backbone.weights_sha256,
        "activation": backbone.activation,
        "class_order": named_benchmark.class_order,
        **(protocol or {}),
        "created": run.created,
        "git_commit": run.git_commit,
        **(resumed_code(run) if start else {}),
        **{f"stream_{k}": v for k, v in named_benchmark.protocol.items()},
        "seed": config.seed,
        "device": _device_name(device),
        **({"processes": distributed.world_size()} if distributed.world_size() > 1 else {}),
        "versions": package_versions(),
        "config": config.to_dict(),
    }
    hinge = next((p for p in strategy.plugins if isinstance(p, HardPairHingePlugin)), None)
    wandb_logger = next((x for x in evaluator.loggers if isinstance(x, WandBLogger)), None)
    confusion = next(p for p in strategy.plugins if isinstance(p, ConfusionMatrixPlugin))
    model = strategy.model
    names = named_benchmark.class_names
    for task in train_and_evaluate(
        strategy,
        named_benchmark.benchmark.train_stream,
        named_benchmark.benchmark.test_stream,
        start,
    ):
        index = task.index
        run.train_seconds += task.train_seconds
        run.wall_seconds += task.seconds
        run.matrix.append(task.trained_row)
        run.per_task.append(grouped_accuracy(task.row, test_sizes, index))
        run.stream_forgetting.append(task.stream_forgetting)
        run.seen_stream_accuracy.append(metric_value(task.metrics, SEEN_ACCURACY))
        run.hard_pairs.append(
            {
                kind: [named_pair(pair, names) for pair in pairs]
                for kind, pairs in hard_pairs_of(hinge).items()
            }
        )
        if index == n_exps - 1:  # the confusion matrix once every task is trained
            run.confusion = confusion.matrix(named_benchmark.class_order).tolist()

        def write_experience(index: int = index) -> None:
            # results, plots, TensorBoard, checkpoint, and only then "finished": a kill at
            # any point between redoes this experience on --resume, and the redone
            # experience cuts the logs back to the previous checkpoint.
            run_lock.check(output_dir)  # a .lock deleted by hand is written again
            summary = _write_results(output_dir, run, test_sizes, full_protocol, n_exps, False)
            kill_point("results", index)
            figures = _write_plots(
                output_dir,
                run,
                protocol=full_protocol,
                confusion=None if run.confusion is None else np.asarray(run.confusion),
                class_names=[names[c] for c in named_benchmark.class_order],
                final=index == n_exps - 1,
            )
            kill_point("plots", index)
            _log_results(tb_logger, figures, summary["metrics"], run, strategy.clock, wandb_logger)
            kill_point("tensorboard", index)
            ckpt.save_checkpoint(
                {
                    "completed": index + 1,
                    "config": config.to_dict(),
                    "stream": fingerprint,
                    "model": ckpt.model_state(model),
                    "clock": ckpt.clock_state(strategy.clock),
                    "evaluator": ckpt.evaluator_state(evaluator),
                    "rng": ckpt.rng_state(),
                    "run": dict(run.__dict__),
                    "csv_rows": csv_row_counts(output_dir),
                    "tb_files": tensorboard_sizes(output_dir, tb_logger),
                },
                output_dir / "checkpoints",
            )
            log(
                f"task {index}: accuracy on seen classes {run.per_task[-1]['all']:.2f}% "
                f"(AIA so far {summary['metrics']['AIA']:.2f}%)"
            )

        # files on rank 0 (torchrun); a failure there stops every rank alike
        distributed.on_main(write_experience)
    if len(run.matrix) == n_exps:

        def finish() -> None:
            # Also when resumed from the last checkpoint: its plots and TensorBoard points
            # were written before it, only the "finished" results may be missing.
            strategy.model.save(output_dir / "final_model.pt", config)
            log_hparams(
                tb_logger.writer,
                config,
                cil_metrics(run.matrix, test_sizes),
                strategy.clock.train_iterations,
            )
            _write_results(output_dir, run, test_sizes, full_protocol, n_exps, True)

        distributed.on_main(finish)


def resumed_code(run: RunState) -> Dict[str, Any]:
    """``{"git_commit_resumed": git_commit()}`` when this process's code differs from the code
    that began the run (a resume after a commit or an edit), else ``{}``."""
    if run.created is None and run.git_commit is None:
        return {}  # a checkpoint of an older version: its code was not recorded
    now = git_commit()
    return {} if now == run.git_commit else {"git_commit_resumed": now}


def _quiet(message: str) -> None:
    """The ``log`` of ranks other than 0 under torchrun: says nothing."""


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def _write_results(
    output_dir: Path,
    run: RunState,
    sizes: Sequence[int],
    protocol: Dict[str, Any],
    n_exps: int,
    finished: bool,
) -> Dict[str, Any]:
    """results.json and results.txt (atomic); ``finished`` only once everything else of the
    last experience is written."""
    metrics = cil_metrics(run.matrix, sizes)
    summary = {
        "finished": finished,
        "completed_tasks": len(run.matrix),
        "metrics": metrics,
        "avalanche_stream_forgetting": run.stream_forgetting[-1],
        "per_task": run.per_task,
        "accuracy_matrix": run.matrix,
        "test_sizes": list(sizes),
        "hard_pairs": run.hard_pairs,
        "seen_stream_accuracy": run.seen_stream_accuracy,
        "confusion_matrix": run.confusion,
        "train_seconds": run.train_seconds,
        "wall_seconds": run.wall_seconds,
        "protocol": protocol,
    }
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"metric {name} is {value}: the accuracy matrix holds "
                f"non-finite values {run.matrix}"
            )
    write_text_atomic(json.dumps(summary, indent=2) + "\n", output_dir / "results.json")
    write_text_atomic(format_report(summary), output_dir / "results.txt")
    return summary


def _write_plots(
    output_dir: Path,
    run: RunState,
    *,
    protocol: Optional[Dict[str, Any]] = None,
    confusion=None,
    class_names: Optional[Sequence[str]] = None,
    final: bool = True,
) -> Dict[str, RenderedFigure]:
    """The run's figures as PNG (300 dpi) and PDF, each atomic (``figures.save_figure``):
    ``accuracy_matrix``, ``accuracy_curve`` and, when ``confusion`` is given,
    ``confusion_matrix``. Returns ``{TensorBoard tag: RenderedFigure}``.

    Each figure is drawn once at ``PREVIEW_DPI`` (``figures.render_pixels``: its TensorBoard
    image), which also fixes its layout for the saves. Before the last task (``final``
    false) the files are previews, those pixels as PNG, no PDF (rendering a 300-dpi PNG and
    a PDF of each figure after every task took most of a small run's time); the last task
    writes the full set.

    Args:
        protocol: the run's protocol (results.json's): the title (method, dataset, preset)
            and the classes per task (x axis: classes seen; without it: the task number).
        confusion: ``[C, C]`` counts of the last evaluation in the stream's class order
            (``ConfusionMatrixPlugin.matrix(named_benchmark.class_order)``), or ``None``.
        class_names: the class names in that order, for the confusion matrix's ticks.
    """
    protocol = protocol or {}
    title = run_title(protocol)
    sizes = protocol.get("stream_classes_per_experience")
    figures = {
        "results/accuracy_matrix": accuracy_matrix_figure(run.matrix, title),
        "results/accuracy_curve": run_curve_figure(run.per_task, sizes, title),
    }
    if confusion is not None:
        figures["results/confusion_matrix"] = confusion_matrix_figure(
            confusion, sizes or [len(confusion)], title, class_names
        )
    rendered = {}
    for tag, figure in figures.items():
        stem = output_dir / tag.split("/")[-1]
        rendered[tag] = RenderedFigure(figure, render_pixels(figure))
        if final:
            save_figure(figure, stem)
        else:
            write_png(rendered[tag].pixels, stem.parent / f"{stem.name}.png", PREVIEW_DPI)
    return rendered


class RenderedFigure(NamedTuple):
    """A run's figure and its pixels at ``PREVIEW_DPI`` (``[H, W, 3]`` uint8)."""

    figure: Any
    pixels: np.ndarray


def _log_results(
    tb_logger,
    figures: Dict[str, RenderedFigure],
    metrics: Dict[str, float],
    run: RunState,
    clock,
    wandb_logger: Optional[WandBLogger] = None,
) -> None:
    """The results so far as TensorBoard scalars and images (flushed), and as W&B values and
    images under the same names when ``wandb_logger`` is given.

    Stepped, as every scalar the package adds, by Avalanche's ``clock.train_iterations``
    (the stage-1 minibatches trained so far): they overlay Avalanche's own curves.
    """
    writer = tb_logger.writer
    step = clock.train_iterations
    scalars = {
        **{f"results/{name}": value for name, value in metrics.items()},
        "results/accuracy_seen_classes": run.per_task[-1]["all"],
        "results/task": len(run.per_task) - 1,
    }
    # the pixels SummaryWriter.add_figure would draw, drawn once by _write_plots
    for tag, rendered in figures.items():
        writer.add_image(tag, rendered.pixels, global_step=step, dataformats="HWC")
    for name, value in scalars.items():
        writer.add_scalar(name, value, global_step=step)
    writer.flush()
    if wandb_logger is not None:
        pixels = {tag: rendered.pixels for tag, rendered in figures.items()}
        wandb_logger.log_values(scalars, step, images=pixels)


def log_hparams(writer, config: CLIPHingeConfig, metrics: Dict[str, float], step: int) -> None:
    """TensorBoard's HParams: every config key (lists and ``None`` as JSON text) with the
    final AIA, AA, Last and Forgetting (``hparam/<name>``), so the runs of a sweep sort in
    the HParams tab. Written once, when the run finishes, into the run's event file."""
    from torch.utils.tensorboard.summary import hparams

    values = {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in config.to_dict().items()
    }
    finals = {f"hparam/{k}": float(v) for k, v in metrics.items()}
    # into the run's own event file (SummaryWriter.add_hparams would open a second one)
    file_writer = writer._get_file_writer()
    for summary in hparams(values, finals):
        file_writer.add_summary(summary, step)
    for tag, value in finals.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


def print_summary(results: Dict[str, Any], out=None) -> None:
    """Print results.txt-style lines for a finished (or partial) run (to ``out``, default
    the current ``sys.stdout``)."""
    out = out or sys.stdout
    metrics = results["metrics"]
    out.write(
        format_results(
            results["per_task"],
            metrics,
            results["avalanche_stream_forgetting"],
            {
                k: v
                for k, v in results["protocol"].items()
                if k in ("model", "pretrained", "class_order", "seed", "device")
            },
        )
    )
    out.write(
        f"wall time {results['wall_seconds']:.1f} s (training {results['train_seconds']:.1f} s)\n"
    )
