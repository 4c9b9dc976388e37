"""Loading the frozen open_clip backbone.

Every model, the tiny offline one included, goes through ``open_clip.create_model_and_transforms``.
The tiny architecture ``cliphinge-tiny`` (32-px images, 2 blocks of width 64, 64-d embedding) is
registered through open_clip's own model-config mechanism when this module is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
from torch import nn

from ..config import TINY_MODEL
from ..errors import BackboneError, first_line

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
if TINY_MODEL not in open_clip.list_models():
    open_clip.add_model_config(_CONFIG_DIR)


@dataclass
class CLIPBackbone:
    """A frozen open_clip CLIP model with its transforms and tokenizer.

    Attributes:
        model: the open_clip ``CLIP`` module, every parameter with ``requires_grad=False``.
        train_transform: open_clip's training preprocess (random resized crop).
        eval_transform: open_clip's eval preprocess (resize, centre crop, normalise); the
            method uses it for training too unless augmentation is asked for.
        tokenizer: callable ``list[str] -> LongTensor [n, context_length]``.
        model_name: open_clip architecture name.
        pretrained: the tag, the checkpoint path, or ``None`` for random weights.
        weights_sha256: first 16 hex digits of the checkpoint's SHA-256 (``None`` unless a
            local file was loaded), written into results so numbers name their weights.
    """

    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_name: str
    pretrained: Optional[str]
    weights_sha256: Optional[str]

    @property
    def image_size(self) -> int:
        """Side of the square input image in pixels."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def activation(self) -> str:
        """``"quickgelu"`` or ``"gelu"``: the MLP activation of the architecture."""
        return "quickgelu" if uses_quick_gelu(self.model_name) else "gelu"

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text embedding."""
        return int(self.model.text_projection.shape[1])


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """First 16 hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def uses_quick_gelu(model_name: str) -> bool:
    """Whether the open_clip architecture ``model_name`` uses QuickGELU (x * sigmoid(1.702 x))."""
    return bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))


def _sibling_architecture(model_name: str, quick_gelu: bool) -> str:
    """The architecture that differs from ``model_name`` only in its activation."""
    base = model_name.removesuffix("-quickgelu")
    return f"{base}-quickgelu" if quick_gelu else base


def _activation_mismatch(model_name: str, weights: str, trained_quick_gelu: bool) -> str:
    """One line refusing weights trained with another activation than ``model_name`` has."""
    trained = "QuickGELU" if trained_quick_gelu else "GELU"
    built = "QuickGELU" if uses_quick_gelu(model_name) else "GELU"
    return (
        f"{weights} were trained with {trained} but {model_name} uses {built}: features "
        f"would be about 1e-2 off; use model_name '"
        f"{_sibling_architecture(model_name, trained_quick_gelu)}' (or set "
        f"allow_activation_mismatch=true to keep it on purpose)"
    )


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's published ``.pt`` files are).

    Both ``torch.save`` files and TorchScript archives are zip files; only the latter hold
    compiled code (``<name>/code/...``) and ``constants.pkl``.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist()
        )


#: Entries of OpenAI's TorchScript archives that are not weights of the network.
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def load_torchscript_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of a TorchScript CLIP archive into an open_clip ``model``.

    The archive is opened with ``torch.jit.load`` on the CPU and only its state dict is
    used (its code is never called). Every tensor must match ``model``'s names and shapes.

    Raises:
        BackboneError: the archive cannot be read, or its weights do not fit ``model``.
    """
    try:
        archive = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # RuntimeError for a damaged archive, pickle errors...
        raise BackboneError(
            f"could not read the TorchScript archive '{path}' "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err
    state = {k: v for k, v in archive.state_dict().items() if k not in _TORCHSCRIPT_EXTRAS}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected "
            f"{tuple(expected[wrong[0]].shape)}"
        )
        raise BackboneError(
            f"the TorchScript archive '{path}' does not fit the architecture "
            f"({detail}); pass the model_name it was made for"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _first_line(err: BaseException) -> str:
    return first_line(err, 160)


def check_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """``device`` as a ``torch.device`` once this machine is known to have it.

    Cheap (no CUDA context is made): run it before loading anything. ``option`` names the
    setting in the message (``--device`` on the command line, ``device=`` in Python).

    Raises:
        BackboneError: not a device name, CUDA asked on a machine without it, or a CUDA
            index beyond the machine's devices; one line saying what to pass instead.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BackboneError(
            f"{option} {device}: not a torch device; pass cpu, cuda or cuda:<index>"
        ) from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise BackboneError(
            f"{option} {device}: this machine has no CUDA device (torch.cuda.is_available() "
            f"is False); use {option} cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        raise BackboneError(
            f"{option} {device}: this machine has {count} CUDA device"
            f"{'' if count == 1 else 's'} ({have}); use one of them or {option} cpu"
        )
    return dev


