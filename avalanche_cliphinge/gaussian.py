"""Per-class Gaussian statistics of frozen image features, and batched sampling from them."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


def class_gaussian_stats(features: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and covariance of the features of each class.

    Args:
        features: ``[n, dim]`` features.
        labels: ``[n]`` integer class ids.

    Returns:
        ``(classes [k], means [k, dim], covs [k, dim, dim])`` with ``classes`` sorted; the
        covariance is the unbiased sample covariance (divides by ``n_c - 1``) and is all zeros
        for a class with a single sample. Computed in float64, returned in float32.
    """
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected features [n, dim] and labels [n], got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    classes, order, bounds = _group_by_class(labels)
    feats = features.detach()
    means, covs = [], []
    for i in range(len(classes)):
        mu, cov = _one_class_stats(feats, order[bounds[i] : bounds[i + 1]])
        means.append(mu)
        covs.append(cov)
    classes = classes.to(labels.device)
    if not means:
        dim = features.shape[1]
        return classes, features.new_zeros(0, dim), features.new_zeros(0, dim, dim)
    return classes, torch.stack(means).float(), torch.stack(covs).float()


def _group_by_class(labels: Tensor) -> Tuple[Tensor, Tensor, List[int]]:
    """``(classes [k] sorted, order [n], bounds)``: the samples of ``classes[i]`` are
    ``order[bounds[i]:bounds[i + 1]]``, in their original order (a stable sort). On the CPU."""
    host = labels.detach().cpu()
    order = torch.argsort(host, stable=True)
    classes, counts = torch.unique_consecutive(host[order], return_counts=True)
    return classes, order, [0] + torch.cumsum(counts, 0).tolist()


