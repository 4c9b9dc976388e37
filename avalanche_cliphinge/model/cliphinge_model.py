"""``CLIPHingeModel``: frozen CLIP + per-task prompts, class Gaussians, stage-2 heads, fusion.

Its text side (tasks, classes, prompts, text features) is the mixin ``TasksAndText``
(``tasks_and_text``); this module holds the image side, the scores, the model as a file
and the factory ``build_model``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CLIPHingeConfig
from ..fusion import fuse_logits
from ..gaussian import ClassGaussians
from ..streams import ClipInput, clip_mean_std
from .backbone import CLIPBackbone, load_clip
from .class_names import ClassNames, class_name_table
from .heads import ImageAdapter
from .lora import VisualLoRA
from .prompts import encode_token_embeddings, prompt_length
from .saving import read_saved_model, restore_learned_state, save_model
from .image_encoding import FrozenImageEncoding
from .tasks_and_text import TasksAndText


class DevicePreprocess(nn.Module):
    """Batched bicubic resize to the model's input size and CLIP normalisation, on device.

    Input ``[batch, 3, h, w]`` in ``[0, 1]`` (uint8 ``[0, 255]`` accepted); output
    ``[batch, 3, S, S]`` normalised with the backbone's mean and std. Replaces the per-image
    PIL resize of open_clip's eval transform (torch's bicubic kernel differs slightly from
    PIL's), which caps throughput when small images (CIFAR, 32 px) are upsampled to 224 px.
    """

    def __init__(self, backbone: CLIPBackbone):
        super().__init__()
        self.size = backbone.image_size
        mean, std = clip_mean_std(backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """``[b, 3, h, w]`` -> ``[b, 3, size, size]`` normalised."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bicubic", align_corners=False
            ).clamp_(0, 1)
        return (x - self.mean) / self.std


#: Score given to classes not seen yet: finite (safe under bf16) and far below any cosine logit.
UNSEEN_SCORE = -1e4


