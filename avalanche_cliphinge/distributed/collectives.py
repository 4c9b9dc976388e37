"""Collectives over the run's processes: broadcasts, dealt batches and their gather, row
shards and their gather, summed gradients, rank 0's learned state copied to every rank.

Each one is a no-op (or the plain one-process result) when no process group is up.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .process_group import is_initialized, is_main, rank, world_size

T = TypeVar("T")


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
