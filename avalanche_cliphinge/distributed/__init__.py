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

Its modules: ``process_group`` (this process's rank, torchrun's variables, joining and
leaving), ``collectives`` (broadcasts, gathers, row shards, gradients, learned state) and
``shared_errors`` (``on_main``, ``agree``: one outcome on every rank; ``is_echo``,
``peer_lost``).
"""

from ..errors import DEFAULT_TIMEOUT_MINUTES, DistributedError
from .collectives import (
    all_reduce_gradients,
    all_true,
    broadcast_object,
    deal_batches,
    gather_batches,
    gather_rows,
    shard_rows,
    sync_learned_state,
)
from .process_group import (
    init_from_env,
    is_initialized,
    is_main,
    launched,
    local_rank,
    local_world_size,
    rank,
    shutdown,
    world_size,
)
from .shared_errors import agree, is_echo, on_main, peer_lost

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
