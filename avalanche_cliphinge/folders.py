"""The layout of a folder of class subfolders, read without opening an image (and without
importing torch or Avalanche: the command line checks a folder before its slow imports)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

#: ``find_image_folder_layout``'s kinds: a folder per class, or train/ and test/ folders.
PER_CLASS, TRAIN_TEST = "per-class folders", "train/ and test/ folders"


def _expected(root: Path) -> str:
    return f"{root}/<class>/*.jpg (one subfolder per class) or {root}/{{train,test}}/<class>/*.jpg"


def find_image_folder_layout(root: Union[str, Path]) -> Tuple[str, List[str]]:
    """``(kind, class folder names sorted)`` of an image folder, without reading any image.

    ``kind`` is ``TRAIN_TEST`` when ``root`` holds both ``train/`` and ``test/`` (the names are
    the class folders of ``train/``), else ``PER_CLASS`` (the names are ``root``'s subfolders,
    hidden ones left out).

    Raises:
        FileNotFoundError: ``root`` is not a folder, holds ``train/`` without ``test/`` (or the
            reverse), or has no class subfolder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"No class folders in {root} (no such folder): expected {_expected(root)}"
        )
    sides = [side for side in ("train", "test") if (root / side).is_dir()]
    if len(sides) == 1:
        other = "test" if sides[0] == "train" else "train"
        raise FileNotFoundError(
            f"image folder {root} holds {sides[0]}/ but no {other}/: add {root}/{other}/<class>/, "
            f"or move the class folders up into {root}/<class>/ (split per class with the seed)"
        )
    folder = root / "train" if sides else root
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"No class folders in {folder}: expected {_expected(root)}")
    return (TRAIN_TEST if sides else PER_CLASS), classes
