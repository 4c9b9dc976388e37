"""What Avalanche 0.6 needs from the pinned torch 2.14 that torch no longer gives by itself.

Imported by ``strategy`` (so by ``import avalanche_cliphinge.strategy`` and the package's
``CLIPHingeStrategy``), which applies it once, for every Avalanche strategy of the process.
"""

from __future__ import annotations

import sys
from typing import List

import torch.optim


def restore_torch_optim_modules() -> List[str]:
    """Put back the ``torch.optim.<module>`` attributes (``sgd``, ``adam``, ``optimizer``...)
    that torch 2.14 deletes after importing its optimizers from them.

    Avalanche's ``save_checkpoint`` pickles the strategy with dill, which stores a class by
    reference only when ``getattr(import_module(cls.__module__) ...)`` finds it again; for
    ``torch.optim.sgd.SGD`` that lookup goes through the attribute ``torch.optim.sgd``. Without
    it dill stores the optimizer class by value and fails on a ``typing_extensions`` sentinel
    (``PicklingError``), for every strategy, Avalanche's ``Naive`` included. Only missing
    attributes of submodules already imported are set; nothing is imported or replaced.

    Returns:
        The names set (empty when nothing was missing).
    """
    prefix = f"{torch.optim.__name__}."
    restored = []
    for name, module in list(sys.modules.items()):
        short = name[len(prefix) :]
        if (
            name.startswith(prefix)
            and module is not None
            and "." not in short
            and not hasattr(torch.optim, short)
        ):
            setattr(torch.optim, short, module)
            restored.append(short)
    return restored


restore_torch_optim_modules()