def load_clip(
    model_name: str = "ViT-B-16-quickgelu",
    pretrained: Optional[str] = "openai",
    device: str | torch.device = "cpu",
    *,
    allow_activation_mismatch: bool = False,
) -> CLIPBackbone:
    """Create a frozen open_clip model.

    Args:
        model_name: an open_clip architecture (``ViT-B-16-quickgelu`` for OpenAI's ViT-B/16,
            ``cliphinge-tiny`` offline, ...).
        pretrained: an open_clip pretrained tag (``openai``; downloads when online), a path to a
            local checkpoint file, or ``None``/``"none"`` for random weights. Files: a state
            dict as open_clip or OpenAI's model code saves it (``.pt``/``.pth``/``.bin``/
            ``.ckpt``, read with ``weights_only=True``; ``.safetensors``), or a TorchScript
            archive as OpenAI publishes it (``ViT-B-16.pt``, the file ``clip.load`` caches).
        device: where to put the model.
        allow_activation_mismatch: accept a pretrained tag or an OpenAI TorchScript archive
            whose training activation (QuickGELU or GELU) differs from ``model_name``'s.
            A plain state-dict file does not say how it was trained: there ``model_name``
            decides.

    Returns:
        ``CLIPBackbone`` with the model in eval mode and every parameter frozen.

    Raises:
        BackboneError: unknown architecture, missing or unreadable file, an activation
            mismatch, or a tag whose weights cannot be fetched (offline); the message says
            what to pass instead.
    """
    if model_name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model '{model_name}'; choose one of "
            f"open_clip.list_models() (e.g. ViT-B-16-quickgelu, or {TINY_MODEL} "
            "offline)"
        )
    check_device(device, "device")
    tag = None if pretrained in (None, "", "none", "None") else str(pretrained)
    sha = None
    torchscript = False
    looks_like_file = tag is not None and (
        Path(tag).is_file()
        or os.sep in tag
        or tag.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    )
    if looks_like_file:
        if not Path(tag).is_file():
            raise BackboneError(
                f"pretrained checkpoint file '{tag}' does not exist; pass an "
                "existing file or an open_clip tag such as 'openai'"
            )
        sha = file_sha256(tag)
        torchscript = is_torchscript_archive(tag)
        if torchscript and not uses_quick_gelu(model_name) and not allow_activation_mismatch:
            raise BackboneError(
                _activation_mismatch(
                    model_name, f"the TorchScript archive '{tag}' (OpenAI's format)", True
                )
            )
    elif tag is not None:
        if tag not in open_clip.list_pretrained_tags_by_model(model_name):
            raise BackboneError(
                f"'{tag}' is neither a file nor a pretrained tag of {model_name} (tags: "
                f"{', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'})"
            )
        trained_quick_gelu = bool(
            open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False)
        )
        if trained_quick_gelu != uses_quick_gelu(model_name) and not allow_activation_mismatch:
            raise BackboneError(
                _activation_mismatch(model_name, f"the '{tag}' weights", trained_quick_gelu)
            )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        # huggingface_hub reads the variable once at import: honour it when set later too
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        # a TorchScript archive is read below, into a model built without weights
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            model_name, pretrained=None if torchscript else tag, device=device
        )
    except Exception as err:  # torch.load raises UnpicklingError, IndexError... on a bad file
        # ``from err``: the one-line message names the likely fix, a traceback (--debug)
        # still shows what open_clip or torch actually raised
        if sha is not None:
            raise BackboneError(
                f"could not load checkpoint '{tag}' into {model_name} "
                f"({type(err).__name__}: {_first_line(err)})"
            ) from err
        if tag is None or not isinstance(err, RuntimeError):
            raise  # random weights fetch nothing: not a download problem
        raise BackboneError(
            f"could not fetch the '{tag}' weights of {model_name} (offline?). Download them on a "
            f"machine with internet and pass the file: --pretrained /path/to/{model_name}.pt "
            f'(or pretrained="/path/..." in the config) ({type(err).__name__}: '
            f"{_first_line(err)})"
        ) from err
    if torchscript:
        load_torchscript_weights(model, tag)
    if tag is None:
        logging.getLogger(__name__).info("%s uses random weights (pretrained=None)", model_name)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return CLIPBackbone(
        model=model,
        train_transform=train_tf,
        eval_transform=eval_tf,
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        pretrained=tag,
        weights_sha256=sha,
    )
