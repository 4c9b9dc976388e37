"""load_clip: the tiny offline model, local checkpoint files, and fast offline failures."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from avalanche_cliphinge import TINY_MODEL, BackboneError, load_clip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, None)


def test_tiny_model_is_frozen_with_32px_eval_transform_and_tokenizer(tiny):
    assert TINY_MODEL == "cliphinge-tiny"
    params = list(tiny.model.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert not tiny.model.training
    assert tiny.image_size == 32 and tiny.embed_dim == 64
    assert tiny.pretrained is None and tiny.weights_sha256 is None
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 60, 3), np.uint8))
    pixels = tiny.eval_transform(image)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    tokens = tiny.tokenizer(["a photo of a red", "blue stripes"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert not torch.equal(tokens[0], tokens[1])
    with torch.no_grad():
        assert tiny.model.encode_image(pixels[None]).shape == (1, 64)
        assert tiny.model.encode_text(tokens).shape == (2, 64)


def test_none_strings_mean_random_weights():
    for tag in ("none", "None", ""):
        assert load_clip(TINY_MODEL, tag).pretrained is None


def test_local_checkpoint_file_is_loaded_with_its_hash(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    saved = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    torch.save(tiny.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init underneath: the file must win
    loaded = load_clip(TINY_MODEL, str(path))
    state = loaded.model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert loaded.pretrained == str(path)
    assert all(not p.requires_grad for p in loaded.model.parameters())
    torch.manual_seed(123)
    random = load_clip(TINY_MODEL, None).model.state_dict()
    assert any(not torch.equal(random[k], v) for k, v in saved.items())  # the check has teeth


def test_local_checkpoint_with_another_extension_is_still_a_file(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(tiny.model.state_dict(), tmp_path / "tiny_weights.ckpt")
    loaded = load_clip(TINY_MODEL, "tiny_weights.ckpt")  # relative, no separator, .ckpt
    assert loaded.weights_sha256 is not None
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tiny.model.state_dict().items())


def test_missing_checkpoint_file_names_the_file(tmp_path):
    missing = tmp_path / "no_such_weights.pt"
    with pytest.raises(BackboneError, match="no_such_weights.pt"):
        load_clip(TINY_MODEL, str(missing))


def test_checkpoint_of_another_architecture_raises_backbone_error(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"not_a_clip_weight": torch.zeros(3)}, path)
    with pytest.raises(BackboneError, match="wrong.pt"):
        load_clip(TINY_MODEL, str(path))


def test_corrupt_checkpoint_file_raises_backbone_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(BackboneError, match="corrupt.pt"):
        load_clip(TINY_MODEL, str(path))


def test_unknown_pretrained_tag_raises():
    with pytest.raises(BackboneError, match="'laion_typo'.*neither a file nor a pretrained tag"):
        load_clip("ViT-B-16", "laion_typo")
    with pytest.raises(BackboneError, match="neither a file"):
        load_clip(TINY_MODEL, "openai")  # the tiny model has no published weights


def test_unknown_model_name_raises():
    with pytest.raises(BackboneError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", None)


def test_openai_tag_offline_fails_fast_with_the_pretrained_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (already done by open_clip), so
    # the constant is patched too; test_hf_hub_offline_set_at_runtime_is_honoured covers the
    # environment variable alone.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(BackboneError) as info:
        load_clip("ViT-B-16-quickgelu", "openai")
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "--pretrained" in message and "ViT-B-16-quickgelu" in message and "openai" in message


@pytest.mark.slow
def test_hf_hub_offline_set_at_runtime_is_honoured():
    """A user (or a test's monkeypatch.setenv) setting HF_HUB_OFFLINE=1 after import must not
    wait ~50 s on download retries. Runs in a subprocess so a hang cannot stall the suite."""
    script = textwrap.dedent("""
        import os, time
        from avalanche_cliphinge import BackboneError, load_clip
        os.environ["HF_HUB_OFFLINE"] = "1"
        start = time.monotonic()
        try:
            load_clip("ViT-B-16-quickgelu", "openai")
            print("LOADED")
        except BackboneError as err:
            print("ELAPSED", time.monotonic() - start)
            print("MESSAGE", err)
    """)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            "load_clip('ViT-B-16', 'openai') with HF_HUB_OFFLINE=1 set after import "
            "was still retrying downloads 45 s after the start (import included)"
        )
    lines = dict(
        line.split(" ", 1)
        for line in done.stdout.splitlines()
        if line.startswith(("ELAPSED", "MESSAGE"))
    )
    assert "ELAPSED" in lines, done.stdout + done.stderr[-2000:]
    assert float(lines["ELAPSED"]) < 20, (
        f"BackboneError came after {float(lines['ELAPSED']):.0f} s: HF_HUB_OFFLINE set at "
        "runtime is ignored (huggingface_hub read it at import)"
    )
    assert "--pretrained" in lines["MESSAGE"]
