"""Errors shared by every rank: rank 0's work and its outcome on every rank (``on_main``),
a failure anywhere stopping every rank (``agree``), which rank reports an error
(``is_echo``), and a lost peer told in one sentence (``peer_lost``).
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Callable, List, Optional, TypeVar

import torch.distributed as dist

from ..errors import DistributedError
from .collectives import broadcast_object
from .process_group import is_initialized, is_main, rank, world_size

T = TypeVar("T")

_ORIGIN = "_cliphinge_rank"
#: How gloo reports, in a collective, a process of the group that ended (killed, crashed).
_PEER_LOST = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe")


def peer_lost(err: BaseException) -> Optional[str]:
    """What happened, in one sentence, when ``err`` is the process group's report that
    another process of the run ended (gloo: ``Connection closed by peer``); ``None`` for
    any other error.

    With 2 processes the one that ended is the other rank; with more, torchrun's summary
    names it.
    """
    if not is_initialized() or not isinstance(err, RuntimeError):
        return None
    if isinstance(err, DistributedError):
        return None
    text = str(err)
    found = _PEER_LOST.search(text)
    if found is None or "gloo" not in text:
        return None
    me, world = rank(), world_size()
    who = f"rank {1 - me}" if world == 2 else "another"
    return (
        f"{who} of the run's {world} torchrun processes ended ({found.group(0).lower()}, "
        f"seen by rank {me}); every process stops"
    )


def is_echo(err: BaseException) -> bool:
    """Whether ``err`` is a copy of another rank's error (``on_main``, ``agree``): that rank
    reports it, this one only stops."""
    origin = getattr(err, _ORIGIN, None)
    return origin is not None and origin != rank()


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling, else a ``DistributedError`` with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return DistributedError(f"{type(err).__name__}: {err}")


def _raise_from(err: Exception, origin: int) -> None:
    setattr(err, _ORIGIN, origin)
    raise err


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only (file checks, writes, reads of the output folder); its result,
    or its error, on every rank.

    Every rank must call it at the same point. An ``Exception`` of ``fn`` is raised on every
    rank (a copy elsewhere, ``is_echo``), so all of them stop with the same error.
    """
    if not is_initialized():
        return fn()
    verdict: Any = None
    own: Optional[Exception] = None
    if is_main():
        try:
            verdict = ("ok", fn())
        except Exception as err:
            own, verdict = err, ("error", _portable(err))
    kind, value = broadcast_object(verdict)
    if kind == "error":
        _raise_from(own if own is not None else value, 0)
    return value


def agree(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, then stop everywhere if it failed anywhere.

    The lowest failing rank raises its own error; every other rank raises a copy of it
    (``is_echo``), so no rank waits for ones that stopped (data missing on one machine).
    """
    if not is_initialized():
        return fn()
    try:
        result, failure = fn(), None
    except Exception as err:
        result, failure = None, err
    reports: List[Any] = [None] * world_size()
    dist.all_gather_object(reports, None if failure is None else _portable(failure))
    first = next((q for q, report in enumerate(reports) if report is not None), None)
    if first is not None:
        _raise_from(failure if first == rank() else reports[first], first)
    return result
