"""What zero-shot CLIP and the Avalanche baselines of a comparison run on: frozen CLIP features.

Feature reuse: the baselines and zero-shot CLIP only ever see the frozen encoder's output, so the
encoder runs once per seed over every experience (``extract_feature_stream``) and they train on an
Avalanche benchmark of feature tensors with the image stream's class order, experience split and
test order (checked); their model's encoder is then the identity. The numbers are those of a
frozen encoder + head on images (no augmentation, as in RAPF), without one encoder pass per epoch
per strategy. ``CLIPHingeStrategy`` runs on the image stream exactly as ``run_experiment`` does,
so its numbers match ``experiments/run_split_cifar.py``; its entries share one ``FeatureCache``
per stream, so the encoder runs once for all of them as well.

The models: ``FrozenCLIPClassifier`` (the baselines' frozen encoder + ``IncrementalClassifier``)
and ``ZeroShotCLIP`` with ``ZeroShotCLIPStrategy`` (zero-shot CLIP through Avalanche).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from avalanche.models import DynamicModule, IncrementalClassifier
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..loaders import encode_dataset
from ..model.backbone import CLIPBackbone
from ..model.cliphinge_model import UNSEEN_SCORE


class FrozenFeatures(nn.Module):
    """``encoder(x)`` without gradients, L2-normalised: ``[batch, ...] -> [batch, dim]``.

    ``encoder`` is the identity on pre-extracted features (what the comparison uses) or
    ``FrozenImageEncoder`` on images; it stays in eval mode whatever the parent's mode.
    """

    def __init__(self, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()

    def train(self, mode: bool = True) -> "FrozenFeatures":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.encoder(x)
        return F.normalize(features.float(), dim=-1)


class FrozenImageEncoder(nn.Module):
    """The frozen CLIP image encoder as a module: images ``[b, 3, H, W]`` -> ``[b, dim]``."""

    def __init__(self, backbone: CLIPBackbone):
        super().__init__()
        self.clip = backbone.model

    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images).float()


class FrozenCLIPClassifier(nn.Module):
    """Frozen CLIP image encoder + Avalanche's ``IncrementalClassifier`` on normalised features.

    ``forward(x) = classifier(normalize(encoder(x)))`` with scores ``[batch, max class id + 1]``
    (classes not trained yet are masked by the classifier). Only the classifier trains: the
    identity encoder has no parameters and ``FrozenImageEncoder``'s have ``requires_grad=False``.

    Args:
        dim: feature dimension (CLIP's ``embed_dim``).
        encoder: ``None`` (identity: inputs are pre-extracted features) or a frozen image
            encoder such as ``FrozenImageEncoder(backbone)``.
    """

    def __init__(self, dim: int, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.feature_extractor = FrozenFeatures(encoder)
        self.classifier = IncrementalClassifier(in_features=dim, initial_out_features=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feature_extractor(x))


# ---- zero-shot CLIP -------------------------------------------------------------------------
class ZeroShotCLIP(DynamicModule):
    """Zero-shot CLIP over the classes seen so far, on frozen image features.

    ``scores = logit_scale * cos(feature, text_c)`` for seen classes and ``UNSEEN_SCORE`` for
    the others, ``[batch, n_classes]``. A class becomes seen when the model adapts to a
    training experience (Avalanche's model adaptation, like ``IncrementalClassifier``).

    Args:
        text_features: ``[n_classes, dim]`` normalised features of the template per class.
        logit_scale: CLIP's temperature (``exp(logit_scale)``).
    """

    def __init__(self, text_features: Tensor, logit_scale: float):
        super().__init__()
        self.register_buffer("text", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("seen", torch.zeros(text_features.shape[0], dtype=torch.bool))
        self.logit_scale = float(logit_scale)

    @property
    def _adaptation_device(self):
        return self.text.device

    @torch.no_grad()
    def adaptation(self, experience):
        if self.training:
            self.seen[list(experience.classes_in_this_experience)] = True

    def forward(self, x: Tensor) -> Tensor:
        scores = self.logit_scale * F.normalize(x.float(), dim=-1) @ self.text.T
        return scores.masked_fill(~self.seen, UNSEEN_SCORE)


class ZeroShotCLIPStrategy(SupervisedTemplate):
    """Evaluates ``ZeroShotCLIP`` through Avalanche with zero training epochs.

    ``train(experience)`` only registers the experience's classes as seen; evaluation and
    metrics are Avalanche's.
    """

    def __init__(
        self,
        *,
        model: ZeroShotCLIP,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        evaluator=default_evaluator,
    ):
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=eval_mb_size,
            train_epochs=0,
            eval_mb_size=eval_mb_size,
            device=device,
            evaluator=evaluator,
        )

    def make_optimizer(self, **kwargs):
        """Nothing to optimise."""


# ---- streams of features --------------------------------------------------------------------
@dataclass
class FeatureStream:
    """An Avalanche benchmark of frozen image features aligned with an image stream.

    Attributes:
        benchmark: ``nc_benchmark`` over ``TensorDataset(features [n, dim], targets)`` with the
            image stream's class order and experience sizes; experience k holds the same
            samples, in the same test order, as the image stream's experience k.
        dim: feature dimension.
        seconds: wall time of the extraction.
    """

    benchmark: Any
    dim: int
    seconds: float


@torch.no_grad()
def extract_feature_stream(
    named_benchmark,
    backbone: CLIPBackbone,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    bf16: bool = False,
    num_workers: int = 0,
) -> FeatureStream:
    """Run the frozen image encoder once over every experience of ``named_benchmark`` (eval transform).

    The items are brought to the encoder's input as the strategy brings them
    (``streams.ClipInput``: PIL images, uint8 or ``[0, 1]`` tensors are resized and normalised;
    CLIP's own input passes unchanged). Returns unnormalised ``float32`` features in a
    benchmark built the way the image stream was (``benchmarks.common.make_nc_benchmark``,
    original class ids as targets). ``bf16`` autocasts the encoder on CUDA; ``num_workers``
    feeds the DataLoader.
    """
    from ..benchmarks.common import make_nc_benchmark
    from ..dataset_transforms import freeze_transforms
    from ..streams import ClipInput

    clip_input = ClipInput.for_backbone(backbone)

    began = time.perf_counter()
    device = torch.device(device)
    encoder = backbone.model.eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if bf16 and device.type == "cuda"
        else nullcontext()
    )

    def encode(stream):
        feats, labels = [], []
        for experience in stream:
            f, y = encode_dataset(
                encoder.encode_image,
                freeze_transforms(experience.dataset.eval()).replace_current_transform_group(
                    clip_input
                ),
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
                autocast=lambda: autocast,
            )
            feats.append(f.cpu())
            labels.append(y.cpu())
        return TensorDataset(torch.cat(feats), torch.cat(labels))

    image_benchmark = named_benchmark.benchmark
    sizes = list(image_benchmark.n_classes_per_exp)
    train, test = encode(image_benchmark.train_stream), encode(image_benchmark.test_stream)
    benchmark = make_nc_benchmark(
        train,
        test,
        list(named_benchmark.class_order),
        sizes[0],
        sizes[1] if len(sizes) > 1 else sizes[0],
        None,
        None,
    )
    for side in ("train_stream", "test_stream"):
        ours, theirs = getattr(benchmark, side), getattr(image_benchmark, side)
        for k, (a, b) in enumerate(zip(ours, theirs)):
            same_classes = sorted(a.classes_in_this_experience) == sorted(
                b.classes_in_this_experience
            )
            if not same_classes or len(a.dataset) != len(b.dataset):
                raise RuntimeError(
                    f"feature stream differs from the image stream at {side} "
                    f"experience {k}; the stream must hold each class in one "
                    "experience"
                )
    for a, b in zip(benchmark.test_stream, image_benchmark.test_stream):
        if list(a.dataset.targets) != list(b.dataset.targets):
            raise RuntimeError("feature test stream is not index-aligned with the image one")
    return FeatureStream(benchmark, train.tensors[0].shape[1], time.perf_counter() - began)
