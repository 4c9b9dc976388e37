"""The errors a run can stop with, in a module that imports nothing but the standard library.

The command line catches them (``app.cli.EXPECTED_ERRORS``); defined here, rather than in
the modules that raise them (which import torch, open_clip and Avalanche), the command can
answer ``--help`` and refuse a bad request before importing any of those. Each is also a
name of its raising module (``model.backbone.BackboneError`` is this ``BackboneError``).
"""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_TIMEOUT_MINUTES",
    "BackboneError",
    "CheckpointError",
    "DistributedError",
    "RunError",
    "first_line",
    "load_failure",
]

#: How long a collective waits for the other ranks before the run stops with a
#: ``DistributedError`` (``--dist-timeout``'s default).
DEFAULT_TIMEOUT_MINUTES = 30.0


class BackboneError(RuntimeError):
    """The requested CLIP model or its weights could not be loaded."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, or from another run)."""


class DistributedError(RuntimeError):
    """Several processes cannot run as asked (launch, device), or another rank failed."""


class RunError(RuntimeError):
    """The output folder or the checkpoints do not allow the requested run."""


#: A terminal's colour and style codes (``ESC [ ... m``): torch puts some in its messages.
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: What ``torch.load(weights_only=True)`` names when a file holds a pickled Python object.
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``err``'s message, to quote in a one-line error.

    Terminal colour codes are removed. A line longer than ``limit`` characters is cut at the
    last space before the limit and ends with `` ...``, never inside a word; a line with no
    space there is kept whole. ``""`` when the message is empty.
    """
    line = next(
        (
            text
            for text in (_TERMINAL_CODES.sub("", raw).strip() for raw in str(err).splitlines())
            if text
        ),
        "",
    )
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit + 1)
    return line if cut <= 0 else line[:cut].rstrip(" ,;:") + " ..."


def load_failure(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` could not read a file, in a few words:
    ``"<error type>: <first line>"``, or, for a file holding a pickled Python object (a
    file another program wrote), that object's name."""
    unsafe = _UNSAFE_GLOBAL.search(str(err))
    if unsafe is not None:
        return (
            f"it holds a pickled Python object, {unsafe.group(1)}, which torch.load with "
            "weights_only=True refuses; this package's files hold tensors and plain values only"
        )
    return f"{type(err).__name__}: {first_line(err)}"
