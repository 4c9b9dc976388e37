"""How ``ClassGaussians`` stores its classes: the storage modes of the sampling factors,
their bytes and the chunk budget, and ``GaussianStore``, the buffers (a row per class, the
factors in blocks) with their state-dict loading."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


#: How ``ClassGaussians`` keeps its sampling factors (the config key ``gaussian_storage``).
STORAGES = ("full", "bf16", "lowrank")
#: Transient memory that ``fit`` and ``sample`` may use besides their inputs, their outputs
#: and the store: classes are fitted and drawn at most this many bytes' worth at a time, and
#: at most an eighth of the store's bytes (but ``MIN_CHUNK_BYTES``, and one class, at least).
DEFAULT_CHUNK_BYTES = 64 << 20
MIN_CHUNK_BYTES = 8 << 20
#: Eigenvectors beyond the rank that ``top_eigenpairs`` refines in float64 with the top ones.
RITZ_EXTRA = 16


def top_eigenpairs(pd: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """``(values [..., rank], vectors [..., dim, rank])``: the top ``rank`` eigenpairs of
    symmetric ``pd [..., dim, dim]`` (float64), ascending as ``torch.linalg.eigh`` orders them.

    When ``rank + RITZ_EXTRA`` is at most half of ``dim``: a float32 ``eigh`` (about twice as
    fast as float64 on a CPU) gives the top ``rank + RITZ_EXTRA`` eigenvectors, refined in
    float64 by one step of subspace iteration (``pd @ V``, orthonormalised) and Rayleigh-Ritz
    (``eigh`` of the ``(rank + RITZ_EXTRA)``-square projection of ``pd``). The rank-``rank``
    approximation it gives is within float32 rounding of the exact float64 one (relative
    Frobenius differences of 1e-8 to 4e-7 measured at ``dim`` 512, rank 64). Otherwise (little
    to save) the exact float64 ``eigh``.
    """
    dim = pd.shape[-1]
    extra = min(RITZ_EXTRA, dim - rank)
    if 2 * (rank + extra) > dim:
        values, vectors = torch.linalg.eigh(pd)
        return values[..., -rank:], vectors[..., -rank:]
    start = torch.linalg.eigh(pd.float())[1][..., -(rank + extra) :].double()
    basis = torch.linalg.qr(pd @ start)[0]
    del start
    values, small = torch.linalg.eigh(basis.transpose(-1, -2) @ (pd @ basis))
    return values[..., -rank:], basis @ small[..., -rank:]


def check_storage(storage: str, rank: int, dim: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``storage`` is one of ``STORAGES`` and, for ``"lowrank"``,
    ``rank`` is an integer in ``1..dim``."""
    if storage not in STORAGES:
        raise ValueError(
            f"Gaussian storage {storage!r} is not one of {', '.join(STORAGES)}; "
            "use 'full' (float32 Cholesky factors, the default), 'bf16' or "
            "'lowrank'"
        )
    if storage != "lowrank":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"low-rank Gaussian rank must be an integer >= 1, got {rank!r}; "
            "set gaussian_rank to e.g. 64"
        )
    if dim is not None and rank > dim:
        raise ValueError(
            f"low-rank Gaussian rank {rank} exceeds the feature dimension {dim}; "
            f"set gaussian_rank to at most {dim} ({dim} keeps the full "
            "covariance)"
        )


def factor_bytes_per_class(dim: int, storage: str = "full", rank: int = 64) -> int:
    """Bytes of one class's stored sampling factor (its mean, ``4 * dim``, comes on top).

    ``"full"``: a float32 ``[dim, dim]`` Cholesky factor, ``4 * dim**2`` (1 MiB at ``dim``
    512); ``"bf16"``: the same in bfloat16, ``2 * dim**2`` (512 KiB); ``"lowrank"``: a float32
    ``[dim, rank]`` basis and ``[dim]`` noise scale, ``4 * dim * (rank + 1)`` (130 KiB at
    ``dim`` 512 and rank 64).
    """
    check_storage(storage, rank, dim)
    if storage == "lowrank":
        return 4 * dim * (rank + 1)
    return (2 if storage == "bf16" else 4) * dim * dim


