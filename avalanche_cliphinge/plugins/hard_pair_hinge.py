"""Hinge losses on hard pairs of similar old and new classes."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor

from ..hard_pairs import select_hard_pairs
from ..losses import hinge_loss
from ..seeding import Draw, generator as seeded
from ..step_state import PluginLoss
from .contract import check_strategy

Pair = Tuple[int, int, float]


class HardPairHingePlugin(SupervisedPlugin, supports_distributed=True):
    """Keeps sampled old-class features closer to their own text than to a similar new class.

    At the start of every task t >= 1 it picks hard pairs ``(old, new)``:
    text side by cosine similarity of raw CLIP text features (fixed template, no learned
    prompt); image side by cosine similarity of class image-feature means (old classes vs the
    current task's). Each step it draws ``samples_per_pair`` features from ``N(mu_old,
    Sigma_old)`` per pair and adds
    ``weight * mean(max(0, cos(f, text_new) - cos(f, text_old) + margin))`` to the loss, with
    the current prompted text features. The terms are registered once per task as
    ``strategy.step.plugin_losses["hinge"]`` (a ``PluginLoss``); the strategy draws their
    noise at each epoch's start, step by step, and adds them in ``step.stage1_loss`` (both
    runners). ``last_losses`` holds the unweighted terms of the latest step of each epoch.

    Args:
        text_hinge: enable the text-side pairs and loss.
        text_margin, text_weight, text_threshold, text_top_k: their margin, weight, threshold
            and maximum number of pairs (``None``: no cap, as RAPF).
        text_metric: ``"cosine"`` (pairs with similarity strictly above ``text_threshold``)
            or ``"euclidean"`` (pairs of unit text features strictly closer than it, RAPF's
            rule); see ``select_hard_pairs``.
        image_hinge, image_margin, image_weight, image_threshold, image_top_k: the same for
            the image side.
        samples_per_pair: features drawn per pair per step.
        grad_to_old_text: let the hinge move the old class's prompted text feature (only
            matters when old prompts are trainable, ``update_old_text_prompts``).
        seed: base seed of the sampling generator.
    """

    #: What it reads and writes on its strategy (see ``contract.MethodStrategy``).
    STRATEGY_NEEDS = ("model", "device", "experience_classes", "step", "epoch_record")

    def __init__(
        self,
        *,
        text_hinge: bool = True,
        text_margin: float = 0.1,
        text_weight: float = 1.0,
        text_threshold: float = 0.85,
        text_top_k: Optional[int] = 10,
        text_metric: str = "cosine",
        image_hinge: bool = False,
        image_margin: float = 0.1,
        image_weight: float = 1.0,
        image_threshold: float = 0.8,
        image_top_k: Optional[int] = 10,
        samples_per_pair: int = 8,
        grad_to_old_text: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.text_hinge, self.text_margin, self.text_weight = text_hinge, text_margin, text_weight
        self.text_threshold, self.text_top_k = text_threshold, text_top_k
        self.text_metric = text_metric
        self.image_hinge, self.image_margin = image_hinge, image_margin
        self.image_weight, self.image_threshold = image_weight, image_threshold
        self.image_top_k = image_top_k
        self.samples_per_pair = samples_per_pair
        self.grad_to_old_text = grad_to_old_text
        self.seed = seed
        self.text_pairs: List[Pair] = []
        self.image_pairs: List[Pair] = []
        self.last_losses = {"text": 0.0, "image": 0.0}
        self._generator = torch.Generator()
        #: the sides whose terms the registered ``PluginLoss`` computes, in its order
        self._kinds: List[str] = []

    @classmethod
    def from_config(cls, config) -> "HardPairHingePlugin":
        """The plugin with the settings of a ``CLIPHingeConfig``."""
        return cls(
            text_hinge=config.text_use_hinge_loss,
            text_margin=config.text_hinge_margin,
            text_weight=config.text_hinge_weight,
            text_threshold=config.text_hard_pair_threshold,
            text_top_k=config.text_top_hard_pairs,
            text_metric=config.text_hard_pair_metric,
            image_hinge=config.use_image_hinge_loss,
            image_margin=config.image_hinge_margin,
            image_weight=config.image_hinge_weight,
            image_threshold=config.image_hard_pair_threshold,
            image_top_k=config.image_top_hard_pairs,
            samples_per_pair=config.hinge_samples_per_pair,
            grad_to_old_text=config.hinge_grad_to_old_text,
            seed=config.seed,
        )

    def before_training(self, strategy, **kwargs):
        check_strategy(self, strategy, self.STRATEGY_NEEDS)

    def before_training_exp(self, strategy, **kwargs):
        model, device = strategy.model, strategy.device
        task = model.n_tasks - 1
        self.text_pairs, self.image_pairs = [], []
        # noise is drawn on the training device, so a step never copies it from the host
        self._generator = seeded(self.seed, Draw.HINGE, task, device=device)
        # pairs of an old class (absent from this experience) and a class being trained
        new = strategy.experience_classes.present
        old = strategy.experience_classes.old
        if new and old and self.text_hinge:
            self.text_pairs = select_hard_pairs(
                model.raw_text_features(new),
                model.raw_text_features(old),
                new,
                old,
                self.text_threshold,
                self.text_top_k,
                self.text_metric,
            )
        if new and old and self.image_hinge:
            self.image_pairs = select_hard_pairs(
                model.gaussians.mean_of(new),
                model.gaussians.mean_of(old),
                new,
                old,
                self.image_threshold,
                self.image_top_k,
            )
        sides = self.sides(model, device, padded=self.run_shaped(strategy.config))
        if not sides:
            return
        self._kinds = [kind for kind, _, _ in sides]
        strategy.step.plugin_losses["hinge"] = PluginLoss(
            weights={f"{kind}_hinge": weight for kind, _, weight in sides},
            draw=lambda n_steps: self.draw_noise(model, device, [i for _, i, _ in sides], n_steps),
            compute=self.hinge_terms,
            constants=tuple(t for _, i, _ in sides for t in (i.old_cols, i.new_cols, i.valid)),
            reported={f"{kind}_hinge" for kind, index, _ in sides if index.n_pairs},
        )

    def run_shaped(self, config) -> bool:
        """Whether the terms keep one shape for the whole run: the captured step
        (``compile_step``) with a cap on the pairs of every enabled side; each side is then
        registered in every task, padded to its cap (a side without pairs adds 0)."""
        caps = [
            top_k
            for enabled, top_k in (
                (self.text_hinge, self.text_top_k),
                (self.image_hinge, self.image_top_k),
            )
            if enabled
        ]
        return bool(getattr(config, "compile_step", False)) and None not in caps

    def sides(self, model, device, padded: bool) -> List[Tuple[str, PairIndex, float]]:
        """``(kind, pair index, weight)`` of the sides this task: those with hard pairs, or
        with ``padded`` every enabled side, its index padded to its cap."""
        found = []
        for kind, enabled, pairs, top_k, weight in (
            ("text", self.text_hinge, self.text_pairs, self.text_top_k, self.text_weight),
            ("image", self.image_hinge, self.image_pairs, self.image_top_k, self.image_weight),
        ):
            if pairs or (padded and enabled):
                found.append(
                    (kind, pair_index(model, pairs, device, top_k if padded else None), weight)
                )
        return found

    def draw_noise(
        self, model, device, indices: List[PairIndex], n_steps: int
    ) -> Tuple[Tensor, ...]:
        """The old-class features of every step of an epoch, step by step and side by side:
        per side ``[n_steps, pairs * samples_per_pair, dim]`` (zero rows for padding pairs,
        whose draws are not made: the real pairs get the same noise padded or not)."""
        n = self.samples_per_pair
        drawn = []
        for _ in range(n_steps):
            row = []
            for index in indices:
                real = index.rows[: index.n_pairs]
                feats = model.gaussians.sample_rows(real, n, self._generator)[0].to(device)
                padding = (index.rows.numel() - index.n_pairs) * n
                row.append(torch.cat([feats, feats.new_zeros(padding, feats.shape[1])]))
            drawn.append(row)
        return tuple(torch.stack(per_side) for per_side in zip(*drawn))

    def hinge_terms(
        self, model, text: Tensor, feats: Tuple[Tensor, ...], constants: Tuple[Tensor, ...]
    ) -> Dict[str, Tensor]:
        """The registered ``PluginLoss.compute``: ``{kind_hinge: loss}`` of this step's drawn
        features ``feats`` (one per side) against ``text [n_seen, dim]``; ``constants`` holds
        each side's old columns, new columns and pair mask."""
        terms = {}
        for i, kind in enumerate(self._kinds):
            old_cols, new_cols, valid = constants[3 * i : 3 * i + 3]
            margin = self.text_margin if kind == "text" else self.image_margin
            terms[f"{kind}_hinge"] = self._hinge(
                model, feats[i], text, old_cols, new_cols, margin, valid
            )
        return terms

    def pair_loss(self, strategy, pairs: List[Pair], margin: float) -> torch.Tensor:
        """Hinge loss of ``pairs`` with freshly drawn old-class features and the model's
        current text features (scalar tensor), outside a training step."""
        model = strategy.model
        index = pair_index(model, pairs, strategy.device)
        feats, _ = model.gaussians.sample_rows(index.rows, self.samples_per_pair, self._generator)
        feats = feats.to(strategy.device)
        return self._hinge(
            model, feats, model.text_features(), index.old_cols, index.new_cols, margin
        )

    def _hinge(
        self,
        model,
        feats: Tensor,
        text: Tensor,
        old_cols: Tensor,
        new_cols: Tensor,
        margin: float,
        valid: Optional[Tensor] = None,
    ) -> Tensor:
        """The hinge loss of drawn old-class features ``feats [pairs * samples_per_pair,
        dim]`` (grouped by pair) against the text features ``text [n_seen, dim]`` of the
        pairs' old and new columns ``[pairs]``; ``valid [pairs]`` leaves padding pairs out."""
        # cosines in fp32 even under bf16 autocast: a margin of 0.1 is a few bf16 steps
        with torch.autocast(feats.device.type, enabled=False):
            feats = model.adapted_embedding(feats.float())
            feats = feats.reshape(old_cols.numel(), self.samples_per_pair, -1)
            old_text = text[old_cols].float()
            if not self.grad_to_old_text:
                old_text = old_text.detach()
            return hinge_loss(feats, old_text, text[new_cols].float(), margin, valid)

    def after_training_epoch(self, strategy, **kwargs):
        # copied: a captured step's record tensors are overwritten by its next step
        last = strategy.epoch_record.last_terms
        for kind in ("text", "image"):
            value = last.get(f"{kind}_hinge")
            if value is not None:
                self.last_losses[kind] = value.clone()


