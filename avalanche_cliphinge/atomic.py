"""Atomic file writes for the run folder.

Every file a run rewrites (results, plots, ``config.json``, checkpoints, the rewritten CSV
logs and TensorBoard files of a resume) goes through ``write_atomic``: a temporary file
``.<name>.<random>`` in the same folder, fsynced, renamed over the target, then the folder
fsynced. A reader, or a crash at any moment, sees the old file or the new one, never a part.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

from .errors import first_line
from .kill_points import kill_point


def _umask_mode() -> int:
    """``0o666`` minus the process umask: what ``open(path, "w")`` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_prefix(name: str) -> str:
    """The prefix of ``write_atomic``'s temporary files for a target called ``name``."""
    return f".{name}."


def write_atomic(
    path: Path,
    mode: str,
    write: Callable[[Any], None],
    kill_tag: Optional[str] = None,
    experience: Optional[int] = None,
) -> None:
    """Write through a temporary file in the same folder, fsync, rename over ``path``, fsync
    the folder: a reader (or a crash) sees the old file or the new one, never a partial one.

    ``kill_tag`` names the kill points ``<tag>_write`` (the data handed to the file, not yet
    flushed) and ``<tag>_temp`` (the temporary file complete, not yet renamed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            write(file)
            if kill_tag:
                kill_point(f"{kill_tag}_write", experience)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; results are for everyone
        if kill_tag:
            kill_point(f"{kill_tag}_temp", experience)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomic(path, "w", lambda file: file.write(text))


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomic(path, "wb", lambda file: file.write(data))


def remove_temp_files(folder: Path, is_target: Callable[[str], bool]) -> List[Path]:
    """Delete the temporary files a killed ``write_atomic`` left directly in ``folder``.

    Only ``.<name>.<random>`` files whose ``<name>`` passes ``is_target`` (a file the caller
    writes atomically) are removed. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        stem, dot, suffix = path.name[1:].rpartition(".")
        if path.name.startswith(".") and dot and suffix and is_target(stem) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_atomic(obj: Any, path: Path, experience: Optional[int] = None) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file, fsync, rename).

    torch reports a full disk as ``RuntimeError`` (``inline_container.cc ... unexpected
    pos``); it is raised as an ``OSError`` naming ``path``.
    """

    import torch  # here: the module's text writers serve commands that never import torch

    def write(file):
        try:
            torch.save(obj, file)
        except RuntimeError as err:
            reason = first_line(err, 160)
            raise OSError(
                errno.EIO, f"torch.save failed, disk full? ({reason})", str(path)
            ) from None

    write_atomic(
        path,
        "wb",
        write,
        kill_tag="checkpoint" if experience is not None else None,
        experience=experience,
    )
