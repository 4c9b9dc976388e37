"""This process in torchrun's group: its rank and the run's size, joining and leaving.

Every function answers for one process (rank 0 of 1) when no group is up.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import DEFAULT_TIMEOUT_MINUTES, DistributedError


# ---- who am I -----------------------------------------------------------------------------
def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 in one process)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes of the run (1 in one process)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints)."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={value!r} is not an integer; "
            "launch with torchrun, which sets it"
        ) from None


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 in one process)."""
    return _env_int("LOCAL_RANK", 0) if is_initialized() else 0


def local_world_size() -> int:
    """Processes of the run on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 otherwise)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1)) if launched() else 1


# ---- joining and leaving ------------------------------------------------------------------
def init_from_env(
    device: Optional[str] = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
) -> str:
    """This process's device; under torchrun with several processes, also join their group.

    In one process (plain ``python``, or torchrun with one process) nothing is initialised:
    the device is ``device``, else ``cuda`` when available, else ``cpu``. With several, the
    device type comes from ``device`` (``cpu`` or ``cuda``, default ``cuda`` when available)
    and each process takes ``cuda:LOCAL_RANK``; the group uses NCCL on CUDA, gloo on CPU, and
    ``timeout_minutes`` for every collective. A group already initialised is kept.

    Raises:
        DistributedError: a CUDA index given under torchrun, ``LOCAL_RANK`` beyond the GPUs
            this machine shows, a bad timeout, or torchrun's variables missing.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not launched():
        return device
    if not timeout_minutes > 0:
        raise DistributedError(
            f"the process-group timeout must be positive, got {timeout_minutes} minutes"
        )
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise DistributedError(
            f"--device {device} is not a device; under torchrun pass --device cuda or --device cpu"
        ) from None
    local = _env_int("LOCAL_RANK", 0)
    if kind.type == "cuda":
        if kind.index is not None:
            raise DistributedError(
                f"--device {device}: under torchrun every process takes "
                "cuda:LOCAL_RANK; pass --device cuda or leave it out"
            )
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} but this machine shows "
                f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif kind.type != "cpu":
        raise DistributedError(f"--device {device}: several processes run on cpu or cuda")
    if not is_initialized():
        try:
            dist.init_process_group(
                "nccl" if kind.type == "cuda" else "gloo",
                timeout=datetime.timedelta(minutes=timeout_minutes),
            )
        except ValueError as err:  # torchrun's MASTER_ADDR, RANK... missing
            raise DistributedError(
                f"cannot join the process group ({err}); launch with torchrun"
            ) from None
        atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Leave the process group (nothing when none is up)."""
    if is_initialized():
        dist.destroy_process_group()
