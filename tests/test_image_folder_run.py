"""Your own images: ``cliphinge run --image-folder PATH`` on a folder of class subfolders.

The README's own command runs here on generated JPEGs; the task layout, class order and
resizing follow the folder unless set, and what the request sets that a folder cannot take
is refused in one line naming every change. ``compare --benchmark image_folder`` runs on the
same folder. Every run is in-process (no subprocess import cost).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import PROBE

from avalanche_cliphinge.app import command
from avalanche_cliphinge.app.run_options import SMOKE, smoke_stream
from avalanche_cliphinge.app.datasets import (
    class_order_ids,
    fit_image_folder,
    image_folder_layout,
)
from avalanche_cliphinge.app.figure_data import run_title
from avalanche_cliphinge.benchmarks import split_image_folder
from avalanche_cliphinge.config import CLIPHingeConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: The README section whose ```bash block holds the example's command.
README_HEADING = "## Your own images"
#: Five classes of distinct colours; folder names sort as apple, green_grass, night, sky, sun.
COLOURS = {
    "sky": (40, 90, 220),
    "green_grass": (30, 180, 40),
    "apple": (200, 30, 30),
    "sun": (240, 220, 30),
    "night": (20, 20, 40),
}
FOLDERS = sorted(COLOURS)
PER_CLASS = 6  # floor(0.8 * 6 + 0.5) = 5 train images, 1 test image per class
ONE_EPOCH = ["--set", "init_epochs=1", "--set", "epochs=1", "--set", "second_stage_epochs=1"]


def make_photos(folder: Path, per_class: int = PER_CLASS) -> Path:
    """``folder/<class>/img_<i>.jpg``: noisy flat colours, every image of another size."""
    rng = np.random.RandomState(0)
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            width, height = 40 + 8 * i, 32 + 4 * i
            noise = rng.randint(-25, 25, (height, width, 3))
            pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"img_{i}.jpg")
    return folder


def readme_command() -> list:
    """The one ``cliphinge run`` line of the first ```bash block of the README section
    ``README_HEADING``, split."""
    readme = (ROOT / "README.md").read_text()
    heading = re.search(rf"^{re.escape(README_HEADING)}\s*$", readme, re.M)
    assert heading, f"README.md has no section '{README_HEADING}'"
    block = re.search(r"^```bash\n(.*?)^```", readme[heading.end() :], re.S | re.M)
    assert block and not re.search(r"^#{1,2} ", readme[heading.end() :][: block.start()], re.M), (
        f"README.md's section '{README_HEADING}' has no ```bash block"
    )
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("cliphinge run ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)


def run_cli(argv, capsys):
    """``cliphinge ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    code = command.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- the README's example -----------------------------------------------------------------
def test_readme_image_folder_example_runs(tmp_path, monkeypatch, capsys):
    words = readme_command()
    folder = words[words.index("--image-folder") + 1]
    output = Path(words[words.index("--output-dir") + 1])
    monkeypatch.chdir(tmp_path)
    make_photos(Path(folder))
    code, stdout, stderr = run_cli(words[1:], capsys)
    assert code == 0, stderr
    assert "AIA (avg incremental acc)" in stdout
    results = json.loads((output / "results.json").read_text())
    protocol = results["protocol"]
    assert results["finished"] is True
    # 5 class folders in tasks of the smoke preset's increment (2), the remainder first: 3 + 2
    assert protocol["stream_classes_per_experience"] == [3, 2]
    config = protocol["config"]
    assert (config["init_class"], config["increment"], config["total_tasks"]) == (3, 2, 2)
    assert config["dataset"] == "image_folder" and config["resize_on_device"] is False
    assert config["class_order"] == "natural" and protocol["class_order"] == [0, 1, 2, 3, 4]
    # 6 images per class: 5 train, 1 test
    assert results["test_sizes"] == [3, 2] and protocol["stream_train_sizes"] == [15, 10]
    assert protocol["stream_split"] == "seeded per-class split, train_fraction 0.8, seed 1993"
    # the record names the folder, not the CIFAR-100 preset the defaults came from
    assert protocol["command"] == shlex.join(words)
    assert protocol["config_file"] is None and protocol["reproduces"] is None
    assert protocol["preset"] == "smoke" and protocol["stream_dataset"] == Path(folder).name
    assert run_title(protocol) == f"CLIPHinge, {Path(folder).name} B3 Inc2 (preset smoke)"
    from avalanche_cliphinge.model.cliphinge_model import CLIPHingeModel

    model = CLIPHingeModel.load(output / "final_model.pt")
    # class id = position of the folder in sorted order; underscores read as spaces
    assert [model.names[i] for i in range(5)] == ["apple", "green grass", "night", "sky", "sun"]


@pytest.mark.parametrize(
    "route, output",
    [
        (["--set", "dataset=image_folder", "--data-root", "photos", "--output-dir", "out"], "out"),
        (["--image-folder", "photos"], "runs/photos"),  # the default folder is named after it
    ],
)
def test_same_folder_through_set_and_data_root(route, output, tmp_path, monkeypatch, capsys):
    """``--set dataset=image_folder --data-root PATH`` is ``--image-folder PATH``; a
    ``random:<seed>`` class order and a chosen task count fit any folder."""
    monkeypatch.chdir(tmp_path)
    make_photos(tmp_path / "photos")
    argv = ["run", "--preset", "smoke", *route, "--quiet"]
    argv += ["--set", "class_order=random:7", "--set", "total_tasks=2", *ONE_EPOCH]
    code, _, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    protocol = json.loads((tmp_path / output / "results.json").read_text())["protocol"]
    assert protocol["class_order"] == np.random.RandomState(7).permutation(5).tolist()
    assert protocol["stream_classes_per_experience"] == [3, 2]  # 5 // 2 = 2, the rest first
    assert protocol["config"]["class_order"] == "random:7"
    assert protocol["stream_root"] == "photos"


# ---- what the folder decides --------------------------------------------------------------
@pytest.mark.parametrize(
    "n, increment, given, expected",
    [
        (7, 2, {}, (3, 2, 3)),  # the preset's increment, remainder to the first task
        (100, 10, {}, (10, 10, 10)),  # a CIFAR-100-sized folder keeps B0 Inc10
        (6, 10, {}, (3, 3, 2)),  # increment 10 leaves one task: half the classes
        (2, 10, {}, (1, 1, 2)),
        (7, 3, {"increment": 3}, (4, 3, 2)),
        (7, 2, {"total_tasks": 3}, (3, 2, 3)),
        (7, 2, {"init_class": 1}, (1, 2, 4)),
        (9, 2, {"init_class": 3}, (3, 2, 4)),
        (7, 2, {"init_class": 1, "total_tasks": 4}, (1, 2, 4)),
        (7, 2, {"increment": 2, "total_tasks": 3}, (3, 2, 3)),
        (7, 2, {"init_class": 3, "increment": 4}, (3, 4, 2)),
        (7, 2, {"init_class": 4, "increment": 2}, None),  # 3 classes left, not tasks of 2
        (7, 2, {"init_class": 4, "increment": 2, "total_tasks": 4}, None),
        (5, 2, {"increment": 6}, None),
    ],
)
def test_layout_read_off_the_folder(n, increment, given, expected):
    config = CLIPHingeConfig(init_class=increment, increment=increment, total_tasks=1)
    config = config.replace(**given)
    layout, auto = image_folder_layout(n, config, set(given))
    got = None if layout is None else tuple(layout.values())
    assert got == expected
    for values in (layout, auto):
        if values is not None:
            assert values["init_class"] + values["increment"] * (values["total_tasks"] - 1) == n


def test_a_folder_per_class_splits_each_class_with_the_seed(tmp_path):
    from avalanche_cliphinge.benchmarks.image_folder import _per_class_split

    photos = make_photos(tmp_path / "photos")
    tests = {}
    for seed in (0, 1):
        split = _per_class_split(photos, FOLDERS, seed, 0.8)
        train, test = ([str(p.relative_to(photos)) for p in split[s].paths] for s in split)
        assert not set(train) & set(test) and len(set(train + test)) == 5 * PER_CLASS
        assert len(train) == 5 * 5 and len(test) == 5  # 5 + 1 per class
        assert split["test"].targets == [0, 1, 2, 3, 4]  # the test image of each class
        tests[seed] = test
        again = _per_class_split(photos, FOLDERS, seed, 0.8)["test"].paths
        assert [str(p.relative_to(photos)) for p in again] == test  # same seed, same split
    # each class's files (sorted) permuted by RandomState([seed, crc32(folder name)]); the
    # last one of the permutation tests
    for seed, test in tests.items():
        assert test == [
            f"{name}/img_"
            f"{np.random.RandomState([seed, zlib.crc32(name.encode())]).permutation(6)[5]}.jpg"
            for name in FOLDERS
        ]
    named = split_image_folder(photos, init_class=3, increment=2, seed=1)
    assert named.protocol["test_sizes"] == [3, 2] and named.protocol["seed"] == 1


def test_set_values_a_folder_cannot_take_are_one_error(tmp_path):
    """Everything to change in one line, answered before torch or Avalanche is imported."""
    make_photos(tmp_path / "photos")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "run", "--preset", "smoke", "--image-folder", "photos"]
        + ["--output-dir", "out", "--set", "resize_on_device=true", "--set", "class_order=icarl"]
        + ["--set", "init_class=4", "--set", "total_tasks=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stderr.splitlines() == [
        "error: image folder photos (5 classes, per-class folders): (1) resize_on_device=true "
        "resizes CIFAR's 32-px tensors on the device, but a folder's images come in any size: "
        "--set resize_on_device=false; (2) class_order 'icarl' is a published order of another "
        "dataset; a folder takes natural (sorted folder names: [0=apple, 1=green_grass, "
        "2=night, 3=sky, 4=sun]), random:<seed> or a list of its 5 class ids: --set "
        "class_order=natural; (3) init_class=4, total_tasks=3 cannot split its 5 classes "
        "(init_class + increment * (total_tasks - 1) must be 5): leave the layout out to read "
        "it off the folder (init_class=3, increment=2, total_tasks=2) or set values that add "
        "up to 5",
        "exit 2 imported -",
    ]
    assert not (tmp_path / "out").exists()


def test_a_missing_folder_names_both_layouts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("avalanche_cliphinge.model.backbone.load_clip", _no_model)
    code, _, stderr = run_cli(
        ["run", "--preset", "smoke", "--set", "dataset=image_folder", "--output-dir", "out"],
        capsys,
    )
    assert code == 2
    assert stderr == (
        "error: No class folders in data (no such folder): expected data/<class>/*.jpg (one "
        "subfolder per class) or data/{train,test}/<class>/*.jpg; pass your folder with "
        "--image-folder PATH\n"
    )
    code, _, stderr = run_cli(
        ["run", "--preset", "smoke", "--set", "dataset_root=photos", "--output-dir", "out"], capsys
    )
    assert code == 2 and "--data-root PATH (your own images: --image-folder PATH" in stderr


def test_the_defaults_that_blocked_adapt(tmp_path):
    """A CIFAR-100 preset's resize_on_device, iCaRL order and 10 x 10 layout give way to the
    folder's; a train/ and test/ tree is read as its fixed split."""
    for side in ("train", "test"):
        for name in ("a", "b", "c"):
            (tmp_path / side / name).mkdir(parents=True)
            Image.new("RGB", (9, 7)).save(tmp_path / side / name / "0.png")
    preset = CLIPHingeConfig.from_json("cifar100_b0_inc10").replace(dataset="image_folder")
    fitted = fit_image_folder(preset, tmp_path, given=set())
    # increment 10 leaves one task of 3 classes: tasks of 3 // 2 = 1 class
    assert (fitted.init_class, fitted.increment, fitted.total_tasks) == (1, 1, 3)
    assert fitted.class_order == "natural" and fitted.resize_on_device is False
    named = split_image_folder(tmp_path, init_class=1, increment=1)
    assert named.protocol["split"] == "fixed train/ and test/ folders"
    assert named.protocol["seed"] is None


def test_random_class_order_fits_every_stream():
    assert class_order_ids("random:3", 10) == np.random.RandomState(3).permutation(10).tolist()
    assert class_order_ids("natural", 10) is None and class_order_ids([1, 0], 2) == [1, 0]
    config = CLIPHingeConfig(**{**SMOKE, "class_order": "random:5"})
    assert smoke_stream(config).class_order == np.random.RandomState(5).permutation(10).tolist()
    for bad in ("random:", "random:-1", "random:x", f"random:{2**32}"):
        with pytest.raises(ConfigError, match="'random:<seed>'"):
            CLIPHingeConfig(class_order=bad)


# ---- compare --------------------------------------------------------------------------------
def test_compare_on_an_image_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_photos(tmp_path / "photos")
    code, stdout, stderr = run_cli(
        ["compare", "--benchmark", "image_folder", "--data-root", "photos"]
        + ["--set", "model_name=cliphinge-tiny", "--set", "pretrained=null", *ONE_EPOCH]
        + ["--strategies", "zeroshot", "naive", "cliphinge", "--ablations", "none"]
        + ["--output-dir", "cmp", "--quiet"],
        capsys,
    )
    assert code == 0, stderr
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    stream = report["protocol"]["stream"]
    # the CIFAR-100 preset's increment (10) leaves one task: tasks of 5 // 2 = 2, 3 + 2
    assert stream["classes_per_experience"] == [3, 2] and stream["dataset"] == "photos"
    assert report["protocol"]["command"].startswith("cliphinge compare --benchmark image_folder")
    assert all(name in stdout for name in ("zeroshot", "naive", "cliphinge"))


def _no_model(*args, **kwargs):
    raise AssertionError("the request was refused after loading CLIP")
