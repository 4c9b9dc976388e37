"""A run's output folder: the files a run writes there, the checks before a run takes it,
cleaning up what an interrupted run left, and cutting the logs back to a checkpoint on resume."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Sequence

from . import checkpoint as ckpt
from . import run_lock
from ..atomic import remove_temp_files, write_bytes_atomic, write_text_atomic
from ..errors import RunError
from .figures import figure_files

#: The figures of a run (``write_plots``), each as PNG and PDF; the confusion matrix once the
#: last task is evaluated.
PLOT_FILES = (
    *figure_files("accuracy_matrix"),
    *figure_files("accuracy_curve"),
    *figure_files("confusion_matrix"),
)
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


def remove_run_files(output_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_leftover_temp_files(output_dir: Path) -> None:
    """Temporary files of atomic writes a killed run left (results, plots, checkpoints)."""
    remove_temp_files(output_dir, lambda name: name in ATOMIC_FILES)
    remove_temp_files(output_dir / "checkpoints", ckpt.is_checkpoint_name)


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
