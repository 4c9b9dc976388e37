"""Frozen-feature cache: each image goes through the frozen encoder once.

With the image encoder frozen and a deterministic transform (the default: CLIP's eval
preprocessing for training too), the feature of an image never changes. ``FeatureCache``
keeps ``(features, labels)`` per dataset in memory up to a byte budget (least recently used
entries leave first) and, optionally, in ``.pt`` files under a folder so a resumed run or
another run on the same data skips the extraction.

Keys name everything that shapes a feature: the backbone (architecture and weights tag or file
checksum), the device-side preprocessing, and a fingerprint of the dataset (its length, all
its targets, and the bytes of the transformed first, middle and last items, so a changed
transform or file list gives a new key).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import save_atomic

Features = Tuple[Tensor, Tensor]


def dataset_fingerprint(dataset, *extra: object) -> str:
    """A 24-hex-digit key of a dataset of ``(image, label, ...)`` items plus ``extra`` values."""
    digest = hashlib.sha256()
    for value in extra:
        digest.update(repr(value).encode())
    n = len(dataset)
    digest.update(str(n).encode())
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        digest.update(torch.as_tensor(list(targets), dtype=torch.long).numpy().tobytes())
    for index in sorted({0, n // 2, n - 1} if n else set()):
        item = dataset[index][0]
        if isinstance(item, Tensor):
            digest.update(item.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()[:24]


class FeatureCache:
    """``(features [n, dim], labels [n])`` per key, in memory (bounded) and optionally on disk.

    Args:
        max_bytes: memory budget; the least recently used entries are dropped beyond it.
        directory: folder for ``<key>.pt`` files (``None``: memory only).

    One cache can be shared by several strategies on the same stream (comparisons, ablations).
    """

    def __init__(self, max_bytes: int = 8 << 30, directory: Optional[str | Path] = None):
        self.max_bytes = int(max_bytes)
        self.directory = None if directory is None else Path(directory)
        self._entries: "OrderedDict[str, Features]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(entry: Features) -> int:
        return sum(t.numel() * t.element_size() for t in entry)

    @property
    def bytes_used(self) -> int:
        """Bytes held in memory."""
        return sum(self._size(e) for e in self._entries.values())

    def get_or_compute(self, key: str, compute: Callable[[], Features],
                       device: Optional[torch.device] = None) -> Features:
        """The entry of ``key``: from memory, else from disk, else ``compute()`` (then stored).

        An entry read from disk is kept in memory on ``device`` (default: the CPU), so later
        hits need no copy.
        """
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = None
        path = None if self.directory is None else self.directory / f"{key}.pt"
        if path is not None and path.is_file():
            try:
                loaded = torch.load(path, map_location=device or "cpu", weights_only=True)
                entry = (loaded["features"], loaded["labels"])
                self.hits += 1
            except Exception:  # an unreadable cache file is recomputed, never trusted
                entry = None
        if entry is None:
            self.misses += 1
            entry = compute()
            if path is not None:
                save_atomic({"features": entry[0].cpu(), "labels": entry[1].cpu()}, path)
        self._entries[key] = entry
        while len(self._entries) > 1 and self.bytes_used > self.max_bytes:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Drop the in-memory entries (files stay)."""
        self._entries.clear()