class PairIndex(NamedTuple):
    """Device tensors of a pair list: Gaussian rows of the old classes ``[p]``, the score
    columns of the old and new classes ``[p]``, and for a list padded to a cap which pairs
    are real (``valid [p]``; padding pairs: row 0, column 0), else ``None``."""

    rows: Tensor
    old_cols: Tensor
    new_cols: Tensor
    valid: Optional[Tensor]
    n_pairs: int


def pair_index(model, pairs: List[Pair], device, pad_to: Optional[int] = None) -> PairIndex:
    """Look ``pairs`` up in ``model``'s Gaussians and score columns (one host sync), padded
    to ``pad_to`` pairs when given."""
    n = len(pairs)
    size = n if pad_to is None else max(pad_to, n)
    old_ids = [p[0] for p in pairs]
    rows = torch.zeros(size, dtype=torch.long, device=device)
    old_cols, new_cols = torch.zeros_like(rows), torch.zeros_like(rows)
    if n:
        rows[:n] = model.gaussians.index_of(old_ids).to(device)
        old_cols[:n] = model.column_of[torch.tensor(old_ids, device=device)]
        new_cols[:n] = model.column_of[torch.tensor([p[1] for p in pairs], device=device)]
    valid = None if pad_to is None else torch.arange(size, device=device) < n
    return PairIndex(rows, old_cols, new_cols, valid, n)
