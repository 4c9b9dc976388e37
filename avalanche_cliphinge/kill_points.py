"""The private kill points of the run folder's tests: SIGKILL the run at a named write boundary.

``CLIPHINGE_KILL_AT=<point>:<experience>`` in the environment makes ``kill_point`` kill the
process when the run passes that point; unset, every kill point does nothing.
"""

from __future__ import annotations

import os
import signal
from typing import Optional


#: Environment variable of the kill points (tests only): ``<point>:<experience>``.
KILL_ENV = "CLIPHINGE_KILL_AT"


def kill_point(point: str, experience: Optional[int] = None) -> None:
    """SIGKILL this process when ``CLIPHINGE_KILL_AT`` names ``point`` (and ``experience``).

    A test hook, inert unless the variable is set: the kill-point tests stop a run at each
    write boundary exactly, as a power cut or the OOM killer would (no cleanup, no flush).
    """
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    name, _, index = wanted.partition(":")
    if name == point and (not index or experience is None or int(index) == experience):
        os.kill(os.getpid(), signal.SIGKILL)
