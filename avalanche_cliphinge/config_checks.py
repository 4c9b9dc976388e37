"""The checks of ``CLIPHingeConfig``'s values: each key's rules as field metadata, one loop.

A config key declares its rules where it is defined, ``checked(default, minimum=1, ...)``:
a dataclass field whose metadata holds words of ``RULES``. ``problems`` checks every key
against its metadata in one loop (twice: each key's own range first, then the upper bounds
the run can honour), with the few rules that join several keys, or that the metadata
cannot say, as an explicit list between and after. A problem reads ``config key 'KEY' must
be EXPECTED, got VALUE``; ``CLIPHingeConfig.validate`` raises the first as a
``ConfigError``. The declared type of a key is checked before any of these (``config``).
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Iterator, Mapping, Optional

#: Largest finite float32: every float key must fit (the model computes in float32).
FLOAT32_MAX = 3.4028234663852886e38
#: Memory estimate bounds: replayed and hinge features are at most this many bytes, counted
#: with CLIP's widest image feature (ViT-H/14: 1024).
MEMORY_BUDGET_BYTES = 8 << 30
MAX_FEATURE_DIM = 1024

#: The words of a key's metadata (``checked``'s keywords). All but ``maximum`` are the key's
#: own range, checked first; a float key must also be finite and within float32's range.
RULES = {
    "minimum": "the lowest value (of every item, for a list), inclusive",
    "positive": "True: the value must be > 0 and finite",
    "between": "(lowest, highest): the value must be in this closed range",
    "choices": "the allowed values",
    "test": "a predicate on the value, for a rule the words above cannot say",
    "nullable": "None is allowed too; the message's words after ', or null'",
    "expected": "the message's words for what is allowed (default: made from the rules)",
    "maximum": "the highest value (of every item, for a list), inclusive; None passes",
}


def checked(default: Any, **rules: Any) -> Any:
    """A dataclass field of ``default`` (a list default is copied for every config) with
    ``rules`` (words of ``RULES``) as its metadata."""
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise TypeError(f"unknown config rules {unknown}; the rules are {', '.join(RULES)}")
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


def problems(config: Any) -> Iterator[str]:
    """The problems of a ``CLIPHingeConfig`` whose values have their declared types, in the
    order they are checked; lazily, so that a rule only sees values the earlier ones passed."""
    fields = dataclasses.fields(config)
    for f in fields:
        value = getattr(config, f.name)
        if not _in_range(value, f.metadata):
            yield _must(f.name, _expected(f.metadata), value)
    yield from _joint_rules(config)
    for f in fields:
        yield from _upper_bounds(f.name, f.type, getattr(config, f.name), f.metadata)
    yield from _memory_rules(config)
    yield from _class_order_rule(config.class_order)


def _in_range(value: Any, rules: Mapping[str, Any]) -> bool:
    """Whether ``value`` (every item, for a list) meets its key's own range."""
    if value is None and "nullable" in rules:
        return True
    items = value if isinstance(value, list) else [value]
    if "minimum" in rules and not all(v >= rules["minimum"] for v in items):
        return False
    if rules.get("positive") and not (value > 0 and math.isfinite(value)):
        return False
    if "between" in rules and not rules["between"][0] <= value <= rules["between"][1]:
        return False
    if "choices" in rules and value not in rules["choices"]:
        return False
    return "test" not in rules or rules["test"](value)


def _expected(rules: Mapping[str, Any]) -> str:
    """The message's words for what a key's own range allows."""
    if "expected" in rules:
        return rules["expected"]
    words = []
    if "minimum" in rules:
        words.append(f">= {rules['minimum']}")
    if rules.get("positive"):
        words.append("> 0 and finite")
    if "between" in rules:
        words.append(f"in [{rules['between'][0]}, {rules['between'][1]}]")
    if "choices" in rules:
        *first, last = [repr(choice) for choice in rules["choices"]]
        words.append(f"{', '.join(first)} or {last}" if first else last)
    text = " and ".join(words)
    return f"{text}, or null {rules['nullable']}" if "nullable" in rules else text


def _upper_bounds(key: str, kind: Any, value: Any, rules: Mapping[str, Any]) -> Iterator[str]:
    """Upper bounds the run can honour: float32's range for a float key, ``maximum``."""
    if kind == "float" and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        yield _must(key, f"finite and within float32's range (|x| <= {FLOAT32_MAX:.4g})", value)
    if "maximum" in rules:
        most = rules["maximum"]
        values = value if isinstance(value, list) else [value]
        if not all(v is None or v <= most for v in values):
            yield _must(key, f"at most {most}", value)


