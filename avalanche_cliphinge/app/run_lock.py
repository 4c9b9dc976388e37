"""One writer per run folder: an advisory ``fcntl.flock`` on the folder itself.

The lock is taken before a run looks at (or deletes, or writes) anything in its folder and
held until the run ends; the operating system drops it when the process dies, however it
dies, so the lock of a killed run never blocks the next one. It is taken on an open
descriptor of the folder, so deleting ``<run folder>/.lock`` by hand does not free it, and on
``.lock`` too (what runs of older versions lock). From the moment the lock is taken the file
says who holds it (PID, host, start time); a second run into the folder, whatever its flags,
is refused with that line. A ``.lock`` deleted during a run is written again at the run's
next write boundary (``check``), and until then the refusal names the holder's PID from the
kernel's lock table. The file is emptied when the run ends, and never removed.

Where a folder cannot be locked (a file system without ``flock`` on folders, such as NFS),
``.lock`` alone is locked, as before, and ``check`` takes a deleted one again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

LOCK_NAME = ".lock"
#: How long a refused run waits for the holder to write its line (it does right after
#: taking the lock) before saying it could not read it.
HOLDER_WAIT_S = 1.0


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock."""


class LockFileError(RuntimeError):
    """The folder's ``.lock`` file exists but this process cannot open it."""


