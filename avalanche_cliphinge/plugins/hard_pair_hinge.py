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
        self._index: Dict[str, Optional[PairIndex]] = {"text": None, "image": None}

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
        model = strategy.model
        task = model.n_tasks - 1
        self.text_pairs, self.image_pairs = [], []
        self._index = {"text": None, "image": None}
        # noise is drawn on the training device, so a step never copies it from the host
        self._generator = seeded(self.seed, Draw.HINGE, task, device=strategy.device)
        # pairs of an old class (absent from this experience) and a class being trained
        new = strategy.experience_classes.present
        old = strategy.experience_classes.old
        if not new or not old:
            return
        if self.text_hinge:
            self.text_pairs = select_hard_pairs(
                model.raw_text_features(new),
                model.raw_text_features(old),
                new,
                old,
                self.text_threshold,
                self.text_top_k,
                self.text_metric,
            )
        if self.image_hinge:
            self.image_pairs = select_hard_pairs(
                model.gaussians.mean_of(new),
                model.gaussians.mean_of(old),
                new,
                old,
                self.image_threshold,
                self.image_top_k,
            )
        for kind, pairs in (("text", self.text_pairs), ("image", self.image_pairs)):
            if pairs:
                self._index[kind] = pair_index(model, pairs, strategy.device)
        kinds = self._kinds()
        if kinds:
            model, device = strategy.model, strategy.device

            def draw(n_steps: int) -> Tuple[Tensor, ...]:
                # step by step, kind by kind
                drawn = [
                    [
                        model.gaussians.sample_rows(
                            index.rows, self.samples_per_pair, self._generator
                        )[0].to(device)
                        for _, index, _, _ in kinds
                    ]
                    for _ in range(n_steps)
                ]
                return tuple(torch.stack(per_kind) for per_kind in zip(*drawn))

            def compute(text: Tensor, feats: Tuple[Tensor, ...]) -> Dict[str, Tensor]:
                return {
                    f"{kind}_hinge": self._hinge(model, f, text, index, margin)
                    for (kind, index, margin, _), f in zip(kinds, feats)
                }

            strategy.step.plugin_losses["hinge"] = PluginLoss(
                weights={f"{kind}_hinge": weight for kind, _, _, weight in kinds},
                draw=draw,
                compute=compute,
            )

    def _kinds(self) -> List[Tuple[str, PairIndex, float, float]]:
        """``(kind, pair index, margin, weight)`` of the sides with hard pairs this task."""
        return [
            (kind, self._index[kind], margin, weight)
            for kind, pairs, margin, weight in (
                ("text", self.text_pairs, self.text_margin, self.text_weight),
                ("image", self.image_pairs, self.image_margin, self.image_weight),
            )
            if pairs
        ]

    def pair_loss(
        self, strategy, pairs: List[Pair], margin: float, index: Optional[PairIndex] = None
    ) -> torch.Tensor:
        """Hinge loss of ``pairs`` with freshly drawn old-class features (scalar tensor).

        ``index`` is ``pair_index(model, pairs, device)``, looked up once per task so the
        step reads nothing back from the GPU (default: looked up now).
        """
        model = strategy.model
        text = strategy.step.text_features
        if text is None or not model.training:
            text = model.text_features()
        if index is None:
            index = pair_index(model, pairs, strategy.device)
        feats, _ = model.gaussians.sample_rows(index.rows, self.samples_per_pair, self._generator)
        return self._hinge(model, feats.to(strategy.device), text, index, margin)

    def _hinge(self, model, feats: Tensor, text: Tensor, index: PairIndex, margin: float) -> Tensor:
        """The hinge loss of drawn old-class features ``feats [pairs * samples_per_pair,
        dim]`` (grouped by pair) against the text features ``text [n_seen, dim]``."""
        # cosines in fp32 even under bf16 autocast: a margin of 0.1 is a few bf16 steps
        with torch.autocast(feats.device.type, enabled=False):
            feats = model.adapted_embedding(feats.float())
            feats = feats.reshape(index.rows.numel(), self.samples_per_pair, -1)
            old_text = text[index.old_cols].float()
            if not self.grad_to_old_text:
                old_text = old_text.detach()
            return hinge_loss(feats, old_text, text[index.new_cols].float(), margin)

    def after_training_epoch(self, strategy, **kwargs):
        # copied: a captured step's record tensors are overwritten by its next step
        last = strategy.epoch_record.last_terms
        for kind in ("text", "image"):
            value = last.get(f"{kind}_hinge")
            if value is not None:
                self.last_losses[kind] = value.clone()


class PairIndex(NamedTuple):
    """Device tensors of a pair list: Gaussian rows of the old classes ``[p]`` and the
    score columns of the old and new classes ``[p]``."""

    rows: Tensor
    old_cols: Tensor
    new_cols: Tensor


def pair_index(model, pairs: List[Pair], device) -> PairIndex:
    """Look ``pairs`` up in ``model``'s Gaussians and score columns (one host sync)."""
    old_ids = [p[0] for p in pairs]
    new_ids = torch.tensor([p[1] for p in pairs], device=device)
    return PairIndex(
        rows=model.gaussians.index_of(old_ids).to(device),
        old_cols=model.column_of[torch.tensor(old_ids, device=device)],
        new_cols=model.column_of[new_ids],
    )