def _one_class_stats(features: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean ``[dim]`` and unbiased covariance ``[dim, dim]`` of ``features[rows]``, float64."""
    x = features[rows.to(features.device)].double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / max(x.shape[0] - 1, 1)


def make_positive_definite(covs: Tensor, shrinkage: float = 0.0, jitter: float = 1e-4) -> Tensor:
    """``(1 - s) * cov + s * (trace(cov) / dim) * I + jitter * I`` for each ``[dim, dim]`` matrix.

    ``shrinkage`` ``s`` in [0, 1] pulls the covariance towards a scaled identity (useful when
    a class has fewer samples than dimensions); ``jitter`` adds a fixed ridge. Input
    ``[..., dim, dim]``; output same shape, symmetric.
    """
    dim = covs.shape[-1]
    # in place on one new tensor; the same floats as summing the scaled identities
    out = (covs + covs.transpose(-1, -2)).mul_(0.5)
    diagonal = torch.diagonal(out, dim1=-2, dim2=-1)
    scale = diagonal.sum(-1) / dim
    out.mul_(1 - shrinkage)
    diagonal.add_(shrinkage * scale[..., None]).add_(jitter)
    return out


def rapf_shrink_cov(covs: Tensor) -> Tensor:
    """RAPF's covariance shrinkage (its ``shrink_cov``), for each ``[dim, dim]`` matrix.

    Adds the mean of the diagonal to every diagonal entry and the mean of the non-zero
    off-diagonal entries to every off-diagonal entry: ``cov + d * I + o * (1 - I)``. Input
    ``[..., dim, dim]``; output same shape. RAPF applies it after its ``1e-4 * I`` ridge.
    """
    dim = covs.shape[-1]
    eye = torch.eye(dim, dtype=covs.dtype, device=covs.device)
    diag_mean = torch.diagonal(covs, dim1=-2, dim2=-1).mean(-1)
    off = covs * (1 - eye)
    nonzero = (off != 0).sum((-2, -1)).clamp(min=1)
    off_mean = off.sum((-2, -1)) / nonzero
    return covs + diag_mean[..., None, None] * eye + off_mean[..., None, None] * (1 - eye)


def pool_gaussian_stats(
    count_a: Tensor, mean_a: Tensor, cov_a: Tensor, count_b: Tensor, mean_b: Tensor, cov_b: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Count, mean and unbiased covariance of the union of two samples, from their statistics.

    With ``n = n_a + n_b``: ``mean = (n_a mean_a + n_b mean_b) / n`` and
    ``cov = ((n_a - 1) cov_a + (n_b - 1) cov_b + n_a n_b / n (mean_a - mean_b)(...)^T) / (n - 1)``,
    the same as the statistics of the concatenated samples. Shapes: counts ``[k]``, means
    ``[k, dim]``, covariances ``[k, dim, dim]``; computed in float64.
    """
    n_a, n_b = count_a.double(), count_b.double()
    n = n_a + n_b
    delta = mean_a.double() - mean_b.double()
    mean = (n_a[:, None] * mean_a.double() + n_b[:, None] * mean_b.double()) / n[:, None]
    scatter = (
        (n_a - 1).clamp(min=0)[:, None, None] * cov_a.double()
        + (n_b - 1).clamp(min=0)[:, None, None] * cov_b.double()
        + (n_a * n_b / n)[:, None, None] * delta[:, :, None] * delta[:, None, :]
    )
    cov = scatter / (n - 1).clamp(min=1)[:, None, None]
    return count_a + count_b, mean, cov


#: How ``ClassGaussians`` keeps its sampling factors (the config key ``gaussian_storage``).
STORAGES = ("full", "bf16", "lowrank")
#: Transient memory that ``fit`` and ``sample`` may use besides their inputs, their outputs
#: and the store: classes are fitted and drawn at most this many bytes' worth at a time, and
#: at most an eighth of the store's bytes (but ``MIN_CHUNK_BYTES``, and one class, at least).
DEFAULT_CHUNK_BYTES = 64 << 20
MIN_CHUNK_BYTES = 8 << 20
# float64 [dim, dim] matrices alive at once per class while a chunk is fitted (statistics,
# the positive-definite step, the factor)
_FIT_MATRICES = 4
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


class ClassGaussians(nn.Module):
    """A Gaussian per class over frozen image features; buffers, so it moves and saves.

    Buffers: ``class_ids [k]`` (long), ``counts [k]`` (long, samples seen), ``means [k, dim]``
    (float32), ``fit_params [3]`` (float64 shrinkage, jitter and rapf_shrink of the fits; NaN
    before the first) and the sampling factors of the positive-definite covariances, held
    once, in blocks of rows (``<part>_<b>``, one block per ``fit`` that adds classes; a block
    smaller than a chunk takes the next fit's classes too). Adding classes never copies the
    store. ``fit`` and ``sample`` work a chunk of classes at a time: at most ``chunk_bytes``
    and an eighth of the store's bytes of temporaries (``MIN_CHUNK_BYTES``, and one class, at
    least), so their peak is the store plus a chunk, besides their inputs and outputs.

    * ``storage="full"``: ``chols_<b> [k_b, dim, dim]`` float32, the lower Cholesky factor
      ``L`` of the covariance ``S``; a draw is ``mean + L z``, ``z ~ N(0, I_dim)``.
      ``4 * dim**2`` bytes a class.
    * ``"bf16"``: the same ``L`` rounded to bfloat16 (8 significant bits), upcast to float32
      a chunk at a time to draw: draws have covariance ``L' L'^T``, a few tenths of a percent
      from ``S`` (relative Frobenius error). ``2 * dim**2`` bytes a class.
    * ``"lowrank"``: ``basis_<b> [k_b, dim, rank]`` ``U`` (the top ``rank`` eigenvectors of
      ``S`` scaled by the square roots of their eigenvalues) and ``std_<b> [k_b, dim]``
      ``sqrt(D)`` with ``D = diag(S) - diag(U U^T)`` (clamped at 0); a draw is
      ``mean + U z1 + sqrt(D) * z2`` (``z1 ~ N(0, I_rank)``, ``z2 ~ N(0, I_dim)``), of
      covariance ``U U^T + diag(D)``: exact variances, the covariance of the top ``rank``
      directions, no correlation beyond them. ``rank = dim`` gives ``S``.
      ``4 * dim * (rank + 1)`` bytes a class. The eigenvectors come from ``top_eigenpairs``
      (a float32 ``eigh`` refined in float64 when the rank is small against ``dim``); a draw
      is computed in place in the features, and also takes ``4 * n * rank`` bytes of noise
      per class drawn.

    The sample covariances are not kept: ``sample_covariance_of`` recovers them from the
    factors by undoing the positive-definite step, and a class that comes back is merged
    through them (exactly up to float rounding with ``"full"``; with the approximation
    otherwise).

    Args:
        dim: feature dimension.
        storage: one of ``STORAGES``.
        rank: columns of the ``"lowrank"`` basis, ``1..dim`` (ignored otherwise).
        chunk_bytes: the most transient memory of ``fit`` and ``sample`` (see above).
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

    def __len__(self) -> int:
        return int(self.class_ids.numel())

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

    # ---- fitting --------------------------------------------------------------------------
    def fit(
        self,
        features: Tensor,
        labels: Tensor,
        shrinkage: float = 0.0,
        jitter: float = 1e-4,
        rapf_shrink: bool = False,
    ) -> Tensor:
        """Add the Gaussians of the classes in ``labels``; merge those already fitted.

        A class fitted before (it comes back in a later experience, or the same experience
        is trained twice) gets the pooled statistics of its old and new samples, as if all of
        them had been fitted at once (``pool_gaussian_stats``; its old covariance recovered
        from the stored factor). Classes are fitted ``chunk_bytes`` at a time into fresh rows
        of the store.

        Args:
            features: ``[n, dim]`` frozen image features (before any adapter).
            labels: ``[n]`` class ids.
            shrinkage, jitter: see ``make_positive_definite``.
            rapf_shrink: then apply ``rapf_shrink_cov`` (RAPF's ImageNet-R setting).
                Every fit of one ``ClassGaussians`` must use the same three values.

        Returns:
            ``[k]`` the class ids fitted, sorted.
        """
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected features [n, dim] and labels [n], got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if features.shape[1] != self.dim:
            raise ValueError(
                f"features have {features.shape[1]} dimensions but these "
                f"Gaussians {self.dim}; fit them on the same encoder's features"
            )
        self._check_fit_params(shrinkage, jitter, rapf_shrink)
        device = self.means.device
        classes, order, bounds = _group_by_class(labels)
        counts = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.long)
        known = torch.isin(classes, self.class_ids.cpu())
        known_rows = self.index_of(classes[known]).cpu() if known.any() else None
        new_ids = classes[~known]
        block, fresh, first = self._room_for(new_ids.numel()) if new_ids.numel() else (0, [], 0)
        new_means = torch.empty(new_ids.numel(), self.dim, device=device)
        step = self._classes_per_chunk(
            _FIT_MATRICES * 8 * self.dim * self.dim,
            self.factor_bytes
            + new_ids.numel() * factor_bytes_per_class(self.dim, self.storage, self.rank),
        )
        n_known = n_new = 0
        feats = features.detach()
        for start in range(0, classes.numel(), step):
            span = slice(start, start + step)
            chunk = range(start, min(start + step, classes.numel()))
            means = torch.empty(len(chunk), self.dim, dtype=torch.float64, device=device)
            covs = torch.empty(len(chunk), self.dim, self.dim, dtype=torch.float64, device=device)
            for j, i in enumerate(chunk):
                mean, cov = _one_class_stats(feats, order[bounds[i] : bounds[i + 1]])
                # rounded to float32, as class_gaussian_stats returns them
                means[j], covs[j] = mean.float(), cov.float()
                del cov
            chunk_counts = counts[span].to(device)
            old = known[span].to(device)
            rows = None
            if old.any():
                rows = known_rows[n_known : n_known + int(old.sum())]
                pd_old = self._implied_covariance(rows, torch.float64)
                chunk_counts[old], means[old], covs[old] = pool_gaussian_stats(
                    self.counts[rows],
                    self.means[rows],
                    self._recover(pd_old),
                    chunk_counts[old],
                    means[old],
                    covs[old],
                )
                del pd_old
            for c, n_c in zip(classes[span].tolist(), chunk_counts.tolist()):
                if n_c < 2:
                    warnings.warn(
                        f"class {c} has {n_c} training sample: its covariance is "
                        f"zero, replay draws its mean plus jitter {jitter:g} noise",
                        stacklevel=2,
                    )
            pd = make_positive_definite(covs, shrinkage, jitter)
            del covs
            if rapf_shrink:
                pd = rapf_shrink_cov(pd)
            factors = self._factorise(pd, classes[span], jitter)
            del pd
            if rows is not None:
                self._write_rows(rows, [f[old] for f in factors])
                self.counts[rows] = chunk_counts[old]
                self.means[rows] = means[old].float()
                n_known += rows.numel()
            new = ~old
            k_new = int(new.sum())
            for dest, f in zip(fresh, factors):
                dest[first + n_new : first + n_new + k_new] = f[new]
            new_means[n_new : n_new + k_new] = means[new].float()
            n_new += k_new
        if new_ids.numel():
            self._commit(block, fresh)
            self.class_ids = torch.cat([self.class_ids, new_ids.to(device)])
            self.counts = torch.cat([self.counts, counts[~known].to(device)])
            self.means = torch.cat([self.means, new_means])
        return classes.to(device)

    def _check_fit_params(self, shrinkage: float, jitter: float, rapf_shrink: bool) -> None:
        if not 0 <= shrinkage <= 1:
            raise ValueError(
                f"shrinkage must be in [0, 1], got {shrinkage!r} (config key covariance_shrinkage)"
            )
        if not (jitter >= 0 and math.isfinite(jitter)):
            raise ValueError(
                f"jitter must be >= 0 and finite, got {jitter!r} (config key covariance_jitter)"
            )
        given = torch.tensor([shrinkage, jitter, float(rapf_shrink)], dtype=torch.float64)
        saved = self.fit_params.detach().cpu()
        if torch.isnan(saved).any():
            self.fit_params.copy_(given)
        elif not torch.equal(saved, given):
            raise ValueError(
                f"these Gaussians were fitted with shrinkage={saved[0].item():g}, "
                f"jitter={saved[1].item():g}, rapf_shrink={bool(saved[2])}, now "
                f"{shrinkage:g}, {jitter:g}, {bool(rapf_shrink)}; fit every experience with "
                "the same values (a class that comes back is merged through them)"
            )

    def _write_rows(self, rows: Tensor, factors: List[Tensor]) -> None:
        """Overwrite the stored factors of ``rows`` in place."""
        for block, pos, local, _ in self._groups(rows.to(self.means.device)):
            for stored, new in zip(self._block(block), factors):
                stored.index_copy_(0, local, new if pos is None else new[pos])

    def _recover(self, pd: Tensor) -> Tensor:
        """Sample covariances ``[c, d, d]`` whose positive-definite step gives ``pd``
        (float64): the ridge removed, ``rapf_shrink_cov`` and the shrinkage undone. With
        shrinkage 1 only the trace survives the step: ``trace / dim * I`` (which gives the
        same ``pd``)."""
        shrinkage, jitter, rapf = self.fit_params.tolist()
        if math.isnan(shrinkage):
            raise ValueError(
                "these Gaussians were loaded from a state without their fit "
                "parameters (an older file): fit them once to set them"
            )
        dim = self.dim
        eye = torch.eye(dim, dtype=pd.dtype, device=pd.device)
        base = pd - (2 * jitter if rapf else jitter) * eye
        if rapf:  # rapf_shrink_cov doubled the diagonal mean and the off-diagonal mean
            diag_mean = torch.diagonal(base, dim1=-2, dim2=-1).mean(-1) / 2
            off_mean = (base * (1 - eye)).sum((-2, -1)) / (2 * max(dim * (dim - 1), 1))
            base = base - diag_mean[..., None, None] * eye - off_mean[..., None, None] * (1 - eye)
        scale = torch.diagonal(base, dim1=-2, dim2=-1).sum(-1)[..., None, None] / dim
        if shrinkage < 1:
            return (base - shrinkage * scale * eye) / (1 - shrinkage)
        return scale * eye

    # ---- reading --------------------------------------------------------------------------
    def index_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """Rows ``[len(class_ids)]`` of ``class_ids`` in the buffers; ``KeyError`` for a class
        never fitted."""
        ids = torch.as_tensor(class_ids, dtype=torch.long, device=self.class_ids.device).reshape(-1)
        if not len(self):
            if ids.numel():
                raise KeyError(f"no Gaussian fitted for classes {ids.tolist()}")
            return ids
        ordered, perm = torch.sort(self.class_ids)
        pos = torch.searchsorted(ordered, ids).clamp(max=len(self) - 1)
        missing = ordered[pos] != ids
        if missing.any():
            raise KeyError(f"no Gaussian fitted for classes {ids[missing].tolist()}")
        return perm[pos]

    def mean_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """``[len(class_ids), dim]`` means."""
        return self.means[self.index_of(class_ids)]

    def covariance_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """``[len(class_ids), dim, dim]`` float32 covariances of the draws (after the
        positive-definite step; with ``"bf16"`` or ``"lowrank"`` the approximation)."""
        return self._implied_covariance(self.index_of(class_ids), torch.float32)

    def sample_covariance_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """``[len(class_ids), dim, dim]`` float32 unbiased sample covariances, recovered from
        the stored factors by undoing the positive-definite step (with shrinkage 1 only their
        trace is kept: ``trace / dim * I``)."""
        rows = self.index_of(class_ids)
        out = torch.empty(rows.numel(), self.dim, self.dim, device=self.means.device)
        step = self._classes_per_chunk(_FIT_MATRICES * 8 * self.dim * self.dim, self.factor_bytes)
        for start in range(0, rows.numel(), step):
            pd = self._implied_covariance(rows[start : start + step], torch.float64)
            out[start : start + step] = self._recover(pd).float()
        return out

    @property
    def covs(self) -> Tensor:
        """``[k, dim, dim]`` sample covariances of every class, in row order
        (``sample_covariance_of``; materialised on each access)."""
        return self.sample_covariance_of(self.class_ids)

    # ---- sampling -------------------------------------------------------------------------
    def sample(
        self,
        class_ids: Sequence[int] | Tensor,
        n_per_class: int,
        generator: Optional[torch.Generator] = None,
        out: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Draw ``n_per_class`` features of every class, a chunk of classes at a time.

        Args:
            out: optional float32 ``[len(class_ids) * n_per_class, dim]`` contiguous tensor
                on the buffers' device that receives the features (see ``sample_rows``).

        Returns:
            ``(features [len(class_ids) * n_per_class, dim], labels [same])``, grouped by
            class in the order of ``class_ids`` (shuffle them yourself when needed); the
            features are ``out`` when given.
        """
        return self.sample_rows(self.index_of(class_ids), n_per_class, generator, out)

    def sample_rows(
        self,
        rows: Tensor,
        n_per_class: int,
        generator: Optional[torch.Generator] = None,
        out: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """``sample`` for buffer rows ``[k]`` from ``index_of`` (no lookup).

        A training step that draws every iteration looks its rows up once per task and
        calls this; with one block of factors nothing is read back from the GPU, with several
        the split of the same ``rows`` tensor is made once. With a ``generator`` on the
        buffers' device the noise is drawn there too. The noise ``z [k, n, dim]`` is drawn in
        one call, into the features (then ``[k, n, rank]`` for ``"lowrank"``), so a seed gives
        the same draws whatever ``chunk_bytes``; the features are computed over it in place.

        Memory besides the store and the features: a chunk of classes (their factors, and
        for ``"full"``/``"bf16"`` their draws before they are written), and for
        ``"lowrank"`` the ``k * n * rank`` float32 noise. ``out`` (float32 ``[k * n, dim]``,
        contiguous, on the buffers' device) receives the features, so a caller drawing
        repeatedly can keep one buffer; the same seed gives the same features either way.
        """
        device = self.means.device
        k = rows.numel()
        noise_device = device if generator is None else generator.device
        if out is None:
            out = torch.randn(
                k, n_per_class, self.dim, generator=generator, device=noise_device
            ).to(device)
        else:
            shape = (k * n_per_class, self.dim)
            if (
                tuple(out.shape) != shape
                or out.dtype != torch.float32
                or out.device != device
                or not out.is_contiguous()
            ):
                raise ValueError(
                    f"out must be a contiguous float32 tensor of shape {shape} on {device}, "
                    f"got {out.dtype} {tuple(out.shape)} on {out.device}"
                )
            out = out.view(k, n_per_class, self.dim)
            if noise_device == device:
                out.normal_(generator=generator)  # what torch.randn draws
            else:
                out.copy_(
                    torch.randn(k, n_per_class, self.dim, generator=generator, device=noise_device)
                )
        low = None
        if self.storage == "lowrank":
            low = torch.randn(
                k, n_per_class, self.rank, generator=generator, device=noise_device
            ).to(device)
            # the chunk's factors and means, and its noise copied when the rows are in
            # several blocks
            per_row = factor_bytes_per_class(self.dim, self.storage, self.rank) + 4 * (
                self.dim + n_per_class * (self.dim + self.rank)
            )
        else:
            per_row = (
                factor_bytes_per_class(self.dim, self.storage, self.rank)
                + (4 * self.dim * self.dim if self.storage == "bf16" else 0)
                + 12 * n_per_class * self.dim
            )
        step = self._classes_per_chunk(per_row, self.factor_bytes)
        for block, pos, local, glob in self._groups(rows.to(device)):
            for start in range(0, local.numel(), step):
                span = slice(start, start + step)
                where = None if pos is None else pos[span]
                z = out[span] if where is None else out.index_select(0, where)
                z_low = (
                    None
                    if low is None
                    else (low[span] if where is None else low.index_select(0, where))
                )
                drawn = self._draw(block, local[span], z, z_low, alone=k == 1)
                if drawn is not z:
                    z.copy_(drawn)
                del drawn
                z += self.means[glob[span]][:, None, :]
                if where is not None:
                    out.index_copy_(0, where, z)
        labels = self.class_ids[rows.to(device)].repeat_interleave(n_per_class)
        return out.reshape(k * n_per_class, self.dim), labels

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
