"""``python -m avalanche_cliphinge``: the ``cliphinge`` command."""

import sys

from .app.command import entry

sys.exit(entry())
