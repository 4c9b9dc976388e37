"""Avalanche's ``WandBLogger`` for the wandb releases that install beside the pinned set.

avalanche-lib 0.6.0's ``WandBLogger`` names two wandb attributes that current wandb no longer
has: ``wandb.util.generate_id`` (there in 0.28.0, gone by 0.28.2) for the run id, and
``wandb.viz.CustomChart`` (there in 0.17.0, gone by 0.17.9; now ``wandb.plot.CustomChart``) in
every ``log_single_metric`` call. The wandb releases with ``wandb.viz`` need protobuf < 6, the
pinned tensorboard 2.21 needs protobuf >= 6.31: no wandb release works with Avalanche's logger
beside the pinned set. This subclass replaces the two methods that use them; everything else
(constructor, artifacts, checkpoint pickling) is Avalanche's.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from avalanche.evaluation.metric_results import AlternativeValues, TensorImage
from avalanche.logging import WandBLogger as AvalancheWandBLogger
from matplotlib.figure import Figure
from PIL.Image import Image
from torch import Tensor

#: wandb's run ids: 8 characters from lowercase letters and digits.
_ID_ALPHABET = string.ascii_lowercase + string.digits


class WandBLogger(AvalancheWandBLogger):
    """Avalanche's Weights & Biases logger (same arguments) for wandb >= 0.17.

    Scalars (``int``, ``float``) and ``wandb.plot`` charts are logged as they are; PIL images,
    ``TensorImage`` and matplotlib figures as ``wandb.Image``; tensors as a
    ``wandb.Histogram`` of their values; other values are skipped, as Avalanche does. Each at
    the metric's x value (Avalanche's ``clock.train_iterations``) as the W&B step.

    Call ``finish`` at the end of the run: it closes the W&B run (wandb would do it at exit).
    """

    def import_wandb(self):
        try:
            import wandb
        except ImportError:
            raise ImportError("W&B logging needs the wandb package: pip install wandb") from None
        self.wandb = wandb

    def before_run(self):
        """Start the W&B run: id from ``params``, else ``WANDB_RUN_ID``, else a new one."""
        if self.wandb is None:
            self.import_wandb()
        kwargs = dict(self.init_kwargs or {})
        kwargs["id"] = (
            kwargs.get("id")
            or os.environ.get("WANDB_RUN_ID")
            or "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
        )
        self.init_kwargs = kwargs
        self.wandb.init(**kwargs)

    def log_single_metric(self, name, value, x_plot):
        if name.startswith("WeightCheckpoint"):  # Avalanche's artifact upload
            return super().log_single_metric(name, value, x_plot)
        self.step = x_plot
        chart = getattr(getattr(self.wandb, "plot", None), "CustomChart", _NoChart)
        if isinstance(value, AlternativeValues):
            value = value.best_supported_value(
                Image, Tensor, TensorImage, Figure, float, int, chart
            )
        if isinstance(value, (Image, Figure)):
            value = self.wandb.Image(value)
        elif isinstance(value, TensorImage):
            value = self.wandb.Image(np.asarray(value))
        elif isinstance(value, Tensor):
            counts = np.histogram(value.detach().float().cpu().reshape(-1).numpy())
            value = self.wandb.Histogram(np_histogram=counts)
        elif not isinstance(value, (float, int, chart)):
            return
        self.wandb.log({name: value}, step=self.step)

    def log_values(self, values: Mapping[str, Any], step: int, images: Optional[Mapping] = None):
        """Log ``values`` (scalars) and ``images`` (``{name: [H, W, 3] uint8 pixels}``) at ``step``."""
        row = dict(values)
        for name, pixels in (images or {}).items():
            row[name] = self.wandb.Image(np.asarray(pixels))
        self.wandb.log(row, step=step)

    def finish(self) -> None:
        """Close the W&B run (its offline files are complete afterwards)."""
        if self.wandb is not None and self.wandb.run is not None:
            self.wandb.finish()


def last_run_id(folder: Path) -> Optional[str]:
    """The id of the W&B run last started with ``dir=folder`` (wandb's ``wandb/latest-run``
    link names its run folder ``[offline-]run-<date>_<time>-<id>``), or ``None`` when there
    is none to read."""
    link = Path(folder) / "wandb" / "latest-run"
    try:
        name = Path(os.readlink(link)).name
    except OSError:
        return None
    match = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-([a-z0-9]+)", name)
    return match.group(1) if match else None


class _NoChart:
    """Stands for ``wandb.plot.CustomChart`` in a wandb without it: nothing is one."""
