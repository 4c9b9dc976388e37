"""Per-class Gaussian statistics of features, as functions on tensors: the mean and
covariance of each class, the positive-definite step, RAPF's covariance shrinkage and the
statistics of the union of two samples."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


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
    classes, order, bounds = group_by_class(labels)
    feats = features.detach()
    means, covs = [], []
    for i in range(len(classes)):
        mu, cov = one_class_stats(feats, order[bounds[i] : bounds[i + 1]])
        means.append(mu)
        covs.append(cov)
    classes = classes.to(labels.device)
    if not means:
        dim = features.shape[1]
        return classes, features.new_zeros(0, dim), features.new_zeros(0, dim, dim)
    return classes, torch.stack(means).float(), torch.stack(covs).float()


def group_by_class(labels: Tensor) -> Tuple[Tensor, Tensor, List[int]]:
    """``(classes [k] sorted, order [n], bounds)``: the samples of ``classes[i]`` are
    ``order[bounds[i]:bounds[i + 1]]``, in their original order (a stable sort). On the CPU."""
    host = labels.detach().cpu()
    order = torch.argsort(host, stable=True)
    classes, counts = torch.unique_consecutive(host[order], return_counts=True)
    return classes, order, [0] + torch.cumsum(counts, 0).tolist()


def one_class_stats(features: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
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
