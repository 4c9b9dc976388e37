"""The model of the baselines on frozen CLIP image features (issue 28).

``FrozenCLIPModel``: the frozen CLIP (``model.backbone.load_clip``, called as ``build_model``
calls it), the fixed-template text features of the stream's classes, the score columns of the
classes learned so far and per-class statistics of the frozen image features (``ClassMeans``,
or ``gaussian.ClassGaussians``); a subclass gives the scores of the learned classes.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..model.backbone import CLIPBackbone
from ..model.class_names import ClassNames, class_name_table
from ..model.cliphinge_model import UNSEEN_SCORE, DevicePreprocess
from ..model.image_encoding import FrozenImageEncoding
from ..model.prompts import raw_text_features


class ClassMeans(nn.Module):
    """The mean frozen image feature of each class, merged over experiences.

    Buffers: ``class_ids [k]`` (long, ascending), ``counts [k]`` (long) and ``means [k, dim]``
    (float32, accumulated in float64). ``fit`` takes ``ClassGaussians.fit``'s call (what
    ``StrategyInputs`` makes at every training experience); the covariance keywords are
    ignored. A class that comes back gets the mean of all its samples.

    Args:
        dim: feature dimension.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("means", torch.zeros(0, self.dim))

    def __len__(self) -> int:
        return int(self.class_ids.numel())

    @torch.no_grad()
    def fit(self, features: Tensor, labels: Tensor, **_covariance) -> Tensor:
        """Add ``features [n, dim]`` with class ids ``labels [n]``; returns the ``[k]`` ids
        fitted, sorted."""
        if (
            features.ndim != 2
            or labels.shape != features.shape[:1]
            or features.shape[1] != self.dim
        ):
            raise ValueError(
                f"expected features [n, {self.dim}] and labels [n], got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        device = self.means.device
        keys = torch.cat([self.class_ids, labels.to(device).long()])
        rows = torch.cat([self.means.double() * self.counts[:, None], features.to(device).double()])
        weights = torch.cat([self.counts, torch.ones_like(labels, device=device).long()])
        ids, where = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(ids), self.dim, dtype=torch.float64, device=device)
        counts = torch.zeros(len(ids), dtype=torch.long, device=device)
        self.class_ids = ids
        self.counts = counts.index_add_(0, where, weights)
        self.means = (sums.index_add_(0, where, rows) / self.counts[:, None]).float()
        return torch.unique(labels)

    def mean_of(self, class_ids: Sequence[int] | Tensor) -> Tensor:
        """``[len(class_ids), dim]`` means; ``KeyError`` for a class never fitted."""
        ids = torch.as_tensor(class_ids, dtype=torch.long, device=self.class_ids.device)
        pos = torch.searchsorted(self.class_ids, ids).clamp(max=max(len(self) - 1, 0))
        if not len(self) or (self.class_ids[pos] != ids).any():
            missing = sorted(set(ids.tolist()) - set(self.class_ids.tolist()))
            raise KeyError(f"no mean fitted for classes {missing}")
        return self.means[pos]


