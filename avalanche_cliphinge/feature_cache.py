"""Frozen-feature cache: each image goes through the frozen encoder once.

With the image encoder frozen and a deterministic transform (the default: CLIP's eval
preprocessing for training too), the feature of an image never changes. ``FeatureCache``
keeps ``(features, labels)`` per dataset in memory up to a byte budget (least recently used
entries leave first) and, optionally, in ``.pt`` files under a folder so a resumed run or
another run on the same data skips the extraction.

Keys name everything that shapes a feature: the backbone (architecture and weights tag or file
checksum), the device-side preprocessing, and a fingerprint of the dataset: its length, all
its targets, the bytes of the transformed first, middle and last items (a changed transform
or file list gives a new key), and the data under it: for a file-backed dataset the path,
size and modification time of every file (an image replaced in place gives a new key), for
an in-memory one (tensors, numpy arrays) the content.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .atomic import save_atomic

Features = Tuple[Tensor, Tensor]


#: Attributes through which Avalanche datasets, subsets and concatenations reach their data.
_WRAPPERS = ("_flat_data", "_datasets", "datasets", "dataset", "_dataset")
#: Attributes listing the files of a file-backed dataset: ``ImageFileDataset.paths``,
#: torchvision's ``DatasetFolder.samples`` / ``ImageFolder.imgs`` (``(path, target)`` pairs).
_FILE_LISTS = ("paths", "samples", "imgs")
#: Attributes holding the data of an in-memory dataset (``TensorDataset``, CIFAR's arrays).
_ARRAYS = ("tensors", "data")
_content_digests: Dict[int, Tuple[Callable[[], object], tuple, bytes]] = {}


def _leaves(dataset, depth: int = 0, seen: Optional[set] = None) -> List[object]:
    """The datasets at the bottom of Avalanche's wrappers, each once."""
    seen = set() if seen is None else seen
    if id(dataset) in seen or depth > 32:
        return []
    seen.add(id(dataset))
    inner = [
        getattr(dataset, name) for name in _WRAPPERS if name in getattr(dataset, "__dict__", {})
    ]
    if not inner:
        return [dataset]
    found = []
    for child in inner:
        for item in child if isinstance(child, (list, tuple)) else [child]:
            found += _leaves(item, depth + 1, seen)
    return found


def _files_of(leaf) -> Optional[List[str]]:
    for name in _FILE_LISTS:
        files = getattr(leaf, name, None)
        if isinstance(files, (list, tuple)) and files:
            return [str(f[0] if isinstance(f, (list, tuple)) else f) for f in files]
    return None


def _arrays_of(leaf) -> List[object]:
    arrays = []
    for name in _ARRAYS:
        value = getattr(leaf, name, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (Tensor, np.ndarray)):
                arrays.append(item)
    return arrays


def _content_digest(leaf, arrays: List[object]) -> bytes:
    """Digest of the arrays' bytes, memoised while the arrays are the same objects, at the
    same addresses and (tensors) not modified in place."""
    signature = tuple(
        (
            id(a),
            a.data_ptr() if isinstance(a, Tensor) else a.ctypes.data,
            tuple(a.shape),
            a._version if isinstance(a, Tensor) else 0,
        )
        for a in arrays
    )
    known = _content_digests.get(id(leaf))
    if known is not None and known[0]() is leaf and known[1] == signature:
        return known[2]
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        data = (
            array.detach().cpu().contiguous().numpy()
            if isinstance(array, Tensor)
            else np.ascontiguousarray(array)
        )
        digest.update(str((data.dtype, data.shape)).encode())
        digest.update(memoryview(data.reshape(-1).view(np.uint8)))
    try:
        _content_digests[id(leaf)] = (weakref.ref(leaf), signature, digest.digest())
    except TypeError:  # no weak references to this type: nothing memoised
        pass
    return digest.digest()


def _data_digest(dataset, digest) -> None:
    """Feed the files (path, size, modification time) or the in-memory content under
    ``dataset`` into ``digest``."""
    for leaf in _leaves(dataset):
        files = _files_of(leaf)
        if files is not None:
            for name in files:
                try:
                    stat = os.stat(name)
                    digest.update(f"{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
                except OSError:
                    digest.update(f"{name}|missing\n".encode())
            continue
        arrays = _arrays_of(leaf)
        if arrays:
            digest.update(_content_digest(leaf, arrays))


def dataset_fingerprint(dataset, *extra: object) -> str:
    """A 24-hex-digit key of a dataset of ``(image, label, ...)`` items plus ``extra`` values.

    Besides the length, targets and a few transformed items, the key covers the data under
    the dataset (through Avalanche's wrappers): every file's path, size and modification
    time for file-backed datasets, the content of in-memory ones. A file changed in place
    therefore gives a new key, and the cache never serves features of changed data.
    """
    digest = hashlib.sha256()
    _data_digest(dataset, digest)
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

    def __getstate__(self):
        # Pickled (Avalanche's save_checkpoint) empty: the entries are a memory cache of this
        # process, recomputed (or read from ``directory``) on demand, and may be gigabytes.
        state = self.__dict__.copy()
        state["_entries"] = OrderedDict()
        return state

    @staticmethod
    def _size(entry: Features) -> int:
        return sum(t.numel() * t.element_size() for t in entry)

    @property
    def bytes_used(self) -> int:
        """Bytes held in memory."""
        return sum(self._size(e) for e in self._entries.values())

    def get_or_compute(
        self, key: str, compute: Callable[[], Features], device: Optional[torch.device] = None
    ) -> Features:
        """The entry of ``key``: from memory, else from disk, else ``compute()`` (then stored).

        An entry read from disk is kept in memory on ``device`` (default: the CPU), so later
        hits need no copy. Under torchrun the choice is collective, as ``compute`` is (the
        ranks share out the encoder pass): unless every rank holds the entry, every rank
        computes it, and rank 0 alone writes the file.
        """
        entry = self._entries.get(key)
        in_memory = entry is not None
        path = None if self.directory is None else self.directory / f"{key}.pt"
        if entry is None and path is not None and path.is_file():
            try:
                loaded = torch.load(path, map_location=device or "cpu", weights_only=True)
                entry = (loaded["features"], loaded["labels"])
            except Exception:  # an unreadable cache file is recomputed, never trusted
                entry = None
        if not distributed.all_true(entry is not None):
            entry, in_memory = None, False
        if entry is not None:
            self.hits += 1
            if in_memory:
                self._entries.move_to_end(key)
                return entry
        else:
            self.misses += 1
            entry = compute()
            if path is not None and distributed.is_main():
                save_atomic({"features": entry[0].cpu(), "labels": entry[1].cpu()}, path)
        self._entries[key] = entry
        while len(self._entries) > 1 and self.bytes_used > self.max_bytes:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Drop the in-memory entries (files stay)."""
        self._entries.clear()
