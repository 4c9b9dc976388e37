"""Reading ImageNet-R from disk: its folder, the seeded per-class split, the published lists.

A published split is either a directory holding `train.txt` and `test.txt` (one
`relative/path label` per line) or one file in RAPF's format (`train`, paths, `test`, paths).
`split_imagenet_r` (imagenet_r.py) builds the stream from what these functions return.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .common import list_images
from .imagenet_r_classes import IMAGENET_R_WNIDS

_FOLDER = "imagenet-r"
_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def find_data_dir(root: Path) -> Path:
    """The folder of the wnid folders: `<root>/imagenet-r`, or `root` itself."""
    for candidate in (root / _FOLDER, root):
        if candidate.is_dir() and any((candidate / w).is_dir() for w in IMAGENET_R_WNIDS):
            return candidate
    raise FileNotFoundError(
        f"ImageNet-R not found at {root}: expected <root>/{_FOLDER}/<wnid>/*.jpg (folders such "
        f"as n01443537); download and extract {_URL} into {root}."
    )


def seeded_split(data_dir: Path, wnids: list[str], seed: int, train_fraction: float):
    """`((train_files, train_labels), (test_files, test_labels))` of the "seeded" split
    (`split_imagenet_r`'s `split`); label = position of the wnid in `wnids`."""
    train_files, train_labels, test_files, test_labels = [], [], [], []
    for label, wnid in enumerate(wnids):
        files = list_images(data_dir / wnid)
        if not files:
            raise ValueError(
                f"{data_dir / wnid} holds no .jpg/.jpeg/.png image; remove the folder or "
                f"restore its images."
            )
        n = len(files)
        # Half rounds up (Python's round() would send 2.5 to 2).
        n_train = math.floor(train_fraction * n + 0.5)
        if n >= 2:
            n_train = min(max(n_train, 1), n - 1)
        # Seeded by the wnid too, so a class's split does not depend on which others exist.
        permutation = np.random.RandomState([seed, int(wnid[1:])]).permutation(n)
        chosen = set(permutation[:n_train].tolist())
        for i, path in enumerate(files):
            if i in chosen:
                train_files.append(path)
                train_labels.append(label)
            else:
                test_files.append(path)
                test_labels.append(label)
    return (train_files, train_labels), (test_files, test_labels)


def read_list(list_file: Path, data_dir: Path, wnids: list[str]):
    """`(files, labels, line numbers)` of a `train.txt` / `test.txt` list.

    Raises:
        ValueError: a malformed line, or an image listed twice (names the file and lines).
    """
    class_of = {w: i for i, w in enumerate(wnids)}
    n_classes = len(wnids)
    files, labels, line_numbers = [], [], []
    seen: dict[str, int] = {}
    for line_number, line in enumerate(_read_text_lines(list_file), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{list_file}, line {line_number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected `relative/path label`, got {line.strip()!r}.")
        relative, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(f"{where}: label {label_text!r} is not an integer.") from None
        if not 0 <= label < n_classes:
            raise ValueError(
                f"{where}: label {label} outside 0..{n_classes - 1} "
                f"({n_classes} class folders in {data_dir})."
            )
        relative = relative.removeprefix(_FOLDER + "/")
        path = data_dir / relative
        if not path.is_file():
            raise ValueError(f"{where}: {path} does not exist.")
        folder = Path(relative).parts[0]
        if folder in class_of and class_of[folder] != label:
            raise ValueError(
                f"{where}: label {label} but {folder} is class {class_of[folder]} (wnids "
                f"sorted); this list numbers classes differently, relabel it."
            )
        key = image_key(path)
        if key in seen:
            raise ValueError(
                f"{list_file}: {fields[0]} is listed twice (lines {seen[key]} and "
                f"{line_number}); it would count twice: list each image once."
            )
        seen[key] = line_number
        files.append(path)
        labels.append(label)
        line_numbers.append(line_number)
    return files, labels, line_numbers


def read_rapf_list(list_file: Path, data_dir: Path, wnids: list[str]):
    """RAPF's format: `train`, then `wnid/file.jpg` lines, then `test`, then paths.

    Returns `((train_files, train_labels), (test_files, test_labels))`, labels from the wnid.

    Raises:
        ValueError: a malformed line, or an image listed twice (in one section, or in both:
            a test image trained on); the message names the file and the lines.
    """
    class_of = {w: i for i, w in enumerate(wnids)}
    parts = {"train": ([], []), "test": ([], [])}
    seen: dict[str, tuple] = {}
    section = None
    for line_number, line in enumerate(_read_text_lines(list_file), start=1):
        entry = line.strip()
        if not entry:
            continue
        where = f"{list_file}, line {line_number}"
        if entry in parts:
            if parts[entry][0] or entry == section:
                raise ValueError(
                    f"{where}: a second `{entry}` section; the list holds one "
                    f"`train` and one `test` section."
                )
            section = entry
            continue
        if section is None:
            raise ValueError(
                f"{where}: expected the line `train` before any path (RAPF's format: `train`, "
                f"paths, `test`, paths), got {entry!r}."
            )
        relative = Path(entry.removeprefix(_FOLDER + "/"))
        if len(relative.parts) != 2:
            raise ValueError(f"{where}: expected `<wnid>/<file>`, got {entry!r}.")
        wnid = relative.parts[0]
        if wnid not in class_of:
            known = (
                "not an ImageNet-R wnid"
                if wnid not in IMAGENET_R_WNIDS
                else (f"has no class folder in {data_dir}")
            )
            raise ValueError(f"{where}: {wnid} {known}.")
        path = data_dir / relative
        if not path.is_file():
            raise ValueError(f"{where}: {path} does not exist.")
        key = image_key(path)
        if key in seen:
            raise _repeated_line(list_file, entry, seen[key], (section, line_number))
        seen[key] = (section, line_number)
        parts[section][0].append(path)
        parts[section][1].append(class_of[wnid])
    if not parts["test"][0]:
        raise ValueError(
            f"{list_file} has no `test` section with paths (RAPF's format: "
            f"`train`, paths, `test`, paths)."
        )
    return parts["train"], parts["test"]


def _read_text_lines(list_file: Path) -> list[str]:
    """The lines of a split list (a leading UTF-8 byte-order mark is dropped); a binary or
    non-UTF-8 file is a one-line error."""
    try:
        return list_file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{list_file} is not a UTF-8 text file (byte {err.start}); a split list holds one "
            f"image path per line."
        ) from None


def image_key(path: Path) -> str:
    """What two list lines naming the same image have in common (`a/./b`, `a/x/../b`)."""
    return os.path.normpath(str(path))


def _repeated_line(list_file: Path, entry: str, first: tuple, again: tuple) -> ValueError:
    """The error for an image listed twice: `first` and `again` are `(section, line)`."""
    if first[0] == again[0]:
        return ValueError(
            f"{list_file}: {entry} is listed twice in `{again[0]}` (lines {first[1]} and "
            f"{again[1]}); it would count twice: list each image once."
        )
    return ValueError(
        f"{list_file}: {entry} is in both `train` (line {first[1]}) and `test` (line "
        f"{again[1]}): a test image must not be trained on; keep it in one section."
    )
