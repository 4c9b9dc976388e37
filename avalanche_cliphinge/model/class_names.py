"""The stream's class names: ``ClassNames`` and its table ``{class id: name}``."""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Union


#: Class names as a list indexed by class id, or a mapping ``{class id: name}``.
ClassNames = Union[Sequence[str], Mapping[int, str]]


def class_name_table(class_names: ClassNames) -> Dict[int, str]:
    """``{class id: name}`` from a list indexed by class id or from a mapping.

    Raises:
        ValueError: no names, a negative or non-integer id, or a name that is not a string.
    """
    table = (
        dict(class_names.items())
        if isinstance(class_names, Mapping)
        else dict(enumerate(class_names))
    )
    if not table:
        raise ValueError("class_names is empty; pass one name per class of the stream")
    bad = [
        k
        for k, v in table.items()
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or not isinstance(v, str)
    ]
    if bad:
        raise ValueError(
            f"class_names entries {bad[:5]} are not 'class id >= 0: name'; pass a "
            "list of names indexed by class id or a dict {class id: name}"
        )
    return table
