"""``ClassGaussians``: a Gaussian per class over frozen image features, fitted, merged and
sampled a chunk of classes at a time (its buffers are kept by ``GaussianStore``)."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .gaussian_stats import (
    group_by_class,
    make_positive_definite,
    one_class_stats,
    pool_gaussian_stats,
    rapf_shrink_cov,
)
from .gaussian_storage import GaussianStore, factor_bytes_per_class

# float64 [dim, dim] matrices alive at once per class while a chunk is fitted (statistics,
# the positive-definite step, the factor)
_FIT_MATRICES = 4


class ClassGaussians(GaussianStore):
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

    def __len__(self) -> int:
        return int(self.class_ids.numel())

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
        classes, order, bounds = group_by_class(labels)
        counts = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.long)
        known = torch.isin(classes, self.class_ids.cpu())
        known_rows = self.index_of(classes[known]).cpu() if known.any() else None
        new_ids = classes[~known]
        block, fresh, first = self._room_for(new_ids.numel()) if new_ids.numel() else (0, [], 0)
        new_means = torch.empty(new_ids.numel(), self.dim, device=device)
        classes_per_chunk = self._classes_per_chunk(
            _FIT_MATRICES * 8 * self.dim * self.dim,
            self.factor_bytes
            + new_ids.numel() * factor_bytes_per_class(self.dim, self.storage, self.rank),
        )
        n_known = n_new = 0
        feats = features.detach()
        for start in range(0, classes.numel(), classes_per_chunk):
            span = slice(start, start + classes_per_chunk)
            chunk = range(start, min(start + classes_per_chunk, classes.numel()))
            means = torch.empty(len(chunk), self.dim, dtype=torch.float64, device=device)
            covs = torch.empty(len(chunk), self.dim, self.dim, dtype=torch.float64, device=device)
            for j, i in enumerate(chunk):
                mean, cov = one_class_stats(feats, order[bounds[i] : bounds[i + 1]])
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
        classes_per_chunk = self._classes_per_chunk(
            _FIT_MATRICES * 8 * self.dim * self.dim, self.factor_bytes
        )
        for start in range(0, rows.numel(), classes_per_chunk):
            pd = self._implied_covariance(rows[start : start + classes_per_chunk], torch.float64)
            out[start : start + classes_per_chunk] = self._recover(pd).float()
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
        classes_per_chunk = self._classes_per_chunk(per_row, self.factor_bytes)
        for block, pos, local, glob in self._groups(rows.to(device)):
            for start in range(0, local.numel(), classes_per_chunk):
                span = slice(start, start + classes_per_chunk)
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
