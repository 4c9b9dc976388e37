"""One writer per run folder: an advisory ``fcntl.flock`` on ``<run folder>/.lock``.

The lock is taken before a run looks at (or deletes, or writes) anything in its folder and
held until the run ends; the operating system drops it when the process dies, however it
dies, so the lock of a killed run never blocks the next one. While a run holds it the file
says who (PID, host, start time); a second run into the folder, whatever its flags, is
refused with that line. The file is emptied when the run ends, and never removed (removing
a lock file lets two processes lock two different files of one name).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The advisory lock of one run folder, re-entrant within a process (``hold``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._announced = False
        self._depth = 0

    def acquire(self) -> None:
        """Take the lock without waiting; ``RunLockedError`` naming the holder if taken."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.folder} is in use by another run ({holder}); wait for it to end or "
                "choose another --output-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def announce(self) -> None:
        """Write this process's PID, host and start time into the lock file (once)."""
        if self._fd is None or self._announced:
            return
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)
        self._announced = True

    def release(self) -> None:
        """Empty the file if this process wrote to it, then drop the lock."""
        if self._fd is None:
            return
        try:
            if self._announced:
                os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
            self._announced = False


def _read_holder(fd: int) -> str:
    """``PID 123 on host, started ...`` from the holder's lock file, as far as it says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        parts = [f"PID {int(info['pid'])}"]
        if info.get("host") and info["host"] != socket.gethostname():
            parts.append(f"on {info['host']}")
        parts.append(f"started {info['started']}")
        return ", ".join(parts)
    except (ValueError, KeyError, TypeError, OSError):
        return "PID not written yet: it is starting"


_HELD: Dict[str, RunLock] = {}


def _key(folder: Path) -> str:
    return str(Path(folder).resolve())


@contextmanager
def hold(folder: Path) -> Iterator[RunLock]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block.

    Nested ``hold`` calls on one folder in one process share the lock (the CLI takes it
    before loading the model, ``run_experiment`` again for the run itself); the outermost
    releases it. Raises ``RunLockedError`` when another process holds it.
    """
    key = _key(folder)
    lock = _HELD.get(key)
    if lock is None:
        lock = RunLock(folder)
        lock.acquire()
        _HELD[key] = lock
    lock._depth += 1
    try:
        yield lock
    finally:
        lock._depth -= 1
        if lock._depth == 0:
            _HELD.pop(key, None)
            lock.release()