class FrozenCLIPModel(FrozenImageEncoding, nn.Module):
    """A frozen CLIP and a classifier over the classes learned so far.

    ``forward(x)``: images ``[b, 3, H, W]`` or frozen features ``[b, dim]`` -> scores
    ``[b, n_outputs]`` indexed by the stream's class ids (``n_outputs`` = largest id + 1), the
    subclass's ``seen_scores`` for learned classes and ``UNSEEN_SCORE`` for the others.

    Args:
        backbone: the frozen CLIP from ``load_clip``.
        class_names: names indexed by class id, or ``{class id: name}``.
        statistics: what the strategy fits on each experience's frozen training features
            (``StrategyInputs`` calls ``model.gaussians.fit``, hence the attribute's name):
            ``ClassMeans`` or ``ClassGaussians``.
        prompt_template: the fixed template of ``raw_text_features``.
        resize_on_device: images arrive as ``[0, 1]`` tensors resized and normalised on the
            device (``DevicePreprocess``).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        class_names: ClassNames,
        statistics: nn.Module,
        *,
        prompt_template: str = "a good photo of a {}.",
        resize_on_device: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        self.names = class_name_table(class_names)
        self.class_ids = sorted(self.names)
        self.n_outputs = self.class_ids[-1] + 1
        self.prompt_template = prompt_template
        self.gaussians = statistics
        self.lora = None  # read by StrategyInputs: the frozen encoder has no adapter
        self.preprocess = DevicePreprocess(backbone) if resize_on_device else None
        self.task_classes: List[List[int]] = []
        self.register_buffer("column_of", torch.full((self.n_outputs,), -1, dtype=torch.long))
        self.register_buffer("class_of_column", torch.zeros(0, dtype=torch.long))
        self._raw_text: Optional[Tensor] = None

    def train(self, mode: bool = True) -> "FrozenCLIPModel":
        """Switch the trainable parts; the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's temperature ``exp(logit_scale)`` (100 for OpenAI's weights)."""
        return self.clip.logit_scale.exp().float().detach()

    def raw_text_features(self, class_ids: Sequence[int]) -> Tensor:
        """``[len(class_ids), dim]`` normalised text features of ``prompt_template`` with each
        class name (every class of the stream encoded in one batch at the first call)."""
        if self._raw_text is None:
            names = [self.names[c] for c in self.class_ids]
            self._raw_text = raw_text_features(
                self.clip, self.backbone.tokenizer, names, self.prompt_template
            ).float()
        rows = [self.class_ids.index(int(c)) for c in class_ids]
        return self._raw_text[torch.as_tensor(rows, dtype=torch.long, device=self._raw_text.device)]

    @property
    def n_tasks(self) -> int:
        """Groups of new classes registered so far (one per experience that brought any)."""
        return len(self.task_classes)

    @property
    def seen_classes(self) -> List[int]:
        """Class ids learned so far, in score-column order."""
        return [c for classes in self.task_classes for c in classes]

    def add_classes(self, class_ids: Sequence[int]) -> int:
        """Give new classes the next score columns; returns their task index.

        Raises:
            ValueError: a class without a name, or one already registered.
        """
        class_ids = [int(c) for c in class_ids]
        bad = sorted(set(class_ids) - set(self.names))
        if bad:
            raise ValueError(
                f"class ids {bad} have no name in class_names ({len(self.names)} names); "
                "pass names for every class id of the stream"
            )
        repeated = sorted(set(class_ids) & set(self.seen_classes))
        if repeated:
            raise ValueError(f"classes {repeated} are already registered")
        start = len(self.seen_classes)
        self.task_classes.append(class_ids)
        device = self.column_of.device
        self.column_of[torch.tensor(class_ids, device=device)] = torch.arange(
            start, start + len(class_ids), device=device
        )
        self.class_of_column = torch.tensor(self.seen_classes, device=device)
        return self.n_tasks - 1

    def seen_scores(self, features: Tensor) -> Tensor:
        """``[b, dim]`` frozen features -> ``[b, n_seen]`` scores in column order."""
        raise NotImplementedError

    def to_full_width(self, seen_scores: Tensor) -> Tensor:
        """``[b, n_seen]`` -> ``[b, n_outputs]`` in class-id order, unseen = UNSEEN_SCORE."""
        out = seen_scores.new_full((seen_scores.shape[0], self.n_outputs), UNSEEN_SCORE)
        out[:, self.class_of_column] = seen_scores
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Images or features ``[b, ...]`` -> scores ``[b, n_outputs]`` (all ``UNSEEN_SCORE``
        before the first experience)."""
        if self.n_tasks == 0:
            return torch.full((x.shape[0], self.n_outputs), UNSEEN_SCORE, device=x.device)
        return self.to_full_width(self.seen_scores(self.frozen_features(x)))
