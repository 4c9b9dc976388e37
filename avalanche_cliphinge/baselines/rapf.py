"""RAPF (ECCV 2024): a linear adapter on frozen CLIP image features, Gaussian replay, a hinge
on hard pairs of text features and the decomposed fusion of the adapter across tasks.

Every fact of RAPF's training taken here comes from its released code, github.com/linlany/RAPF
at commit 81d41df: ``main.py`` (the step, the replay and hinge volumes), ``continual_clip/
models.py`` (the adapter, the hard pairs, ``mix_matrix``) and ``configs/class/*.yaml``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CLIPHingeConfig, ConfigError
from ..gaussian import ClassGaussians
from ..hard_pairs import select_hard_pairs
from ..losses import hinge_loss
from ..plugins import GaussianReplayPlugin
from ..seeding import Draw, generator as seeded
from .frozen_base import FrozenFeatureStrategy, require_config
from .frozen_model import FrozenCLIPModel

#: RAPF's released configs, ``configs/class/<dataset>_<initial>-<increment>.yaml``:
#: ``(dataset, init_class, increment) -> (train_batch_size, beta, mix_bias, threshold,
#: shrinkage)``. Its ``main.py`` replays ``int(10 * beta)`` features per replayed class and
#: draws ``int(20 * beta)`` hinge samples per hard pair; every config trains 15 epochs, Adam at
#: lr 0.001, decayed x0.1 at epochs 4 and 10, prompt "a good photo of a {}.", seed 2.
RAPF_RELEASED: Dict[Tuple[str, int, int], Tuple[int, float, float, float, bool]] = {
    ("cifar100", 10, 10): (100, 2.0, 0.6, 0.55, False),
    ("cifar100", 50, 10): (100, 2.0, 0.6, 0.55, False),
    ("cifar100", 50, 5): (50, 2.0, 0.6, 0.55, False),
    ("imagenet_r", 10, 10): (60, 2.0, 0.7, 0.6, True),
    ("imagenet_r", 20, 20): (64, 1.0, 0.7, 0.65, True),
    ("imagenet_r", 40, 40): (64, 0.5, 0.7, 0.6, True),
    ("imagenet_r", 100, 10): (64, 2.0, 0.7, 0.65, True),
    ("imagenet_r", 100, 20): (64, 1.0, 0.7, 0.65, True),
}

#: seeding purpose of the adapter's initial weights (beyond ``seeding.Draw``'s numbers)
ADAPTER_INIT = 101


def rapf_release(config: CLIPHingeConfig) -> Tuple[int, float, float, float, bool]:
    """The ``RAPF_RELEASED`` entry of ``config``'s dataset and layout; for a layout RAPF
    released no config for, its dataset's B0 reference (ImageNet-R 20-20, else CIFAR-100
    10-10)."""
    key = (config.dataset, config.init_class, config.increment)
    if key in RAPF_RELEASED:
        return RAPF_RELEASED[key]
    reference = ("imagenet_r", 20, 20) if config.dataset == "imagenet_r" else ("cifar100", 10, 10)
    return RAPF_RELEASED[reference]


def rapf_config(config: CLIPHingeConfig) -> CLIPHingeConfig:
    """``config`` with RAPF's released training values (``rapf_release``) as config keys.

    Set: batch, epochs, learning rates and their decay, replay volume (``int(10 * beta)``
    features for each of ``replay_classes_per_step`` old classes per minibatch: 4 on CIFAR-100
    with increment 5, 5 on ImageNet-R, else 2, ``main.py``'s rule), the hard pairs (Euclidean
    distance of unit text features below the threshold, no cap), ``int(20 * beta)`` hinge
    samples per pair, margin 0.1, weight 1, the covariance (``+ 1e-4 I``, RAPF's ``shrink_cov``
    where released) and the prompt template. Kept: the layout, seed, class order, backbone and
    the implementation keys.
    """
    batch, beta, _, threshold, shrink = rapf_release(config)
    per_step = 5 if config.dataset == "imagenet_r" else 2
    if config.dataset == "cifar100" and config.increment == 5:
        per_step = 4
    return config.replace(
        batch_size=batch,
        init_epochs=15,
        epochs=15,
        init_lr=1e-3,
        lr=1e-3,
        weight_decay=0.0,
        lr_decay_epochs=[4, 10],
        lr_decay_factor=0.1,
        prompt_template="a good photo of a {}.",
        samples_per_old_class=int(10 * beta),
        replay_classes_per_step=per_step,
        covariance_shrinkage=0.0,
        covariance_jitter=1e-4,
        rapf_shrink_cov=shrink,
        text_use_hinge_loss=True,
        text_hard_pair_metric="euclidean",
        text_hard_pair_threshold=threshold,
        text_top_hard_pairs=None,
        hinge_samples_per_pair=int(20 * beta),
        text_hinge_margin=0.1,
        text_hinge_weight=1.0,
    )


@torch.no_grad()
def rapf_fusion(old_weight: Tensor, new_weight: Tensor, mix_bias: float) -> Tensor:
    """RAPF's decomposed parameter fusion of a square adapter weight (``mix_matrix``).

    With ``W_o`` the adapter before the task, ``W_n`` after it and the SVD
    ``W_o = U diag(s) V^T``, both are written in the basis of ``U``: ``P_o = U^T W_o =
    diag(s) V^T`` and ``P_n = U^T W_n``. Each coordinate keeps a share of its change that
    grows with how far it moved: ``M = min(1, |P_n - P_o| / max|P_n - P_o| + mix_bias)``
    elementwise, and

        ``W = U (M * P_n + (1 - M) * P_o) = W_o + U (M * (U^T (W_n - W_o)))``.

    The coordinates that moved most take the new value, the others a share of at least
    ``mix_bias`` of their change. Computed in float64 (RAPF: float32), returned in
    ``new_weight``'s dtype; ``W_n`` when nothing moved.

    Args:
        old_weight, new_weight: ``[d, d]`` adapter weights (``nn.Linear``'s ``[out, in]``).
        mix_bias: ``beta`` in ``[0, 1]`` (RAPF: 0.6 on CIFAR-100, 0.7 on ImageNet-R).

    Returns:
        ``[d, d]`` the fused weight.
    """
    if old_weight.ndim != 2 or old_weight.shape[0] != old_weight.shape[1]:
        raise ValueError(f"expected a square [d, d] weight, got {tuple(old_weight.shape)}")
    if new_weight.shape != old_weight.shape:
        raise ValueError(
            f"weights differ in shape: old {tuple(old_weight.shape)}, new {tuple(new_weight.shape)}"
        )
    if isinstance(mix_bias, bool) or not 0 <= float(mix_bias) <= 1:
        raise ValueError(f"mix_bias must be in [0, 1], got {mix_bias!r}")
    old, new = old_weight.double(), new_weight.double()
    u, s, vh = torch.linalg.svd(old)
    p_old, p_new = torch.diag(s) @ vh, u.T @ new
    moved = (p_new - p_old).abs()
    if float(moved.max()) == 0.0:
        return new_weight.clone()
    mask = torch.clamp(moved / moved.max() + mix_bias, max=1.0)
    return (u @ (p_new * mask + p_old * (1 - mask))).to(new_weight.dtype)


class RAPFModel(FrozenCLIPModel):
    """Frozen CLIP + RAPF's adapter, scored against the seen classes' template text features.

    ``embed(f) = normalize(f @ W^T)`` (``adapter``: ``nn.Linear(dim, dim, bias=False)``,
    initialised as ``nn.Linear``'s default, ``U(-1/sqrt(dim), 1/sqrt(dim))``, from
    ``generator``, as RAPF leaves it) and ``seen_scores(f) = logit_scale * embed(f) @
    seen_text^T``, ``[b, n_seen]``; ``seen_text [n_seen, dim]`` are the normalised features
    of ``prompt_template`` for the learned classes in column order. ``gaussians``: the class
    Gaussians of the frozen (unadapted) features.
    """

    def __init__(self, backbone, class_names, gaussians: ClassGaussians, generator, **kwargs):
        super().__init__(backbone, class_names, gaussians, **kwargs)
        dim = backbone.embed_dim
        self.adapter = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            weight = (torch.rand(dim, dim, generator=generator) * 2 - 1) / math.sqrt(dim)
            self.adapter.weight.copy_(weight)
        self.register_buffer("seen_text", torch.zeros(0, dim), persistent=False)

    def add_classes(self, class_ids) -> int:
        task = super().add_classes(class_ids)
        self.seen_text = self.raw_text_features(self.seen_classes).to(self.column_of.device)
        return task

    def embed(self, features: Tensor) -> Tensor:
        """``[b, dim]`` frozen features -> ``[b, dim]`` adapted unit features (float32)."""
        return F.normalize(self.adapter(features.float()), dim=-1)

    def seen_scores(self, features: Tensor) -> Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.logit_scale * self.embed(features) @ self.seen_text.T


class RAPF(FrozenFeatureStrategy):
    """RAPF (Huang, Cao, Lu, Liu: "Class-Incremental Learning with CLIP: Adaptive
    Representation Adjustment and Parameter Fusion", ECCV 2024, arXiv 2407.14143) as an
    Avalanche strategy, after its released code (github.com/linlany/RAPF).

    A linear adapter ``W [dim, dim]`` (``RAPFModel``) maps the frozen image features; a
    minibatch's loss is the cross-entropy of ``logit_scale * normalize(W f) @ text^T`` against
    the fixed-template text features of every class seen so far, over the minibatch's rows and
    the replayed rows together (one mean), plus ``text_hinge_weight`` times the hinge
    (``losses.hinge_loss``, margin ``text_hinge_margin``) of ``hinge_samples_per_pair``
    features drawn from each hard pair's old-class Gaussian, adapted: hard pairs are (old,
    present) classes whose unit text features lie closer than ``text_hard_pair_threshold``
    (``select_hard_pairs``, ``text_hard_pair_metric``: Euclidean in RAPF), chosen at each
    experience's start. Replay draws old-class features from their Gaussians (mean and
    covariance ``+ 1e-4 I`` of the frozen features, ``ClassGaussians``) by
    ``GaussianReplayPlugin``'s rule: ``replay_classes_per_step`` old classes per minibatch,
    taken in turn from a list shuffled every epoch, ``samples_per_old_class`` each (RAPF's
    volume). After every experience but the first the adapter is fused with the one before it
    (``rapf_fusion``, ``mix_bias``). Adam, its state new each experience, with step decay.

    Kept: all of the above with RAPF's released values (``released``). Changed: the
    Gaussians are fitted at the experience's start (RAPF: at its end, on the same features,
    used only later), draws come from seeded generators, the hinge's samples are drawn on the
    device. ``trainable_parameters() == dim * dim``.

    Args:
        config: layout, seed, backbone and implementation keys; with ``released`` false also
            the training keys named above (``rapf_config`` shows which).
        released: replace the training keys by RAPF's released values for the config's dataset
            and layout (``rapf_config``); Avalanche's ``train_mb_size``/``train_epochs``/
            ``eval_mb_size`` still override them.
        mix_bias: the fusion's ``beta`` (default: RAPF's released value, ``rapf_release``).
        **kwargs: ``FrozenFeatureStrategy``'s (``class_names``, ``device``, Avalanche's
            names, ``feature_cache``, ``progress``, ``backbone``).
    """

    def __init__(
        self,
        *,
        config: CLIPHingeConfig,
        released: bool = True,
        mix_bias: Optional[float] = None,
        **kwargs,
    ):
        require_config(config, "RAPF")
        if released:
            config = rapf_config(config)
        if mix_bias is None:
            mix_bias = rapf_release(config)[2]
        if isinstance(mix_bias, bool) or not isinstance(mix_bias, (int, float)):
            raise ConfigError(f"RAPF: mix_bias must be a number in [0, 1], got {mix_bias!r}")
        if not 0 <= mix_bias <= 1:
            raise ConfigError(f"RAPF: mix_bias must be in [0, 1], got {mix_bias}")
        super().__init__(config=config, **kwargs)
        self.mix_bias = float(mix_bias)
        cfg = self.config
        # the sampling rule of the method's replay plugin (not registered as a plugin)
        self._replay = GaussianReplayPlugin(
            samples_per_old_class=cfg.samples_per_old_class,
            seed=cfg.seed,
            classes_per_step=cfg.replay_classes_per_step,
        )
        #: ``(old id, new id, cosine)`` hard pairs of the current experience
        self.hard_pairs: List[Tuple[int, int, float]] = []
        #: the unweighted loss terms of the latest step (``cross_entropy``, ``text_hinge``)
        self.loss_terms: Dict[str, Tensor] = {}
        #: ``(features [k, dim], labels [k])`` replayed in the latest step (or ``None``)
        self.replay_rows: Optional[Tuple[Tensor, Tensor]] = None
        #: ``[pairs, samples_per_pair, dim]`` hinge samples of the latest step (or ``None``)
        self.hinge_samples: Optional[Tensor] = None
        self._pairs: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._old_weight: Optional[Tensor] = None
        self._epoch_replay = None
        self._hinge_generator: Optional[torch.Generator] = None
        self._hinge_emb: Optional[Tensor] = None
        self._replay_scores: Optional[Tensor] = None

    def make_model(self, backbone, class_names) -> RAPFModel:
        cfg = self.config
        return RAPFModel(
            backbone,
            class_names,
            ClassGaussians(backbone.embed_dim, cfg.gaussian_storage, cfg.gaussian_rank),
            seeded(cfg.seed, ADAPTER_INIT),
            prompt_template=cfg.prompt_template,
            resize_on_device=cfg.resize_on_device,
        )

    def _open_experience(self) -> None:
        """The experience's classes, the adapter to fuse with, and its hard pairs."""
        super()._open_experience()
        model, cfg, classes = self.model, self.config, self.experience_classes
        learned_before = classes.old or classes.returning
        self._old_weight = model.adapter.weight.detach().clone() if learned_before else None
        self.hard_pairs, self._pairs = [], None
        if cfg.text_use_hinge_loss and classes.old and classes.present:
            self.hard_pairs = select_hard_pairs(
                model.raw_text_features(classes.present),
                model.raw_text_features(classes.old),
                classes.present,
                classes.old,
                cfg.text_hard_pair_threshold,
                cfg.text_top_hard_pairs,
                cfg.text_hard_pair_metric,
            )
        if self.hard_pairs and cfg.hinge_samples_per_pair > 0:
            old = torch.tensor([p[0] for p in self.hard_pairs], device=self.device)
            new = torch.tensor([p[1] for p in self.hard_pairs], device=self.device)
            # Gaussian rows of the old classes, score columns of both: looked up once
            self._pairs = (
                model.gaussians.index_of(old),
                model.column_of[old],
                model.column_of[new],
            )
            self._hinge_generator = seeded(
                cfg.seed, Draw.HINGE, self.current_task, device=self.device
            )

    def _before_training_epoch(self, **kwargs):
        super()._before_training_epoch(**kwargs)
        self._epoch_replay = self._replay.chunks(
            self, self.clock.train_exp_epochs, len(self.dataloader)
        )

    def forward(self):
        """Training: the minibatch's frozen features, its replayed rows and the hinge samples
        go through the adapter in one call; returns the minibatch's ``[b, n_outputs]``
        scores (the replayed rows' are kept for ``criterion``)."""
        if not self.is_training:
            return super().forward()
        model = self.model
        parts = [self._minibatch_features(self.mb_x)]
        n_real = len(parts[0])
        self.replay_rows = None
        if self._epoch_replay is not None:
            rows = self._epoch_replay[self.clock.train_epoch_iterations]
            if len(rows[1]):
                self.replay_rows = rows
                parts.append(rows[0])
        self.hinge_samples = None
        if self._pairs is not None:
            n = self.config.hinge_samples_per_pair
            drawn = model.gaussians.sample_rows(self._pairs[0], n, self._hinge_generator)[0]
            self.hinge_samples = drawn.to(self.device).view(len(self.hard_pairs), n, -1)
            parts.append(self.hinge_samples.flatten(0, 1))
        with torch.autocast(self.device.type, enabled=False):
            emb = model.embed(torch.cat(parts))
            n_scored = n_real + (0 if self.replay_rows is None else len(self.replay_rows[1]))
            scores = model.logit_scale * emb[:n_scored] @ model.seen_text.T
        self._replay_scores = scores[n_real:]
        self._hinge_emb = None if self._pairs is None else emb[n_scored:]
        return model.to_full_width(scores[:n_real])

    def criterion(self):
        """Training: cross-entropy over the real and replayed rows (one mean) plus the
        weighted hinge; the unweighted terms go to ``loss_terms``."""
        if not self.is_training:
            return super().criterion()
        model, cfg = self.model, self.config
        logits = self.mb_output[:, model.class_of_column]
        labels = self.mb_y
        if self.replay_rows is not None:
            logits = torch.cat([logits, self._replay_scores])
            labels = torch.cat([labels, self.replay_rows[1].to(labels.device)])
        loss = F.cross_entropy(logits.float(), model.column_of[labels])
        terms = {"cross_entropy": loss}
        if self._hinge_emb is not None:
            emb = self._hinge_emb.view(len(self.hard_pairs), cfg.hinge_samples_per_pair, -1)
            text = model.seen_text
            _, old_cols, new_cols = self._pairs
            hinge = hinge_loss(emb, text[old_cols], text[new_cols], cfg.text_hinge_margin)
            terms["text_hinge"] = hinge
            loss = loss + cfg.text_hinge_weight * hinge
        self.loss_terms = {name: value.detach() for name, value in terms.items()}
        return loss

    def _after_training_exp(self, **kwargs):
        """RAPF's fusion of the adapter (after every experience but the first), then the
        plugins' ``after_training_exp``."""
        if self._old_weight is not None:
            weight = self.model.adapter.weight
            with torch.no_grad():
                weight.copy_(rapf_fusion(self._old_weight, weight.detach(), self.mix_bias))
            self._old_weight = None
        self._epoch_replay = self._hinge_emb = self._replay_scores = None
        super()._after_training_exp(**kwargs)
