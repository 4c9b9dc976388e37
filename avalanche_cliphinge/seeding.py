"""The one seeding rule of the package.

A run has one seed (``config.seed``). Two things come from it and nothing else:

* the global RNGs of torch, numpy and ``random`` are seeded with it once, before the model
  is built (``seed_everything``): they give a random-weight CLIP its weights and serve
  whatever Avalanche or a user's plugin draws from them;
* every draw of the method comes from its own CPU (or device) generator,
  ``generator(seed, purpose, *parts)``: one stream of numbers per purpose (``Draw``) and per
  task or epoch, so an experience draws the same numbers whether the run is fresh, resumed,
  or runs beside other draws.
"""

from __future__ import annotations

import random
from enum import IntEnum
from typing import Optional

import numpy as np
import torch

__all__ = ["Draw", "derive_seed", "generator", "seed_everything"]

_MODULUS = 2**63
_MULTIPLIER = 1_000_003


class Draw(IntEnum):
    """What a generator's numbers are for (the first part after the seed)."""

    PROMPTS = 1  #: learnable context initialisation, per task
    BATCHES = 2  #: stage-1 minibatch order, per task
    REPLAY = 3  #: Gaussian replay samples and their order, per task and epoch
    HINGE = 4  #: hinge pair sampling, per task
    STAGE2 = 5  #: stage-2 minibatch order, per task
    LORA = 6  #: a task's LoRA adapter initialisation


def derive_seed(seed: int, *parts: int) -> int:
    """``seed`` folded with ``parts`` (``s = s * 1_000_003 + part``, modulo 2**63).

    Example: ``derive_seed(1993, Draw.REPLAY, 4, 2)`` seeds task 4's replay in epoch 2.
    """
    value = int(seed)
    for part in parts:
        value = (value * _MULTIPLIER + int(part)) % _MODULUS
    return value % _MODULUS


def generator(
    seed: int, *parts: int, device: Optional[torch.device | str] = None
) -> torch.Generator:
    """A ``torch.Generator`` (CPU unless ``device``) seeded with ``derive_seed(seed, *parts)``."""
    gen = torch.Generator() if device is None else torch.Generator(device=device)
    return gen.manual_seed(derive_seed(seed, *parts))


def seed_everything(seed: int) -> None:
    """Seed torch's (all devices), numpy's and ``random``'s global RNGs with ``seed``."""
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % (2**32))
    random.seed(int(seed))
