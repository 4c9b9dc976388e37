"""The start and the end of a command's own process: ``cliphinge``, ``python -m
avalanche_cliphinge`` and ``python experiments/<script>.py``.

A run imports torch, Avalanche and open_clip (seconds, during which the cyclic garbage
collector makes several full passes over a heap that only grows), and at its end the
interpreter tears down every module and object although nothing is left to write (about
1.5 s after the smoke run). A process that is the command's alone needs neither:
``heavy_imports`` turns the collector off during the imports and freezes what they made
(``gc.freeze``: later collections skip it), and ``finish`` ends a successful command with
``os._exit`` once its output is flushed and the exit handlers have run.

Both act only in a process the entry point has ``claim``-ed, and only when the interpreter
was started on that command: a caller that runs the command inside its own process
(``main([...])``, ``runpy`` in a test) keeps its garbage collector and its own end.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

#: The package ``python -m`` starts the command from.
PACKAGE = __name__.split(".")[0]

_claimed = False


def started_on_command() -> bool:
    """Whether the interpreter was started on the command line now in ``sys.argv``.

    ``python SCRIPT ARGS`` and a console script (``cliphinge ARGS``): ``sys.argv`` is the
    tail of ``sys.orig_argv`` (interpreter options before it); ``python -m
    avalanche_cliphinge ARGS``: ``-m avalanche_cliphinge ARGS`` is. A caller that runs a
    command in its own process sets another ``sys.argv`` (``runpy`` in a test) or none.
    """
    started, argv = list(getattr(sys, "orig_argv", ())), list(sys.argv)
    if not started or not argv or not argv[0]:
        return False
    return started[-len(argv) :] == argv or started[-len(argv) - 1 :] == ["-m", PACKAGE, *argv[1:]]


def claim() -> bool:
    """Called by a command's entry point first: the process is the command's when the
    interpreter was started on it (``started_on_command``). Returns whether it is."""
    global _claimed
    _claimed = started_on_command()
    return _claimed


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Around a command's imports of torch, Avalanche and open_clip: in a claimed process
    the cyclic garbage collector is off during them and what they made is frozen after
    (``gc.freeze``); elsewhere nothing changes. An exit through the interpreter's teardown
    (a failure) unfreezes it first, so that teardown collects it as usual."""
    if not _claimed or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
        atexit.register(gc.unfreeze)


def finish(code: int) -> int:
    """The end of a command: ``code`` for ``sys.exit``, or, in a claimed process after a
    successful command (``code`` 0, no thread of its own still running), the end of the
    process without the interpreter's teardown.

    The command has closed its files (results, checkpoints, CSV, TensorBoard, W&B); here
    standard output and error are flushed, the exit handlers run (``atexit``: logging,
    multiprocessing's children, finalizers) and ``os._exit(0)`` ends the process. A failure
    (``code`` not 0) ends through the interpreter as usual, with its messages.
    """
    if not _claimed or code != 0 or _threads_running():
        return code
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stream: the interpreter reports it
        return code
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: the usual exit
        return code
    run_exit_handlers()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # what an exit handler printed into a stream closed since
    os._exit(code)


def _threads_running() -> bool:
    """Whether a thread other than the main one would hold the interpreter's exit."""
    main = threading.main_thread()
    return any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())