class CLIPHingeModel(TasksAndText, FrozenImageEncoding, nn.Module):
    """Scores over every class of the stream, from a frozen CLIP and the method's parts.

    The output of ``forward`` is ``[batch, n_classes]`` indexed by the stream's original class
    ids: seen classes get ``logit_scale * cos(image, prompted text)`` (plus
    ``fusion_weight * head`` in eval mode once stage-2 heads exist), unseen classes
    ``UNSEEN_SCORE``. The input is either images ``[batch, 3, H, W]`` or pre-computed frozen
    image features ``[batch, dim]`` (the feature cache and Gaussian replay use the latter).

    Args:
        backbone: the frozen CLIP from ``load_clip``.
        class_names: names indexed by class id, or a mapping ``{class id: name}`` (ids need
            not be contiguous; the score width is the largest id + 1).
        n_ctx, ctx_init: prompt length and initial phrase (see ``TaskPrompts``).
        prompt_template: fixed template of the raw text features (hard pairs, zero-shot).
        use_image_adapter: add the residual stage-1 image adapter.
        fusion_weight: alpha of ``clip + alpha * head`` at inference.
        head_logit_scale: ``second_stage_logit_scale``; also scales the stand-in head logit
            of tasks without a head.
        lora: ``(layers, rank, alpha)`` to give stage 2 one LoRA adapter per task, or ``None``.
        seed: seeds each task's prompt initialisation
            (``seeding.generator(seed, Draw.PROMPTS, task)``).
        resize_on_device: images arrive as unnormalised ``[0, 1]`` tensors of any square size
            and are resized (bicubic) and normalised on the model's device
            (``DevicePreprocess``), instead of per image on the CPU.
        gaussian_storage, gaussian_rank: how the class Gaussians keep their sampling
            factors (``ClassGaussians``'s ``storage`` and ``rank``).
        shared_context: one context ``[n_ctx, width]`` (``shared_ctx``) read by every class
            of every task, CoOp's unified context, instead of one per class.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        class_names: ClassNames,
        *,
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        prompt_template: str = "a good photo of a {}.",
        use_image_adapter: bool = False,
        fusion_weight: float = 0.3,
        head_logit_scale: float = 20.0,
        lora: Optional[tuple] = None,
        seed: int = 0,
        resize_on_device: bool = False,
        gaussian_storage: str = "full",
        gaussian_rank: int = 64,
        shared_context: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        self.tokenizer = backbone.tokenizer
        self.names = class_name_table(class_names)
        #: the stream's class ids, ascending; ``n_outputs`` = largest id + 1 score columns
        self.class_ids = sorted(self.names)
        self.n_outputs = self.class_ids[-1] + 1
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.prompt_template = prompt_template
        self.fusion_weight = fusion_weight
        self.head_logit_scale = head_logit_scale
        self.seed = seed
        self._register_unified_context(shared_context)
        dim = backbone.embed_dim
        self.prompts = nn.ModuleList()
        # one prompt length for the whole stream: every task's prompts get the same shape
        self.prompt_length = prompt_length(self.tokenizer, list(self.names.values()), n_ctx)
        self.task_classes: List[List[int]] = []
        self.gaussians = ClassGaussians(dim, gaussian_storage, gaussian_rank)
        self.adapter = ImageAdapter(dim) if use_image_adapter else None
        self.heads = nn.ModuleDict()
        self.lora = VisualLoRA(self.clip.visual, *lora) if lora is not None else None
        self.register_buffer("column_of", torch.full((self.n_outputs,), -1, dtype=torch.long))
        self.register_buffer("class_of_column", torch.zeros(0, dtype=torch.long))
        self._text_cache: Dict[int, Tensor] = {}
        self._raw_text: Optional[Tensor] = None
        self.preprocess = DevicePreprocess(backbone) if resize_on_device else None
        self._encode_trainable: Callable[[Tensor, Tensor], Tensor] = self.encode_prompts

    def encode_prompts(self, embeddings: Tensor, tokens: Tensor) -> Tensor:
        """``[n, L, width]`` prompt embeddings -> ``[n, dim]`` normalised float32 features."""
        return F.normalize(encode_token_embeddings(self.clip, embeddings, tokens).float(), dim=-1)

    def compile_prompt_encoder(self) -> None:
        """Run trainable prompts through ``torch.compile(mode="reduce-overhead")``.

        On CUDA this captures the text encoder's forward and backward as CUDA graphs (one per
        prompt-tensor shape), which removes the launch latency that bounds a prompt-learning
        step. Call ``torch.compiler.cudagraph_mark_step_begin()`` before each step.
        """
        self._encode_trainable = torch.compile(
            self.encode_prompts, mode="reduce-overhead", dynamic=False
        )

    def __getstate__(self):
        # torch.compile's wrapper cannot be pickled (Avalanche's save_checkpoint) and is bound
        # to this object (a deep copy would run the original's prompts): store whether the
        # prompt encoder was compiled, compile it again for the new object.
        state = self.__dict__.copy()
        state["_encode_trainable"] = self._encode_trainable != self.encode_prompts
        return state

    def __setstate__(self, state):
        compiled = state.pop("_encode_trainable", False) is True
        super().__setstate__(state)
        self._encode_trainable = self.encode_prompts
        if compiled:
            self.compile_prompt_encoder()

    def train(self, mode: bool = True) -> "CLIPHingeModel":
        """Switch the trainable parts; the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ---- image side -------------------------------------------------------------------------
    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned temperature, ``exp(logit_scale)`` (100 for OpenAI weights)."""
        return self.clip.logit_scale.exp().float()

    def adapted_embedding(self, features: Tensor) -> Tensor:
        """``[batch, dim]`` frozen features -> normalised embedding (after the adapter, if any)."""
        if self.adapter is not None:
            features = self.adapter(features)
        return F.normalize(features, dim=-1)

    def clip_logits(self, features: Tensor, text_features: Optional[Tensor] = None) -> Tensor:
        """``[batch, dim]`` frozen features -> ``[batch, n_seen]`` stage-1 logits.

        ``text_features`` ``[n_seen, dim]`` (default: ``text_features()``) lets a training
        step encode the prompts once and share them with its loss terms (the hinge). The
        normalisation and the cosine matmul run in float32 outside autocast.
        """
        text = self.text_features() if text_features is None else text_features
        with torch.autocast(device_type=features.device.type, enabled=False):
            image = self.adapted_embedding(features.float())
            return self.logit_scale * image @ text.float().T

    def head_logits(self, x: Tensor, features: Tensor) -> Tensor:
        """``[batch, n_seen]`` stage-2 head logits.

        A task without a trained head (before ``second_stage_start_task``) gets what its
        untrained head would give, ``head_logit_scale * cos(image, prompted text)``, so
        fusion does not favour the tasks that have heads. ``x`` is the model input (images or
        features); a task with its own LoRA adapter re-encodes the images through it.
        """
        out = torch.zeros(features.shape[0], len(self.seen_classes), device=features.device)
        start = 0
        for task, classes in enumerate(self.task_classes):
            key = str(task)
            stop = start + len(classes)
            if key in self.heads:
                feats = features
                if self.lora is not None and f"task{task}" in self.lora.adapters:
                    if x.ndim == 2:
                        raise ValueError(
                            "LoRA heads need images, not cached features; "
                            "the strategy evaluates on images once an adapter "
                            "exists"
                        )
                    with torch.no_grad(), self.lora.using(f"task{task}"):
                        feats = self.run_image_encoder(x)
                out[:, start:stop] = self.heads[key](feats)
            else:
                text = self.task_text_features(task).float()
                with torch.autocast(device_type=features.device.type, enabled=False):
                    image = F.normalize(features.float(), dim=-1)
                    out[:, start:stop] = self.head_logit_scale * image @ text.T
            start = stop
        return out

    def to_full_width(self, seen_scores: Tensor) -> Tensor:
        """``[batch, n_seen]`` -> ``[batch, n_outputs]`` in class-id order, unseen = UNSEEN_SCORE."""
        out = torch.full(
            (seen_scores.shape[0], self.n_outputs),
            UNSEEN_SCORE,
            dtype=seen_scores.dtype,
            device=seen_scores.device,
        )
        out[:, self.class_of_column] = seen_scores
        return out

    def seen_scores(self, x: Tensor, text_features: Optional[Tensor] = None) -> Tensor:
        """``[batch, n_seen]`` scores: CLIP logits, fused with the heads in eval mode.

        ``text_features``: see ``clip_logits``.
        """
        features = self.frozen_features(x)
        scores = self.clip_logits(features, text_features)
        if not self.training and len(self.heads) > 0:
            scores = fuse_logits(scores, self.head_logits(x, features), self.fusion_weight)
        return scores

    def forward(self, x: Tensor, text_features: Optional[Tensor] = None) -> Tensor:
        """Images ``[b, 3, H, W]`` or features ``[b, dim]`` -> scores ``[b, n_outputs]``.

        Before any task is registered every class is unseen: every score is
        ``UNSEEN_SCORE`` (Avalanche evaluates before training with ``eval_every >= 0``).
        ``text_features``: see ``clip_logits``.
        """
        if self.n_tasks == 0:
            return torch.full((x.shape[0], self.n_outputs), UNSEEN_SCORE, device=x.device)
        return self.to_full_width(self.seen_scores(x, text_features))

    # ---- a trained model as a file ------------------------------------------------------------
    def save(self, path, config=None):
        """Write the trained model to ``path`` (see ``avalanche_cliphinge.model.saving``).

        ``config`` defaults to the one the model was built from (``build_model`` records it).
        Returns the path written.
        """
        config = config if config is not None else getattr(self, "config", None)
        if config is None:
            raise ValueError(
                "save needs the CLIPHingeConfig the model was built with: model.save(path, config)"
            )
        return save_model(self, path, config)

    @classmethod
    def load(cls, path, device="cpu", pretrained=None) -> "CLIPHingeModel":
        """A model written by ``save``, in eval mode (``pretrained``: where the frozen weights
        are on this machine, when not where training found them).

        Raises:
            SavedModelError: not a saved model, weights other than those trained with, or
                learned class ids without a name (a file from an older version, or edited).
        """
        saved = read_saved_model(path, device=device, pretrained=pretrained)
        model = build_model(saved.config, saved.class_names, device, backbone=saved.backbone)
        restore_learned_state(model, saved.learned)
        return model.eval()

    @torch.no_grad()
    def predict(self, images, k: int = 5, batch_size: int = 64) -> "Prediction":
        """Top-``k`` classes of images, among the classes learned so far.

        Args:
            images: a PIL image, a list of PIL images or image tensors, or a tensor
                ``[n, 3, h, w]`` (uint8, or float in ``[0, 1]``); brought to CLIP's input the
                way the strategy does it.
            k: how many classes per image (at most the number learned).
            batch_size: images per forward pass.

        Returns:
            ``Prediction(class_ids [n, k] long, names [n][k], scores [n, k] float)``, best
            first; the scores are those of ``forward`` (fused with the heads).
        """
        if self.n_tasks == 0:
            raise ValueError("the model has learned no class yet: train it or load a saved one")
        if isinstance(images, Tensor) and images.ndim == 3:
            images = images[None]
        elif not isinstance(images, (list, tuple, Tensor)):
            images = [images]
        on_device = self.preprocess is not None
        to_input = ClipInput.for_backbone(self.backbone, resize_on_device=on_device)
        was_training = self.training
        self.eval()
        device = self.column_of.device
        scores = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([to_input(x) for x in images[start : start + batch_size]])
            scores.append(self(batch.to(device)).float())
        self.train(was_training)
        seen = self.class_of_column
        top = torch.cat(scores)[:, seen].topk(min(k, seen.numel()), dim=1)
        ids = seen[top.indices].cpu()
        names = [[self.names[int(c)] for c in row] for row in ids]
        return Prediction(ids, names, top.values.cpu())


def build_model(
    config: CLIPHingeConfig,
    class_names: ClassNames,
    device: str | torch.device = "cpu",
    backbone: Optional[CLIPBackbone] = None,
    shared_context: bool = False,
) -> CLIPHingeModel:
    """Wrap ``backbone`` (default: the one ``config`` names, loaded now) in a ``CLIPHingeModel``
    with the options ``config`` sets (and ``shared_context``: CoOp's unified context); the
    model records ``config`` (what ``save`` writes)."""
    if backbone is None:
        backbone = load_clip(
            config.model_name,
            config.pretrained,
            device=device,
            allow_activation_mismatch=config.allow_activation_mismatch,
        )
    lora = (
        (config.lora_layers, config.lora_rank, config.lora_alpha)
        if config.use_lora_in_second_stage and config.second_stage_epochs > 0
        else None
    )
    model = CLIPHingeModel(
        backbone,
        class_names,
        n_ctx=config.n_ctx,
        ctx_init=config.ctx_init,
        prompt_template=config.prompt_template,
        use_image_adapter=config.use_image_adapter,
        fusion_weight=config.second_stage_fusion_weight,
        head_logit_scale=config.second_stage_logit_scale,
        lora=lora,
        seed=config.seed,
        resize_on_device=config.resize_on_device,
        gaussian_storage=config.gaussian_storage,
        gaussian_rank=config.gaussian_rank,
        shared_context=shared_context,
    ).to(device)
    model.config = config  # what CLIPHingeModel.save records to rebuild it
    return model


class Prediction(NamedTuple):
    """``CLIPHingeModel.predict`` output: ``class_ids [n, k]``, ``names [n][k]``,
    ``scores [n, k]``, best first."""

    class_ids: Tensor
    names: List[List[str]]
    scores: Tensor
