"""Hard pairs: the old and new classes whose features are most alike (``select_hard_pairs``)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def select_hard_pairs(
    new_text: Tensor,
    old_text: Tensor,
    new_ids: Sequence[int],
    old_ids: Sequence[int],
    threshold: float,
    top_k: Optional[int],
    metric: str = "cosine",
) -> List[Tuple[int, int, float]]:
    """Pairs of similar old and new classes.

    Args:
        new_text: ``[n_new, dim]`` features of the new classes (normalised here).
        old_text: ``[n_old, dim]`` features of the old classes (normalised here).
        new_ids: ``n_new`` class ids, row-aligned with ``new_text``.
        old_ids: ``n_old`` class ids, row-aligned with ``old_text``.
        threshold: with ``metric="cosine"`` keep pairs whose cosine similarity is strictly
            greater; with ``"euclidean"`` keep pairs whose unit features are strictly closer
            (RAPF's rule; on unit vectors ``distance**2 = 2 - 2 * cosine``, so 0.55 is cosine
            0.849 and 0.65 is cosine 0.789).
        top_k: keep at most this many pairs (0 keeps none, ``None`` keeps every pair).
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        ``[(old_id, new_id, similarity), ...]`` with the cosine similarity, sorted from the
        most similar; ties are broken by ``old_id`` then ``new_id`` (ascending), so the choice
        is deterministic.
    """
    if len(new_ids) != new_text.shape[0] or len(old_ids) != old_text.shape[0]:
        raise ValueError(
            f"ids and features disagree: {len(new_ids)} new ids for "
            f"{new_text.shape[0]} rows, {len(old_ids)} old ids for "
            f"{old_text.shape[0]} rows"
        )
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if top_k == 0 or len(new_ids) == 0 or len(old_ids) == 0:
        return []
    new_unit = F.normalize(new_text.detach().float(), dim=-1)
    old_unit = F.normalize(old_text.detach().float(), dim=-1)
    sim = new_unit @ old_unit.T
    if metric == "euclidean":
        hard = torch.cdist(new_unit, old_unit) < threshold
    else:
        hard = sim > threshold
    rows, cols = torch.nonzero(hard, as_tuple=True)
    pairs = [
        (int(old_ids[c]), int(new_ids[r]), float(sim[r, c]))
        for r, c in zip(rows.tolist(), cols.tolist())
    ]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs if top_k is None else pairs[:top_k]
