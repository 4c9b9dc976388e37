"""The feature cache never serves features of changed data.

File-backed datasets are fingerprinted by every file's path, size and modification time,
in-memory ones by their content: an image replaced in place (same path) gives a new cache key,
and a run reusing ``feature_cache_dir`` after the replacement reports what a run without the
cache reports.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from avalanche_cliphinge.app.run_options import SMOKE
from avalanche_cliphinge.config import CLIPHingeConfig
from avalanche_cliphinge.app.experiment import run_experiment
from avalanche_cliphinge.feature_cache import dataset_fingerprint

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 230), (230, 220, 30)]


def draw(path, colour, seed):
    rng = np.random.RandomState(seed)
    pixels = np.clip(np.asarray(colour) + rng.randint(-25, 25, (32, 32, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """``root/{train,test}/c<k>/<i>.png``: 4 classes of flat colours with noise."""
    root = tmp_path / "images"
    for side, count in (("train", 8), ("test", 4)):
        for c, colour in enumerate(COLOURS):
            folder = root / side / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                draw(folder / f"{i}.png", colour, seed=100 * c + i + (0 if side == "train" else 50))
    return root


def image_stream(root):
    from avalanche_cliphinge.benchmarks import split_image_folder

    return split_image_folder(root, init_class=2, increment=2)  # [0, 1] tensors


def test_replacing_an_image_in_place_changes_the_fingerprint(image_tree):
    named_benchmark = image_stream(image_tree)
    test_exp = named_benchmark.benchmark.test_stream[1].dataset.eval()
    before = dataset_fingerprint(test_exp)
    assert (
        dataset_fingerprint(image_stream(image_tree).benchmark.test_stream[1].dataset.eval())
        == before
    )  # the same files give the same key in a new stream
    target = image_tree / "test" / "c2" / "1.png"  # not the first, middle or last item
    stat = target.stat()
    draw(target, COLOURS[0], seed=7)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert dataset_fingerprint(test_exp) != before
    changed = dataset_fingerprint(test_exp)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched only
    assert dataset_fingerprint(test_exp) != changed


def test_in_memory_data_is_fingerprinted_by_content():
    images = torch.zeros(9, 3, 4, 4)
    dataset = TensorDataset(images, torch.arange(9))
    before = dataset_fingerprint(dataset)
    assert dataset_fingerprint(TensorDataset(images.clone(), torch.arange(9))) == before
    images[3, 0, 0, 0] = 1.0  # in place, in an item the sampled items do not cover
    assert dataset_fingerprint(dataset) != before


def config(**changes):
    return CLIPHingeConfig.from_dict(
        {
            **SMOKE,
            "init_class": 2,
            "increment": 2,
            "total_tasks": 2,
            "init_epochs": 2,
            "epochs": 2,
            "second_stage_epochs": 0,
            **changes,
        }
    )


@pytest.mark.slow
def test_cached_run_after_images_replaced_in_place_equals_an_uncached_run(image_tree, tmp_path):
    cache = tmp_path / "cache"
    quiet = {"interactive": False, "log": lambda message: None}
    torch.manual_seed(0)
    run_experiment(
        config(feature_cache_dir=str(cache)), image_stream(image_tree), tmp_path / "first", **quiet
    )
    cached_files = set(cache.iterdir())
    # Class 3's test images become class 0's colour: same paths, new content.
    for path in (image_tree / "test" / "c3").iterdir():
        shutil.copy(image_tree / "test" / "c0" / path.name, path)
    torch.manual_seed(0)
    with_cache = run_experiment(
        config(feature_cache_dir=str(cache)), image_stream(image_tree), tmp_path / "cached", **quiet
    )
    torch.manual_seed(0)
    without = run_experiment(
        config(cache_features=False), image_stream(image_tree), tmp_path / "uncached", **quiet
    )
    assert with_cache["accuracy_matrix"] == without["accuracy_matrix"]
    # The test side (whose files changed) was encoded again, the training side came from
    # the cache: 2 train + 2 test entries, then 2 new test entries.
    assert len(cached_files) == 4 and len(set(cache.iterdir()) - cached_files) == 2
