"""Per-class Gaussian statistics of frozen image features, and batched sampling from them."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

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
        raise ValueError(f"expected features [n, dim] and labels [n], got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    feats = features.detach().double()
    classes = torch.unique(labels.detach().cpu()).to(labels.device)
    means, covs = [], []
    for c in classes.tolist():
        x = feats[labels == c]
        mu = x.mean(0)
        centred = x - mu
        denom = max(x.shape[0] - 1, 1)
        means.append(mu)
        covs.append(centred.T @ centred / denom)
    return classes, torch.stack(means).float(), torch.stack(covs).float()


def make_positive_definite(covs: Tensor, shrinkage: float = 0.0,
                           jitter: float = 1e-4) -> Tensor:
    """``(1 - s) * cov + s * (trace(cov) / dim) * I + jitter * I`` for each ``[dim, dim]`` matrix.

    ``shrinkage`` ``s`` in [0, 1] pulls the covariance towards a scaled identity (useful when
    a class has fewer samples than dimensions); ``jitter`` adds a fixed ridge. Input
    ``[..., dim, dim]``; output same shape, symmetric.
    """
    dim = covs.shape[-1]
    eye = torch.eye(dim, dtype=covs.dtype, device=covs.device)
    sym = 0.5 * (covs + covs.transpose(-1, -2))
    scale = torch.diagonal(sym, dim1=-2, dim2=-1).sum(-1) / dim
    return ((1 - shrinkage) * sym + shrinkage * scale[..., None, None] * eye
            + jitter * eye)


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


def pool_gaussian_stats(count_a: Tensor, mean_a: Tensor, cov_a: Tensor, count_b: Tensor,
                        mean_b: Tensor, cov_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
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
    scatter = ((n_a - 1).clamp(min=0)[:, None, None] * cov_a.double()
               + (n_b - 1).clamp(min=0)[:, None, None] * cov_b.double()
               + (n_a * n_b / n)[:, None, None] * delta[:, :, None] * delta[:, None, :])
    cov = scatter / (n - 1).clamp(min=1)[:, None, None]
    return count_a + count_b, mean, cov


class ClassGaussians(nn.Module):
    """A Gaussian per class over frozen image features; buffers, so it moves and saves.

    Buffers: ``class_ids [k]`` (long), ``counts [k]`` (long, samples seen), ``means [k, dim]``,
    ``covs [k, dim, dim]`` (unbiased sample covariances, kept so a class that comes back is
    merged exactly) and ``chols [k, dim, dim]`` (lower Cholesky factors of the
    positive-definite covariances, factorised at ``fit``).
    """

    _BUFFERS = ("class_ids", "counts", "means", "covs", "chols")

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("means", torch.zeros(0, dim))
        self.register_buffer("covs", torch.zeros(0, dim, dim))
        self.register_buffer("chols", torch.zeros(0, dim, dim))

    def __len__(self) -> int:
        return int(self.class_ids.numel())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the buffers grow with every task: take the saved sizes before loading
        for name in self._BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(self, features: Tensor, labels: Tensor, shrinkage: float = 0.0,
            jitter: float = 1e-4, rapf_shrink: bool = False) -> Tensor:
        """Add the Gaussians of the classes in ``labels``; merge those already fitted.

        A class fitted before (it comes back in a later experience, or the same experience
        is trained twice) gets the pooled statistics of its old and new samples, exactly as
        if all of them had been fitted at once (``pool_gaussian_stats``).

        Args:
            features: ``[n, dim]`` frozen image features (before any adapter).
            labels: ``[n]`` class ids.
            shrinkage, jitter: see ``make_positive_definite``.
            rapf_shrink: then apply ``rapf_shrink_cov`` (RAPF's ImageNet-R setting).

        Returns:
            ``[k]`` the class ids fitted.
        """
        classes, means, covs = class_gaussian_stats(features, labels)
        device = self.means.device
        classes = classes.to(device)
        counts = (labels.to(device)[None, :] == classes[:, None]).sum(1)
        known = torch.isin(classes, self.class_ids)
        means, covs = means.double().to(device), covs.double().to(device)
        if known.any():
            rows = self.index_of(classes[known])
            counts[known], means[known], covs[known] = pool_gaussian_stats(
                self.counts[rows], self.means[rows], self.covs[rows], counts[known],
                means[known], covs[known])
        for c, n_c in zip(classes.tolist(), counts.tolist()):
            if n_c < 2:
                warnings.warn(f"class {c} has {n_c} training sample: its covariance is zero, "
                              f"replay draws its mean plus jitter {jitter:g} noise",
                              stacklevel=2)
        pd = make_positive_definite(covs, shrinkage, jitter)
        if rapf_shrink:
            pd = rapf_shrink_cov(pd)
        chols, info = torch.linalg.cholesky_ex(pd)
        for i in torch.nonzero(info).flatten().tolist():
            warnings.warn(f"class {int(classes[i])}: covariance not positive definite after "
                          f"jitter {jitter:g}; using a diagonal fallback", stacklevel=2)
            diag = torch.clamp(torch.diagonal(pd[i]), min=max(jitter, 1e-8))
            chols[i] = torch.diag(diag.sqrt())
        keep = ~torch.isin(self.class_ids, classes)
        self.class_ids = torch.cat([self.class_ids[keep], classes])
        self.counts = torch.cat([self.counts[keep], counts])
        self.means = torch.cat([self.means[keep], means.float()])
        self.covs = torch.cat([self.covs[keep], covs.float()])
        self.chols = torch.cat([self.chols[keep], chols.float()])
        return classes

    def index_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """Rows of ``class_ids`` in the buffers; ``KeyError`` for a class never fitted."""
        ids = torch.as_tensor(class_ids, dtype=torch.long, device=self.class_ids.device)
        match = ids[:, None] == self.class_ids[None, :]
        missing = ~match.any(1)
        if missing.any():
            raise KeyError(f"no Gaussian fitted for classes {ids[missing].tolist()}")
        return match.float().argmax(1)

    def mean_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """``[len(class_ids), dim]`` means."""
        return self.means[self.index_of(class_ids)]

    def covariance_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """``[len(class_ids), dim, dim]`` covariances (after the positive-definite step)."""
        chol = self.chols[self.index_of(class_ids)]
        return chol @ chol.transpose(-1, -2)

    def sample(self, class_ids: Sequence[int] | Tensor, n_per_class: int,
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Draw ``n_per_class`` features of every class in one batched matmul.

        Returns:
            ``(features [len(class_ids) * n_per_class, dim], labels [same])``, grouped by
            class in the order of ``class_ids`` (shuffle them yourself when needed).
        """
        return self.sample_rows(self.index_of(class_ids), n_per_class, generator)

    def sample_rows(self, rows: Tensor, n_per_class: int,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``sample`` for buffer rows ``[k]`` from ``index_of`` (no lookup, no host sync).

        A training step that draws every iteration looks its rows up once per task and
        calls this, so nothing is read back from the GPU. With a ``generator`` on the
        buffers' device the noise is drawn there too.
        """
        k = rows.numel()
        z = torch.randn(k, n_per_class, self.dim, generator=generator,
                        device=self.means.device if generator is None else generator.device)
        z = z.to(self.means.device)
        feats = self.means[rows][:, None, :] + z @ self.chols[rows].transpose(-1, -2)
        labels = self.class_ids[rows].repeat_interleave(n_per_class)
        return feats.reshape(k * n_per_class, self.dim), labels
