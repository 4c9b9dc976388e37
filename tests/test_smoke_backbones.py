"""The built-in synthetic stream feeds any open_clip architecture, not only the 32-px tiny one.

The stream serves plain uint8 images; ``ClipInput`` (what the strategy applies) resizes and
normalises them for the backbone it runs. Checked by hand against PIL for the tiny model and
ViT-B-32's 224-px transform (no weights needed), and end to end by ``cliphinge run --preset
smoke`` on two tiny architectures of other input sizes registered for the test: a 48-px ViT
and a 64-px ModifiedResNet (open_clip's RN family).
"""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from avalanche_cliphinge.app.cli import main as run_main
from avalanche_cliphinge.benchmarks import synthetic
from avalanche_cliphinge.streams import CLIP_MEAN, CLIP_STD, ClipInput

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
#: Tiny architectures of other input sizes than cliphinge-tiny's 32 px (random weights).
ARCHITECTURES = {
    "test-tiny-vit48": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 48,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 8,
        },
        "text_cfg": TEXT,
    },
    "test-tiny-rn64": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": TEXT,
    },
}


@pytest.fixture(scope="module")
def architectures(tmp_path_factory):
    """``ARCHITECTURES`` registered with open_clip for this module, removed afterwards."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in ARCHITECTURES.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    assert set(ARCHITECTURES) <= set(open_clip.list_models())
    yield
    # open_clip has no public way to unregister: undo add_model_config by hand
    open_clip.factory._MODEL_CONFIG_PATHS.remove(folder)
    for name in ARCHITECTURES:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def _items(named_benchmark):
    return [x for exp in named_benchmark.benchmark.train_stream for x, *_ in exp.dataset]


def _by_hand(image: torch.Tensor, size: int) -> torch.Tensor:
    """PIL bicubic resize of a uint8 ``[3, h, w]`` image to ``size``, then CLIP's mean/std."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy((pixels - mean) / std)


@pytest.mark.parametrize("model_name", ["cliphinge-tiny", "ViT-B-32"])
def test_served_images_become_each_backbones_input(model_name):
    """What the 32-px tiny model and 224-px ViT-B-32 read of the smoke stream's images: the
    image resized with PIL's bicubic filter and normalised with CLIP's statistics."""
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    assert size == {"cliphinge-tiny": 32, "ViT-B-32": 224}[model_name]
    to_input = ClipInput(open_clip.image_transform(size, is_train=False), size, CLIP_MEAN, CLIP_STD)
    named_benchmark = synthetic(
        n_classes=4, init_class=2, increment=2, train_per_class=2, test_per_class=1, seed=3
    )
    for image in _items(named_benchmark)[::3]:
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        converted = to_input(image)
        assert converted.shape == (3, size, size)
        assert torch.allclose(converted, _by_hand(image, size), atol=1e-5)


def _smoke(tmp_path, model_name, *sets):
    out = tmp_path / model_name
    argv = ["--preset", "smoke", "--quiet", "--output-dir", str(out)]
    for assignment in (f"model_name={model_name}", *sets):
        argv += ["--set", assignment]
    assert run_main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_smoke_preset_learns_with_a_48px_vit(architectures, tmp_path):
    """The whole smoke run (10 classes, 4 tasks) on a random 48-px ViT: it learns the stream
    (measured AIA 94.71, Last 84.67; chance is 10 to 25 %)."""
    results = _smoke(tmp_path, "test-tiny-vit48")
    assert results["finished"] and results["completed_tasks"] == 4
    assert results["protocol"]["model"] == "test-tiny-vit48"
    assert results["protocol"]["pretrained"] is None
    assert results["metrics"]["AIA"] > 80 and results["metrics"]["Last"] > 60


def test_smoke_preset_runs_a_64px_resnet(architectures, tmp_path):
    """Two tasks on a random 64-px ModifiedResNet (attention pooling, no patch embedding):
    every test image of both tasks is scored."""
    results = _smoke(tmp_path, "test-tiny-rn64", "total_tasks=2", "init_epochs=2", "epochs=2")
    assert results["finished"] and results["completed_tasks"] == 2
    assert results["protocol"]["model"] == "test-tiny-rn64"
    assert results["test_sizes"] == [4 * 15, 2 * 15]
    assert np.asarray(results["confusion_matrix"]).sum() == 6 * 15