# one block of rows: (global rows' positions in a request, or None for all in order; rows
# local to the block; global rows)
_Group = Tuple[int, Optional[Tensor], Tensor, Tensor]


class GaussianStore(nn.Module):
    """The buffers of ``ClassGaussians``: a row per class, and its sampling factor in blocks.

    Buffers: ``class_ids [k]``, ``counts [k]``, ``means [k, dim]``, ``fit_params [3]`` (see
    ``ClassGaussians``) and the factors in blocks of rows, ``<part>_<b>`` (``chols`` for
    ``"full"`` and ``"bf16"``, ``basis`` and ``std`` for ``"lowrank"``): a new block for each
    ``fit`` that adds classes, or the last one grown while it is smaller than a chunk, so
    adding classes never copies the store. It places rows in blocks (``_room_for``,
    ``_commit``), reads and overwrites them (``_groups``, ``_factors_of``, ``_write_rows``),
    turns positive-definite covariances into factors and back (``_factorise``,
    ``_implied_covariance``), draws from the factors (``_draw``), sizes the chunks
    (``_classes_per_chunk``) and loads a saved state whatever its blocks (and the single
    ``chols`` saved before the blocks). Arguments as ``ClassGaussians``'s.
    """

    def __init__(
        self,
        dim: int,
        storage: str = "full",
        rank: int = 64,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        super().__init__()
        check_storage(storage, rank, dim)
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(
                f"chunk_bytes must be a positive number of bytes, got "
                f"{chunk_bytes!r}; the default is {DEFAULT_CHUNK_BYTES}"
            )
        self.dim, self.storage, self.rank, self.chunk_bytes = dim, storage, rank, chunk_bytes
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("means", torch.zeros(0, dim))
        self.register_buffer("fit_params", torch.full((3,), math.nan, dtype=torch.float64))
        self._sizes: List[int] = []  # rows of each block
        self._layout = 0  # bumped whenever rows move between blocks
        self._plan: Optional[Tuple[Tensor, int, int, List[_Group]]] = None

    # ---- the store ------------------------------------------------------------------------
    @property
    def _parts(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """``{part: (shape of one class's factor, dtype)}`` of the storage."""
        if self.storage == "lowrank":
            return {
                "basis": ((self.dim, self.rank), torch.float32),
                "std": ((self.dim,), torch.float32),
            }
        dtype = torch.bfloat16 if self.storage == "bf16" else torch.float32
        return {"chols": ((self.dim, self.dim), dtype)}

    def _block(self, block: int) -> List[Tensor]:
        return [getattr(self, f"{part}_{block}") for part in self._parts]

    @property
    def factor_bytes(self) -> int:
        """Bytes of the stored sampling factors (all blocks)."""
        return sum(
            t.numel() * t.element_size() for b in range(len(self._sizes)) for t in self._block(b)
        )

    def _classes_per_chunk(self, bytes_per_class: int, store: int) -> int:
        """Classes of ``bytes_per_class`` transient bytes each within the budget, for a
        store of ``store`` bytes: ``chunk_bytes``, at most ``store / 8`` but
        ``MIN_CHUNK_BYTES`` at least; one class at least."""
        budget = min(self.chunk_bytes, max(store // 8, MIN_CHUNK_BYTES))
        return max(1, budget // max(bytes_per_class, 1))

    def _room_for(self, m: int) -> Tuple[int, List[Tensor], int]:
        """``(block, tensors, first row)``: fresh tensors for ``m`` new rows at ``first``,
        either a new block or the last block grown when it is smaller than a chunk
        (``_commit`` copies its rows in). Nothing is registered until ``fit`` fills them."""
        device = self.means.device
        per_class = factor_bytes_per_class(self.dim, self.storage, self.rank)
        store = self.factor_bytes + m * per_class
        grow = bool(self._sizes) and self._sizes[-1] < self._classes_per_chunk(per_class, store)
        block = len(self._sizes) - 1 if grow else len(self._sizes)
        first = self._sizes[-1] if grow else 0
        fresh = [
            torch.empty(first + m, *shape, dtype=dtype, device=device)
            for shape, dtype in self._parts.values()
        ]
        return block, fresh, first

    def _commit(self, block: int, tensors: List[Tensor]) -> None:
        """Make ``tensors`` block ``block`` (a new one, or the last grown: rows it held
        before are copied into the front of ``tensors``)."""
        if block < len(self._sizes):
            for new, old in zip(tensors, self._block(block)):
                new[: old.shape[0]] = old
        for part, tensor in zip(self._parts, tensors):
            name = f"{part}_{block}"
            if block < len(self._sizes):
                setattr(self, name, tensor)
            else:
                self.register_buffer(name, tensor)
        if block < len(self._sizes):
            self._sizes[block] = tensors[0].shape[0]
        else:
            self._sizes.append(tensors[0].shape[0])
        self._layout += 1

    def _groups(self, rows: Tensor) -> List[_Group]:
        """``rows`` split by block. One block: no host sync. Several: one, cached for the
        same ``rows`` tensor (a training step drawing the same rows every step pays once)."""
        if len(self._sizes) <= 1:
            return [(0, None, rows, rows)] if self._sizes else []
        plan = self._plan
        if (
            plan is not None
            and plan[0] is rows
            and plan[1] == rows._version
            and plan[2] == self._layout
        ):
            return plan[3]
        host = rows.detach().cpu()
        starts = torch.tensor([0] + self._sizes[:-1]).cumsum(0)
        block_of = torch.searchsorted(starts, host, right=True) - 1
        groups = []
        for block in torch.unique(block_of).tolist():
            pos = torch.nonzero(block_of == block).flatten()
            local = (host[pos] - starts[block]).to(rows.device)
            pos = pos.to(rows.device)
            groups.append((block, pos, local, rows[pos]))
        self._plan = (rows, rows._version, self._layout, groups)
        return groups

    def _factors_of(self, rows: Tensor) -> List[Tensor]:
        """Copies of the stored factors of ``rows`` (any order, repeats allowed)."""
        rows = rows.to(self.means.device)
        out = [
            torch.empty(rows.numel(), *shape, dtype=dtype, device=rows.device)
            for shape, dtype in self._parts.values()
        ]
        for block, pos, local, _ in self._groups(rows):
            for dest, stored in zip(out, self._block(block)):
                if pos is None:
                    torch.index_select(stored, 0, local, out=dest)
                else:
                    dest.index_copy_(0, pos, stored.index_select(0, local))
        return out

    def _implied_covariance(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """``[len(rows), dim, dim]`` covariance of the draws, from the stored factors."""
        factors = [f.to(dtype) for f in self._factors_of(rows)]
        if self.storage == "lowrank":
            basis, std = factors
            return basis @ basis.transpose(-1, -2) + torch.diag_embed(std * std)
        return factors[0] @ factors[0].transpose(-1, -2)

    def _factorise(self, pd: Tensor, classes: Tensor, jitter: float) -> List[Tensor]:
        """The storage's factors ``[c, ...]`` of positive-definite covariances ``[c, d, d]``
        (float64); ``classes [c]`` name the ones that fall back to a diagonal."""
        if self.storage == "lowrank":
            values, vectors = top_eigenpairs(pd, self.rank)
            basis = vectors * values.clamp(min=0).sqrt()[..., None, :]
            del vectors
            rest = torch.diagonal(pd, dim1=-2, dim2=-1) - (basis * basis).sum(-1)
            return [basis.float(), rest.clamp(min=0).sqrt().float()]
        chols, info = torch.linalg.cholesky_ex(pd)
        for i in torch.nonzero(info).flatten().tolist():
            warnings.warn(
                f"class {int(classes[i])}: covariance not positive definite after "
                f"jitter {jitter:g}; using a diagonal fallback",
                stacklevel=3,
            )
            diag = torch.clamp(torch.diagonal(pd[i]), min=max(jitter, 1e-8))
            chols[i] = torch.diag(diag.sqrt())
        return [chols.to(self._parts["chols"][1])]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        assign = local_metadata.get("assign_to_params_buffers", False)
        device = self.means.device
        # with assign=True the saved tensors become the buffers (moved to this device), so
        # the factors are not held twice while loading
        mine = {
            k[len(prefix) :]: v.to(device) if assign else v
            for k, v in state_dict.items()
            if k.startswith(prefix)
        }
        if "chols" in mine:  # saved before the blocks: one "chols" and the sample "covs"
            legacy = mine.pop("chols")
            mine.pop("covs", None)
            if legacy.numel():
                mine["chols_0"] = legacy
            mine.setdefault("fit_params", torch.full((3,), math.nan, dtype=torch.float64))
        saved = _saved_storage(mine)
        mode = (self.storage, self.rank if self.storage == "lowrank" else None)
        if saved is not None and saved != mode:
            error_msgs.append(
                f"the saved Gaussians are stored as {_storage_name(*saved)} but this model "
                f"keeps {_storage_name(self.storage, self.rank)}; build it with the saved "
                "config's gaussian_storage and gaussian_rank"
            )
            return
        first = next(iter(self._parts))
        n_blocks = sum(1 for k in mine if k.rsplit("_", 1)[0] == first)
        for block in range(len(self._sizes)):
            for part in self._parts:
                delattr(self, f"{part}_{block}")
        self._sizes, self._plan = [], None
        for block in range(n_blocks):
            self._commit(block, [mine[f"{part}_{block}"] for part in self._parts])
        # the buffers grow with every task: take the saved sizes before loading
        for name in list(self._buffers):
            value = mine.get(name)
            if value is not None:
                setattr(self, name, value if assign else torch.empty_like(value, device=device))
        self._layout += 1
        super()._load_from_state_dict(
            {prefix + k: v for k, v in mine.items()},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def _write_rows(self, rows: Tensor, factors: List[Tensor]) -> None:
        """Overwrite the stored factors of ``rows`` in place."""
        for block, pos, local, _ in self._groups(rows.to(self.means.device)):
            for stored, new in zip(self._block(block), factors):
                stored.index_copy_(0, local, new if pos is None else new[pos])

    def _draw(
        self, block: int, local: Tensor, z: Tensor, z_low: Optional[Tensor], alone: bool
    ) -> Tensor:
        """``[c, n, dim]`` zero-mean draws of the block's rows ``local [c]`` from noise ``z``
        (and ``z_low`` for ``"lowrank"``, whose draws overwrite ``z`` and are ``z``).
        ``alone``: the request has one row."""
        if local.numel() == 1 and not alone:
            # a batched matmul of one matrix takes another kernel than of several (other
            # rounding for some shapes): draw a lone row of a larger request twice
            return self._draw(
                block,
                local.repeat(2),
                z.repeat(2, 1, 1),
                None if z_low is None else z_low.repeat(2, 1, 1),
                False,
            )[:1]
        if self.storage == "lowrank":
            basis, std = (t.index_select(0, local) for t in self._block(block))
            # sqrt(D) * z2 + U z1, in place: no [c, n, dim] temporary
            return z.mul_(std[:, None, :]).baddbmm_(z_low, basis.transpose(-1, -2))
        chols = self._block(block)[0].index_select(0, local).float()
        return z @ chols.transpose(-1, -2)


def _saved_storage(state: Dict[str, Tensor]) -> Optional[Tuple[str, int]]:
    """``(storage, rank)`` of saved block tensors, ``None`` when there are none."""
    basis = state.get("basis_0")
    if basis is not None:
        return "lowrank", basis.shape[-1]
    chols = state.get("chols_0")
    if chols is None:
        return None
    return ("bf16" if chols.dtype == torch.bfloat16 else "full"), None


def _storage_name(storage: str, rank: Optional[int]) -> str:
    return f"'lowrank' rank {rank}" if storage == "lowrank" else f"'{storage}'"
