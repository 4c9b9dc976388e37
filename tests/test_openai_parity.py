"""Fidelity to OpenAI's own CLIP code: same weights in, same features out.

The reference is OpenAI's model code as packaged on PyPI (``clip-anytorch``, a test-only
dependency). Its ``CLIP`` is built with random weights in fp32 (``clip.model.build_model``
rounds to fp16, so it is not used), saved as OpenAI's code saves a state dict, and loaded
through ``load_clip`` with the package's default config. Image features (the package's eval
transform against OpenAI's ``_transform``) and text features (the package's tokenizer against
``clip.tokenize``) must agree to 1e-5 relative.
"""

from __future__ import annotations

import hashlib
import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avalanche_cliphinge import BackboneError, CLIPHingeConfig, load_clip
from avalanche_cliphinge.model.backbone import is_torchscript_archive, uses_quick_gelu

SHARED_JPEGS = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg-subset"

#: OpenAI's architectures checked: (name in open_clip, vision patch size). ViT-B/32 passes
#: too (``{"ViT-B-32-quickgelu": 32}``) but doubles this file's time; the suite keeps B/16.
ARCHITECTURES = {"ViT-B-16-quickgelu": 16}

PROMPTS = [
    "a good photo of a goldfish.",
    "a photo of a great white shark",
    "an origami of a hermit crab, with a very long description that keeps going",
]


def reference_clip_module():
    """OpenAI's ``clip`` package; its ``clip.py`` imports ``packaging`` from pkg_resources,
    which setuptools no longer ships: give it the ``packaging`` distribution instead."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub
    import clip

    return clip


def reference_model(patch: int, seed: int = 0):
    """OpenAI's ViT-B CLIP (512-d joint space, 224 px) with seeded random fp32 weights."""
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=patch,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    )
    return model.float().eval()


def a_jpeg():
    """A 32x32 CIFAR-10 JPEG from the shared subset where the checkout has ``../shared``;
    elsewhere (a clone of the repository, which does not ship it) a 32x32 gradient saved as
    JPEG: what matters here is a small decoded JPEG, upscaled by both transforms."""
    shared = sorted(SHARED_JPEGS.glob("test/*/*.jpg"))
    if shared:
        return Image.open(shared[0])
    ramp = np.arange(32, dtype=np.uint8) * 8
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
    return Image.open(io.BytesIO(encoded.getvalue()))


def sample_images():
    """PIL images of several sizes and modes: random, a real JPEG, greyscale."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (300, 200, 3), np.uint8)),
        a_jpeg().convert("RGB"),
        Image.fromarray(rng.integers(0, 256, (61, 97), np.uint8), mode="L"),
    ]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest per-row ``||ours - reference|| / ||reference||``."""
    return float(((ours - reference).norm(dim=-1) / reference.norm(dim=-1)).max())


@pytest.fixture(scope="module")
def clip_ref():
    return reference_clip_module()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def reference(request, clip_ref, tmp_path_factory):
    """(architecture, OpenAI's model, its state-dict file, its TorchScript archive, the
    state-dict file loaded through ``load_clip``)."""
    name = request.param
    model = reference_model(ARCHITECTURES[name])
    folder = tmp_path_factory.mktemp(name)
    plain = folder / f"{name}-state-dict.pt"
    torch.save(model.state_dict(), plain)
    # OpenAI's archives also carry these three entries beside the weights
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(key, None)  # a plain attribute of the reference CLIP
        model.register_buffer(key, torch.tensor(value))
    image = torch.zeros(1, 3, 224, 224)
    text = clip_ref.tokenize(["a photo of a cat"])
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    archive = folder / f"{name}.pt"
    torch.jit.save(traced, str(archive))
    if name == "ViT-B-16-quickgelu":
        name = CLIPHingeConfig().model_name  # the default config's network, as a user gets it
    return name, model, plain, archive, load_clip(name, str(plain))


def test_default_config_names_openai_network():
    config = CLIPHingeConfig()
    assert config.model_name == "ViT-B-16-quickgelu" and config.pretrained == "openai"
    assert uses_quick_gelu(config.model_name)
    assert not uses_quick_gelu("ViT-B-16")


def test_features_match_openai_reference_code(reference, clip_ref):
    _, model, _, _, ours = reference
    assert ours.activation == "quickgelu"
    images = sample_images()
    ref_transform = clip_ref.clip._transform(224)
    with torch.no_grad():
        ours_pixels = torch.stack([ours.eval_transform(im) for im in images])
        ref_pixels = torch.stack([ref_transform(im) for im in images])
        assert torch.allclose(ours_pixels, ref_pixels, atol=1e-6)
        ours_image = ours.model.encode_image(ours_pixels)
        ref_image = model.encode_image(ref_pixels)
        ours_tokens = ours.tokenizer(PROMPTS)
        ref_tokens = clip_ref.tokenize(PROMPTS)
        assert torch.equal(ours_tokens, ref_tokens)
        ours_text = ours.model.encode_text(ours_tokens)
        ref_text = model.encode_text(ref_tokens)
    assert relative_error(ours_image, ref_image) < 1e-5
    assert relative_error(ours_text, ref_text) < 1e-5
    assert float(ours.model.logit_scale.exp()) == pytest.approx(
        float(model.logit_scale.detach().exp())
    )


def test_gelu_network_is_off_on_the_same_weights(reference, clip_ref):
    """The check above has teeth: open_clip's GELU network on OpenAI's weights is ~1e-2 off."""
    name, model, plain, _, _ = reference
    gelu = load_clip(name.removesuffix("-quickgelu"), str(plain))
    assert gelu.activation == "gelu"
    tokens = clip_ref.tokenize(PROMPTS)
    with torch.no_grad():
        error = relative_error(gelu.model.encode_text(tokens), model.encode_text(tokens))
    assert error > 1e-3


def test_torchscript_archive_loads_like_the_state_dict(reference):
    """Same architecture, bit-identical weights: the features are those of the state dict."""
    name, _, plain, archive, from_plain = reference
    assert is_torchscript_archive(archive) and not is_torchscript_archive(plain)
    from_archive = load_clip(name, str(archive))
    a, b = from_archive.model.state_dict(), from_plain.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert from_archive.weights_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    assert all(not p.requires_grad for p in from_archive.model.parameters())
    assert from_archive.activation == "quickgelu"


def test_torchscript_archive_with_gelu_network_is_refused(reference):
    name, _, _, archive, _ = reference
    gelu = name.removesuffix("-quickgelu")
    with pytest.raises(BackboneError) as info:
        load_clip(gelu, str(archive))
    message = str(info.value)
    assert f"'{name}'" in message and "allow_activation_mismatch" in message
    assert len(message.splitlines()) == 1
    forced = load_clip(gelu, str(archive), allow_activation_mismatch=True)
    assert forced.activation == "gelu"


def test_torchscript_archive_of_another_architecture_is_refused(reference, tmp_path):
    name, _, _, archive, _ = reference
    other = "ViT-B-32-quickgelu" if name != "ViT-B-32-quickgelu" else "ViT-B-16-quickgelu"
    with pytest.raises(BackboneError, match="does not fit the architecture"):
        load_clip(other, str(archive))


def test_openai_tag_with_gelu_network_is_refused_before_any_download(monkeypatch):
    import open_clip

    def no_download(*args, **kwargs):
        raise AssertionError("the mismatch must be refused before open_clip is asked")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    with pytest.raises(BackboneError) as info:
        load_clip("ViT-B-16", "openai")
    message = str(info.value)
    assert "'ViT-B-16-quickgelu'" in message and "QuickGELU" in message
    assert len(message.splitlines()) == 1