def _joint_rules(config: Any) -> Iterator[str]:
    """Rules that join keys, checked after every key's own range: the hard-pair threshold's
    range follows the metric, replay needs samples."""
    if config.text_hard_pair_metric == "euclidean":
        if not 0 <= config.text_hard_pair_threshold <= 2:
            yield _must(
                "text_hard_pair_threshold",
                "a distance between unit vectors in [0, 2] with text_hard_pair_metric 'euclidean'",
                config.text_hard_pair_threshold,
            )
    elif not -1 <= config.text_hard_pair_threshold <= 1:
        yield _must(
            "text_hard_pair_threshold",
            "a cosine similarity in [-1, 1]",
            config.text_hard_pair_threshold,
        )
    if config.replay_classes_per_step > 0 and config.samples_per_old_class < 1:
        yield _must(
            "samples_per_old_class",
            ">= 1 when replay_classes_per_step > 0 (features per replayed class and step)",
            config.samples_per_old_class,
        )


def _memory_rules(config: Any) -> Iterator[str]:
    """Replay and hinge tensors within ``MEMORY_BUDGET_BYTES``, checked after the upper
    bounds (which cap the layout and the pair caps they are estimated from)."""
    if config.hinge_samples_per_pair < 1:
        yield _must("hinge_samples_per_pair", ">= 1", config.hinge_samples_per_pair)
    # a layout left to the stream is sized as CIFAR-100 for these estimates
    n_classes = config.n_classes if config.layout_is_set else 100
    per_sample = n_classes * MAX_FEATURE_DIM * 4
    most = MEMORY_BUDGET_BYTES // per_sample
    if not config.samples_per_old_class <= most:
        yield _must(
            "samples_per_old_class",
            f"at most {most} (replayed {MAX_FEATURE_DIM}-d float32 features of "
            f"{n_classes} classes within {MEMORY_BUDGET_BYTES >> 30} GiB)",
            config.samples_per_old_class,
        )
    # a task's pairs are (new, old): at most n**2 / 4, when half the classes are new
    most_pairs = max(1, n_classes * n_classes // 4)
    caps = [
        most_pairs if cap is None else cap  # None: no cap
        for cap in (config.text_top_hard_pairs, config.image_top_hard_pairs)
    ]
    pairs = max(1, min(max(caps), most_pairs))
    most = MEMORY_BUDGET_BYTES // (pairs * MAX_FEATURE_DIM * 4)
    if not config.hinge_samples_per_pair <= most:
        yield _must(
            "hinge_samples_per_pair",
            f"at most {most} (hinge samples of {pairs} pairs, {MAX_FEATURE_DIM}-d float32, "
            f"within {MEMORY_BUDGET_BYTES >> 30} GiB)",
            config.hinge_samples_per_pair,
        )


def _class_order_rule(class_order: Any) -> Iterator[str]:
    """A named order, ``random:<seed>`` or a list of class ids (the key's type is ``Any``)."""
    if isinstance(class_order, str):
        if not (
            class_order in ("icarl", "rapf", "pycil", "natural")
            or random_order_seed(class_order) is not None
        ):
            yield _must(
                "class_order",
                "'icarl', 'rapf', 'pycil', 'natural', 'random:<seed>' or a list of class ids",
                class_order,
            )
    elif not (
        isinstance(class_order, list)
        and all(isinstance(c, int) and not isinstance(c, bool) for c in class_order)
    ):
        yield (
            "class_order must be 'icarl', 'rapf', 'pycil', 'natural', 'random:<seed>' or a "
            f"list of integer class ids, got {class_order!r}"
        )


def _must(key: str, expected: str, value: Any) -> str:
    return f"config key '{key}' must be {expected}, got {value!r}"


def random_order_seed(class_order: Any) -> Optional[int]:
    """The seed of a ``"random:<seed>"`` class order (0 <= seed < 2**32), else ``None``."""
    if not isinstance(class_order, str) or not class_order.startswith("random:"):
        return None
    digits = class_order[len("random:") :]
    if not digits.isascii() or not digits.isdigit() or int(digits) >= 2**32:
        return None
    return int(digits)


def is_class_name_template(template: str) -> bool:
    """Whether ``template`` has exactly one ``{}`` (the class name) and no other field."""
    return _template_fields(template) == [("", "", None)]


def _template_fields(template: str):
    """``(literal, field name, format spec, conversion)`` minus the literal, per field of a
    ``str.format`` template; ``[("?", "?", "?")]`` for a template ``format`` cannot parse."""
    try:
        return [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError:
        return [("?", "?", "?")]