class RunLock:
    """The advisory lock of one run folder, re-entrant within a process (``hold``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None  # .lock
        self._dir_fd: Optional[int] = None  # the folder (None where it cannot be locked)
        self._holder: Optional[Dict[str, object]] = None
        #: what ``.lock`` held before this process wrote its line: put back on release
        #: unless the run claimed the folder (``announce``), so a refused run leaves it as is
        self._previous = b""
        self._claimed = False
        self._depth = 0

    def acquire(self) -> None:
        """Take the lock without waiting and write who holds it into ``.lock``.

        Raises:
            RunLockedError: another process holds it (the message names the holder).
            LockFileError: ``.lock`` exists but cannot be opened (another user's, unreadable,
                a folder).
        """
        self._dir_fd = _lock_folder(self.folder)  # RunLockedError when taken
        try:
            self._fd = self._open_and_lock_file()
            self._previous = os.pread(self._fd, 1 << 16, 0)
            self._holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            }
            self._write_holder()
        except BaseException:
            self.release()
            raise

    def _open_and_lock_file(self) -> int:
        """``.lock`` opened and locked: its descriptor."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except (PermissionError, IsADirectoryError) as err:
            if not os.path.lexists(self.path):
                raise  # the folder itself is not writable: the caller's error says so
            raise LockFileError(_lock_file_advice(self.path, err)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a run of an older version (or on NFS) holds .lock
            holder = _holder_line(self.path, fd)
            os.close(fd)
            raise RunLockedError(_in_use(self.folder, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write_holder(self) -> None:
        """The holder's line into ``.lock``, written over the old content, never emptied in
        between (a reader sees the old line or the new one)."""
        data = (json.dumps(self._holder) + "\n").encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def announce(self) -> None:
        """The run claims the folder (its checks passed): write the holder's line again (it
        is written when the lock is taken); ``.lock`` is emptied when the lock is released."""
        self._claimed = True
        if self._fd is not None:
            self._write_holder()

    def check(self) -> None:
        """Before a write boundary: a ``.lock`` deleted or replaced since the lock was taken
        is created, locked and written again.

        Raises:
            RunLockedError: the folder could not be locked and another run took the new
                ``.lock`` (this run stops, leaving the folder to it).
        """
        if self._fd is None:
            return
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        except OSError:
            return
        mine = os.fstat(self._fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return
        if not self.folder.is_dir():
            return  # the folder is gone: the next write says so
        try:
            fd = self._open_and_lock_file()
        except RunLockedError:
            raise RunLockedError(
                f"another run took {self.folder} after its {LOCK_NAME} file was deleted "
                "during this run; this run stops and leaves the folder to it (its "
                "checkpoints so far are there): wait for that run to end, then continue with "
                "--resume, or choose another --output-dir"
            ) from None
        os.close(self._fd)
        self._fd = fd
        self._previous = b""  # a new .lock: nothing to put back
        self._write_holder()

    def release(self) -> None:
        """Empty ``.lock`` (a run that claimed the folder) or put back what it held before
        (a run refused before its claim leaves every file as it found it), then drop the
        lock."""
        try:
            if self._fd is not None and self._holder is not None:
                kept = b"" if self._claimed else self._previous
                os.pwrite(self._fd, kept, 0)
                os.ftruncate(self._fd, len(kept))
        finally:
            # .lock first: a run that takes the folder next then finds it free as well
            for name in ("_fd", "_dir_fd"):
                fd = getattr(self, name)
                if fd is not None:
                    os.close(fd)  # closing the descriptor releases its flock
                    setattr(self, name, None)
            self._holder = None


def _lock_folder(folder: Path) -> Optional[int]:
    """An open descriptor of ``folder`` holding its exclusive ``flock``; ``None`` where a
    folder cannot be opened or locked (``.lock`` alone then serves)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(folder, flags)
    except PermissionError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_line(folder / LOCK_NAME, fd)
        os.close(fd)
        raise RunLockedError(_in_use(folder, holder)) from None
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def _in_use(folder: Path, holder: str) -> str:
    return (
        f"{folder} is in use by another run ({holder}); wait for it to end or "
        "choose another --output-dir"
    )


def _holder_line(path: Path, locked_fd: int) -> str:
    """``PID 123 on host, started ...`` from the holder's ``.lock``; the PID from the
    kernel's lock table (the lock of ``locked_fd``'s file) where the file was deleted or
    says nothing."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            with open(path, "rb") as file:
                text = file.read(4096).decode()
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError):
            text = ""
        if text is None:
            break
        line = _parse_holder(text)
        if line is not None:
            return line
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)  # taken a moment ago: its line comes right after
    pid = _pid_in_lock_table(locked_fd)
    who = f"PID {pid}" if pid else "PID unknown"
    if text is None:
        return f"{who}; its {LOCK_NAME} file was deleted, the lock holds all the same"
    return f"{who}; its {LOCK_NAME} file does not say more"


def _parse_holder(text: str) -> Optional[str]:
    try:
        info = json.loads(text or "{}")
        parts = [f"PID {int(info['pid'])}"]
        if info.get("host") and info["host"] != socket.gethostname():
            parts.append(f"on {info['host']}")
        parts.append(f"started {info['started']}")
        return ", ".join(parts)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _pid_in_lock_table(fd: int) -> Optional[int]:
    """The PID holding the ``flock`` of ``fd``'s file, from Linux's ``/proc/locks``."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    pid = int(fields[4])
                    return pid or None  # 0: a process this one cannot see
    except (OSError, ValueError):
        pass
    return None


def _lock_file_advice(path: Path, err: OSError) -> str:
    """One line for a ``.lock`` this process cannot open, with what to do."""
    reason = err.strerror or type(err).__name__
    if os.path.isdir(path):
        return (
            f"{path} is a folder, not a lock file; remove it (rmdir {path}), or choose "
            "another --output-dir"
        )
    try:
        owner_uid = os.stat(path).st_uid
    except OSError:
        owner_uid = os.geteuid()
    if owner_uid != os.geteuid():
        try:
            import pwd

            owner = f"user {pwd.getpwuid(owner_uid).pw_name}"
        except (ImportError, KeyError):
            owner = f"user id {owner_uid}"
        return (
            f"cannot open the lock file {path} ({reason}): it belongs to {owner}; if no run "
            f"of theirs uses {path.parent}, remove it (rm {path}; it holds no results), or "
            "choose another --output-dir"
        )
    return (
        f"cannot open the lock file {path} ({reason}); make it readable and writable "
        f"(chmod u+rw {path}) or remove it (it holds no results), or choose another "
        "--output-dir"
    )


_HELD: Dict[str, RunLock] = {}


def _key(folder: Path) -> str:
    return str(Path(folder).resolve())


def check(folder: Path) -> None:
    """``RunLock.check`` of the lock this process holds on ``folder`` (none: nothing)."""
    lock = _HELD.get(_key(folder))
    if lock is not None:
        lock.check()


@contextmanager
def hold(folder: Path) -> Iterator[RunLock]:
    """Hold the lock of ``folder`` (which must exist) for the ``with`` block.

    Nested ``hold`` calls on one folder in one process share the lock (the CLI takes it
    before loading the model, ``run_experiment`` again for the run itself); the outermost
    releases it. Raises ``RunLockedError`` when another process holds it, ``LockFileError``
    when its ``.lock`` cannot be opened.
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
