"""What a run's record (results.json) says of where it came from and what it measured so far:
the config file, the package versions, the code's commit, the device, the start time, and the
measured state (``RunState``) with its hard pairs."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..config import CLIPHingeConfig, ConfigError, config_reproduces
from ..plugins.hard_pair_hinge import HardPairHingePlugin

PACKAGES = (
    "avalanche-cliphinge",
    "avalanche-lib",
    "torch",
    "torchvision",
    "open_clip_torch",
    "peft",
    "numpy",
)


def package_versions() -> Dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


#: Config keys that make a run another protocol than its config file's: the data, the task
#: layout, the class order.
PROTOCOL_KEYS = ("dataset", "init_class", "increment", "total_tasks", "class_order")
#: The folder of this package's source checkout (when it is one): ``git_commit`` reads it.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def config_record(
    config_file: str | Path, config: CLIPHingeConfig, preset: Optional[str] = None
) -> Dict[str, Any]:
    """What results.json says of the config a run started from.

    ``config_file`` (a preset name or a JSON file) and what it ``reproduces`` (its
    ``"reproduces"`` note) while the run keeps the file's ``PROTOCOL_KEYS``; once the preset
    or ``--set`` changed one of them (another dataset, layout or class order) both are
    ``None`` and ``config_modified`` names the file and the keys changed, so neither the
    record nor the figures' titles claim a protocol the run did not follow.
    """
    try:
        base: Optional[CLIPHingeConfig] = CLIPHingeConfig.from_json(config_file)
    except ConfigError:
        base = None
    changed = [k for k in PROTOCOL_KEYS if base is None or getattr(base, k) != getattr(config, k)]
    if not changed:
        return {
            "config_file": str(config_file),
            "preset": preset,
            "reproduces": config_reproduces(config_file),
            "config_modified": None,
        }
    return {
        "config_file": None,
        "preset": preset,
        "reproduces": None,
        "config_modified": {"config_file": str(config_file), "changed": changed},
    }


def now_iso() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def git_commit(folder: str | Path = SOURCE_ROOT) -> Optional[Dict[str, Any]]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout whose top folder is ``folder``
    (default: this package's source tree); ``dirty``: tracked files changed or files git
    does not ignore added. ``None`` when ``folder`` is not the top of a checkout (an
    installed package) or git is missing or fails; never raises."""
    folder = Path(folder)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env=env,
        ).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != folder.resolve():
            return None  # inside another project's checkout
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()})"


@dataclass
class RunState:
    """What a run has measured so far (saved in every checkpoint and in results.json)."""

    matrix: List[List[float]] = field(default_factory=list)
    per_task: List[Dict[str, Any]] = field(default_factory=list)
    stream_forgetting: List[Optional[float]] = field(default_factory=list)
    hard_pairs: List[Dict[str, Any]] = field(default_factory=list)
    seen_stream_accuracy: List[Optional[float]] = field(default_factory=list)
    #: ``[true, predicted]`` test counts after the last task, rows and columns in class order
    confusion: Optional[List[List[int]]] = None
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    #: when the run began (ISO 8601; a resumed run keeps its first start), ``None`` unknown
    created: Optional[str] = None
    #: ``git_commit()`` when the run began
    git_commit: Optional[Dict[str, Any]] = None


def named_pair(pair: Sequence, names: Sequence[str]) -> Dict[str, Any]:
    """A hard pair ``(old_id, new_id, similarity)`` with its class names, for the reports."""
    old, new, similarity = pair
    return {
        "old": int(old),
        "new": int(new),
        "old_name": names[int(old)],
        "new_name": names[int(new)],
        "similarity": float(similarity),
    }


def hard_pairs_of(hinge: Optional[HardPairHingePlugin]) -> Dict[str, List[Sequence]]:
    """The text and image pairs the hinge plugin chose for the experience just trained."""
    if hinge is None:
        return {"text": [], "image": []}
    return {"text": list(hinge.text_pairs), "image": list(hinge.image_pairs)}
