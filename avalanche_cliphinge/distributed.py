"""Several processes launched by ``torchrun``: ranks, gathers, broadcasts; no-ops in one.

The method runs the same way in every process (stage 1, stage 2 without LoRA, evaluation);
the frozen-encoder passes over a dataset are shared out, a whole one-process batch at a time
(``deal_batches``, ``gather_batches``), so every rank ends up with the features one process
would have computed, bit for bit. Training on images splits each one-process minibatch by
rows instead (``shard_rows``): uncached stage 1 gathers its frozen features back in row
order (``gather_rows``), stage 2 with LoRA sums the ranks' gradients of the head and the
adapter (``all_reduce_gradients``), equal to one process up to summation order. At the end
of each experience rank 0's learned tensors are copied to every rank
(``sync_learned_state``), so no GPU non-determinism can make ranks drift apart. Files are
the application's business, on rank 0 (``on_main``).

Every helper works, and does nothing, when ``torch.distributed`` is not initialised: a plain
``python ...`` is one process. ``init_from_env`` joins torchrun's process group (NCCL on
GPUs, gloo on CPU), each process on ``cuda:LOCAL_RANK``; Avalanche's ``init_distributed`` is
not used (it takes the global rank as the CUDA index, wrong on a second machine).
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import re
from typing import Any, Callable, Iterable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DEFAULT_TIMEOUT_MINUTES, DistributedError

__all__ = [
    "DEFAULT_TIMEOUT_MINUTES",
    "DistributedError",
    "agree",
    "all_reduce_gradients",
    "all_true",
    "broadcast_object",
    "deal_batches",
    "gather_batches",
    "gather_rows",
    "init_from_env",
    "is_echo",
    "is_initialized",
    "is_main",
    "launched",
    "local_rank",
    "local_world_size",
    "on_main",
    "peer_lost",
    "rank",
    "shard_rows",
    "shutdown",
    "sync_learned_state",
    "world_size",
]

T = TypeVar("T")


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


# ---- collectives ----------------------------------------------------------------------------
def _comm_device() -> torch.device:
    """Where tensors go for a collective: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; ``obj`` itself in one process)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself in one process)."""
    if not is_initialized():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def deal_batches(batches: Sequence[T]) -> List[T]:
    """This rank's share of a pass's batches: every ``world_size``-th, from its rank.

    Whole batches are dealt, never samples, so each batch is encoded exactly as one process
    would encode it (a batch split differently can change features in the last bits).
    """
    return list(batches[rank() :: world_size()])


def gather_batches(mine: List[Tensor], sizes: Sequence[int], device: torch.device | str) -> Tensor:
    """Every rank's batch outputs, back in batch order, on ``device``.

    Args:
        mine: this rank's outputs (``[sizes[b], ...]``) of the batches ``deal_batches`` gave
            it, in that order; rank 0 holds at least one.
        sizes: rows of every batch of the pass, in order.
        device: where the result goes.

    Returns:
        ``[sum(sizes), ...]``: what one process looping over every batch would concatenate.
    """
    if not is_initialized():
        return torch.cat(mine).to(device)
    world, me = world_size(), rank()
    shape, dtype = broadcast_object((tuple(mine[0].shape[1:]), mine[0].dtype) if me == 0 else None)
    counts = [sum(sizes[q::world]) for q in range(world)]
    comm = _comm_device()
    padded = torch.zeros((max(counts), *shape), dtype=dtype, device=comm)
    if mine:
        padded[: counts[me]] = torch.cat(mine).to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces, offsets = [], [0] * world
    for index, size in enumerate(sizes):
        owner = index % world
        pieces.append(parts[owner][offsets[owner] : offsets[owner] + size])
        offsets[owner] += size
    return torch.cat(pieces).to(device)


def shard_rows(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> slice:
    """This rank's rows of a minibatch of ``n`` rows: ``world`` contiguous shards in rank
    order, the first ``n % world`` one row longer (empty ones when ``n < world``).

    ``rank_`` and ``world`` default to this process's; in one process the slice is every row.
    """
    me = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = me * base + min(me, extra)
    return slice(start, start + base + (me < extra))


def gather_rows(mine: Tensor, n: int) -> Tensor:
    """Every rank's shard (``shard_rows(n)``) of a minibatch's rows, back in row order.

    Args:
        mine: this rank's ``[rows, ...]`` (no gradient kept), ``rows`` possibly 0; the other
            dimensions and the dtype are the same on every rank.
        n: rows of the whole minibatch.

    Returns:
        ``[n, ...]`` on ``mine``'s device: ``mine`` itself in one process.
    """
    if not is_initialized() or world_size() == 1:
        return mine
    world, comm = world_size(), _comm_device()
    padded = torch.zeros(
        (-(-n // world), *mine.shape[1:]), dtype=mine.dtype, device=comm
    )  # a shard has at most ceil(n / world) rows
    padded[: mine.shape[0]] = mine.detach().to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces = [part[: len(range(n)[shard_rows(n, q, world)])] for q, part in enumerate(parts)]
    return torch.cat(pieces).to(mine.device)


def all_reduce_gradients(params: Iterable[Tensor], *extras: Tensor) -> List[Tensor]:
    """Sum every rank's ``.grad`` of ``params`` into each rank's, in place; also ``extras``.

    With each rank's gradients those of its rows' summed losses divided by the whole
    minibatch's size, the result is the gradient of one process's mean loss (up to summation
    order). A missing gradient counts as zeros (a rank with no rows) and every parameter
    then holds one. One all-reduce per dtype; nothing in one process.

    Returns:
        ``extras`` summed over the ranks (detached; the tensors themselves in one process).
    """
    params = list(params)
    if not is_initialized() or world_size() == 1:
        return list(extras)
    comm = _comm_device()
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tensors = [p.grad for p in params] + [e.detach() for e in extras]
        groups: dict = {}
        for index, tensor in enumerate(tensors):
            groups.setdefault(tensor.dtype, []).append(index)
        summed: List[Optional[Tensor]] = [None] * len(tensors)
        for indices in groups.values():
            flat = torch.cat([tensors[i].reshape(-1).to(comm) for i in indices])
            dist.all_reduce(flat)
            start = 0
            for i in indices:
                size = tensors[i].numel()
                summed[i] = flat[start : start + size].view_as(tensors[i])
                start += size
        for p, total in zip(params, summed):
            p.grad.copy_(total)
        return [total.to(e.device) for e, total in zip(extras, summed[len(params) :])]


def _learned_tensors(model: torch.nn.Module) -> List[Tensor]:
    """What training changes in a ``CLIPHingeModel``: every state entry but the frozen CLIP's
    (its LoRA adapters included). The tensors share the model's storage."""
    return [
        t
        for name, t in model.state_dict().items()
        if not name.startswith("clip.") or "lora_" in name
    ]


def sync_learned_state(model: torch.nn.Module) -> None:
    """Copy rank 0's learned tensors (prompts, Gaussians, heads, adapters) into every rank's
    ``model`` in place, one broadcast per dtype; nothing in one process.

    Every rank trains the same way from the same features, so on CPU the copy changes no
    bit; on GPUs it stops run-to-run non-determinism from making ranks drift apart.
    """
    if not is_initialized() or world_size() == 1:
        return
    comm = _comm_device()
    groups: dict = {}
    for tensor in _learned_tensors(model):
        groups.setdefault(tensor.dtype, []).append(tensor)
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch.cat([t.reshape(-1).to(comm) for t in tensors])
            dist.broadcast(flat, src=0)
            if not is_main():
                start = 0
                for tensor in tensors:
                    tensor.copy_(flat[start : start + tensor.numel()].view_as(tensor))
                    start += tensor.numel()
    invalidate = getattr(model, "invalidate_text_cache", None)
    if invalidate is not None and not is_main():
        invalidate()  # cached text features of the prompts just overwritten


# ---- errors shared by every rank ----------------------------------------------------------
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
