"""What a stage-1 epoch sums on the training device, for both runners and the metrics."""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor


class EpochRecord:
    """Running sums of an epoch and its first non-finite step, kept on the device.

    ``add`` reads nothing back to the host, so it runs inside a captured step as well as
    after an eager one; ``check`` (once per epoch) is the only read-back. The tensors are
    made once (``names`` at construction) and reset in place, so a captured step may keep
    their addresses; a name first seen by ``add`` (an eager plugin's own term) gets its
    entries then.

    Attributes:
        sums: one-element float64 tensors (``[1]``) by name, each the sum over the epoch's
            steps of the step's value times its number of real rows: ``accuracy`` (fraction of the minibatch
            classified right), ``loss``, and each loss term (``cross_entropy``,
            ``text_hinge``...). One element, not a 0-d tensor: Dynamo turns the value of a
            0-d CPU tensor that a graph adds to into a symbolic float, which inductor cannot
            keep, and traces the whole step twice (3 s of a cold compile on a 2-core CPU).
        samples: real rows summed (a Python int, counted by the host: ``count``).
        nonfinite_step: ``-1``, or the first step of the epoch whose loss was not finite.
        nonfinite_terms: the loss terms of that step (NaN before one).
        last_terms: every term's value at the latest step (float32 scalars).
    """

    def __init__(self, names: Iterable[str], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.sums: Dict[str, Tensor] = {}
        self.nonfinite_terms: Dict[str, Tensor] = {}
        self.last_terms: Dict[str, Tensor] = {}
        self.nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.samples = 0
        for name in ("accuracy", "loss"):
            self.sums[name] = torch.zeros(1, dtype=torch.float64, device=self.device)
        for name in names:
            self._add_name(name)

    def _add_name(self, name: str) -> None:
        self.sums[name] = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.nonfinite_terms[name] = torch.full((), math.nan, device=self.device)
        self.last_terms[name] = torch.zeros((), device=self.device)

    def tensors(self):
        """Every tensor of the record (a captured step marks them static)."""
        return [
            self.nonfinite_step,
            *self.sums.values(),
            *self.nonfinite_terms.values(),
            *self.last_terms.values(),
        ]

    def reset(self) -> None:
        """Empty the record for a new epoch, in place."""
        torch._foreach_zero_(list(self.sums.values()))
        for kept in self.nonfinite_terms.values():
            kept.fill_(math.nan)
        self.nonfinite_step.fill_(-1)
        self.samples = 0

    def count(self, rows: int) -> None:
        """The host's count of the step's real rows."""
        self.samples += rows

    @torch.no_grad()
    def add(
        self,
        step: Tensor | int,
        loss: Tensor,
        terms: Mapping[str, Tensor],
        scores: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
    ) -> None:
        """Add one step: its loss (scalar), its loss terms (scalars by name), its scores
        ``[b, n_outputs]`` against class ids ``labels [b]``; ``valid [b]`` (default: every
        row) leaves padding rows out; ``step`` its index in the epoch (for the non-finite
        report). Each value is weighted by the real rows, as Avalanche's epoch metrics do.
        """
        for name in terms:
            if name not in self.sums:
                self._add_name(name)
        loss = loss.detach()
        correct = scores.detach().argmax(1) == labels
        if valid is None:
            n = float(labels.shape[0])
        else:
            correct, n = correct & valid, valid.sum().double()
        bad = ~torch.isfinite(loss).all() & (self.nonfinite_step < 0)
        self.nonfinite_step.copy_(torch.where(bad, step, self.nonfinite_step))
        self.sums["accuracy"].add_(correct.sum().double() / n * n)
        self.sums["loss"].add_(loss.double().reshape(1) * n)
        for name, value in terms.items():
            value = value.detach().float().reshape(())
            kept = self.nonfinite_terms[name]
            kept.copy_(torch.where(bad, value, kept))
            self.last_terms[name].copy_(value)
            self.sums[name].add_(value.double() * n)

    def check(self, where: str) -> None:
        """Raise ``FloatingPointError`` naming the epoch's first non-finite step and its
        terms, if any (``where``: e.g. "task 1, epoch 2"); one read back to the host."""
        step = int(self.nonfinite_step)
        if step >= 0:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in self.nonfinite_terms.items())
            raise FloatingPointError(
                f"non-finite loss at {where}, iteration {step} ({terms}); lower lr or check "
                "the data. Earlier checkpoints are intact"
            )

    @torch.no_grad()
    def copy_from(self, other: "EpochRecord") -> None:
        """Take ``other``'s epoch (a captured run's record, which holds every term the run
        may compute) for the names this record has; its sample count too."""
        for name, total in self.sums.items():
            if name in other.sums:
                total.copy_(other.sums[name])
        for mine, theirs in (
            (self.nonfinite_terms, other.nonfinite_terms),
            (self.last_terms, other.last_terms),
        ):
            for name, value in mine.items():
                if name in theirs:
                    value.copy_(theirs[name])
        self.nonfinite_step.copy_(other.nonfinite_step)
        self.samples = other.samples
