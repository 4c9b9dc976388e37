"""Bad inputs: each gives exit code 2 and a one-line ``error:`` message saying what to do,
and leaves what an earlier run wrote untouched.

Most commands point ``--output-dir`` at a finished run with ``--overwrite``, the most
dangerous case: every check has to come before anything is deleted.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from avalanche_cliphinge.cli import SMOKE
from avalanche_cliphinge.config import CLIPHingeConfig, ConfigError
from avalanche_cliphinge.experiment import RunError, run_experiment
from avalanche_cliphinge.strategy import CLIPHingeStrategy

from cli_helpers import ROOT, SCRIPTS, run_script, snapshot
TINY = ["--set", "model_name=cliphinge-tiny", "--set", "pretrained=null"]
#: A cheap smoke run: 2 tasks (4 + 2 classes), 1 epoch each.
FAST = ["--preset", "smoke", "--quiet", "--set", "total_tasks=2", "--set", "init_epochs=1",
        "--set", "epochs=1", "--set", "second_stage_epochs=1"]
TINY_IMAGENET_R = [*TINY, "--set", "init_class=2", "--set", "increment=2",
                   "--set", "total_tasks=2", "--set", "epochs=1", "--set", "init_epochs=1",
                   "--set", "second_stage_epochs=1", "--set", "class_order=natural", "--quiet"]


def the_error(code, stderr) -> str:
    """The one ``error:`` line of a refused command."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A finished cheap run whose files no refused command may touch."""
    folder = tmp_path_factory.mktemp("previous") / "run"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(ROOT)
    argv = [str(SCRIPTS / "run_split_cifar.py"), *FAST, "--output-dir", str(folder)]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as stop:
        runpy.run_path(argv[0], run_name="__main__")
    monkeypatch.undo()
    assert stop.value.code == 0
    assert json.loads((folder / "results.json").read_text())["finished"] is True
    return folder, snapshot(folder)


@pytest.fixture
def untouched(previous_run):
    """The previous run's folder; checks after the test that no file changed."""
    folder, before = previous_run
    yield folder
    assert snapshot(folder) == before


@pytest.fixture(scope="module")
def imagenet_r_root(tmp_path_factory):
    """``<root>/imagenet-r/<wnid>/art_<i>.jpg``: the first 4 ImageNet-R wnids, 5 images each."""
    from benchmarks import IMAGENET_R_WNIDS

    root = tmp_path_factory.mktemp("imr")
    rng = np.random.RandomState(0)
    for c, wnid in enumerate(IMAGENET_R_WNIDS[:4]):
        folder = root / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(40 + 50 * c + rng.randint(0, 30, (40, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"art_{i}.jpg")
    return root


def tiny_config(**changes) -> CLIPHingeConfig:
    return CLIPHingeConfig.from_dict({**SMOKE, "total_tasks": 2, "init_epochs": 1, "epochs": 1,
                                      "second_stage_epochs": 1, **changes})


def tensor_bundle(train_counts, test_per_class=3, init_class=2, increment=2):
    """A tiny image stream with ``train_counts[c]`` training images of class c."""
    from benchmarks import StreamBundle
    from benchmarks.common import make_nc_benchmark

    generator = torch.Generator().manual_seed(0)
    n = len(train_counts)

    def images(counts):
        x = torch.cat([torch.full((k, 3, 32, 32), c / n) + 0.2 * torch.randn(
            k, 3, 32, 32, generator=generator) for c, k in enumerate(counts)])
        y = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in enumerate(counts)])
        return TensorDataset(x, y)

    order = list(range(n))
    benchmark = make_nc_benchmark(images(train_counts), images([test_per_class] * n), order,
                                  init_class, increment, None, None)
    return StreamBundle(benchmark, [f"shape {c}" for c in order], order, {"name": "tensors"})


# ---- config ----------------------------------------------------------------------------------
def test_config_key_typo_suggests_the_key(untouched, capsys, monkeypatch):
    code, _, stderr = run_script("run_split_cifar.py", [
        *FAST, "--output-dir", untouched, "--overwrite", "--set", "text_hinge_margn=0.2"],
        capsys, monkeypatch)
    assert the_error(code, stderr) == ("error: --set: unknown config key 'text_hinge_margn'; "
                                       "did you mean 'text_hinge_margin'?")


def test_config_file_typo_names_the_file(untouched, tmp_path, capsys, monkeypatch):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"epoch": 5}))
    code, _, stderr = run_script("run_split_cifar.py", [
        "--config", config, "--output-dir", untouched, "--overwrite"], capsys, monkeypatch)
    assert the_error(code, stderr) == (f"error: {config}: unknown config key 'epoch'; did you "
                                       "mean 'epochs'?")
    config.write_text('{"epochs": 5,}')
    code, _, stderr = run_script("run_split_cifar.py", [
        "--config", config, "--output-dir", untouched, "--overwrite"], capsys, monkeypatch)
    assert the_error(code, stderr).startswith(f"error: {config} is not valid JSON (line 1")


@pytest.mark.parametrize("assignment, message", [
    ("epochs=five", "error: --set: config key 'epochs' expects int, got 'five' (str)"),
    ("epochs=2.5", "error: --set: config key 'epochs' expects int, got 2.5 (float)"),
    ("use_image_adapter=1", "error: --set: config key 'use_image_adapter' expects bool, got 1 "
                            "(int)"),
    ("batch_size=0", "error: config key 'batch_size' must be >= 1, got 0"),
    ("lr=-1", "error: config key 'lr' must be > 0 and finite, got -1.0"),
    ("epochs", "error: --set expects key=value, got 'epochs'"),
])
def test_wrong_types_and_ranges_name_the_key(assignment, message, untouched, capsys,
                                             monkeypatch):
    code, _, stderr = run_script("run_split_cifar.py", [
        *FAST, "--output-dir", untouched, "--overwrite", "--set", assignment],
        capsys, monkeypatch)
    assert the_error(code, stderr) == message


def test_debug_shows_the_traceback(untouched, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="text_hinge_margin"):
        run_script("run_split_cifar.py", [*FAST, "--output-dir", untouched, "--debug",
                                          "--set", "text_hinge_margn=0.2"], capsys, monkeypatch)


# ---- class counts ----------------------------------------------------------------------------
def test_class_counts_that_do_not_divide_are_refused(untouched, imagenet_r_root, capsys,
                                                     monkeypatch):
    code, _, stderr = run_script("run_imagenet_r.py", [
        "--data-root", imagenet_r_root, "--output-dir", untouched, "--overwrite",
        *TINY_IMAGENET_R, "--set", "increment=3"], capsys, monkeypatch)
    error = the_error(code, stderr.replace(_partial_tree_warning(stderr), ""))
    assert "init_class + increment * (tasks - 1) must equal the 4 classes" in error
    assert "increment must divide 2" in error


def test_total_tasks_that_do_not_match_the_stream_are_refused(untouched, imagenet_r_root,
                                                              capsys, monkeypatch):
    code, _, stderr = run_script("run_imagenet_r.py", [
        "--data-root", imagenet_r_root, "--output-dir", untouched, "--overwrite",
        *TINY_IMAGENET_R, "--set", "total_tasks=3"], capsys, monkeypatch)
    assert the_error(code, stderr.replace(_partial_tree_warning(stderr), "")) == (
        "error: init_class + increment * (total_tasks - 1) = 2 + 2 * 2 = 6, but the stream has "
        "4 classes; change init_class, increment or total_tasks to add up")


def _partial_tree_warning(stderr: str) -> str:
    """The (expected) warning that the test tree has 4 of the 200 ImageNet-R classes."""
    return "".join(line + "\n" for line in stderr.splitlines()
                   if line.startswith("warning: ImageNet-R at"))


def test_class_names_of_the_wrong_length_are_refused():
    config = tiny_config()  # 4 + 2 classes
    with pytest.raises(ConfigError, match=r"= 6, but class_names has 5 classes; change "
                                          r"init_class, increment or total_tasks"):
        CLIPHingeStrategy(config=config, class_names=[f"c{i}" for i in range(5)])


def test_stream_with_other_class_names_is_refused_before_writing(untouched):
    bundle = tensor_bundle([4] * 6)
    bundle.class_names = bundle.class_names[:5]
    with pytest.raises(ConfigError, match="but the stream has 5 classes"):
        run_experiment(tiny_config(), bundle, untouched, overwrite=True, interactive=False,
                       log=lambda message: None)


def test_empty_experience_is_refused_before_writing(untouched):
    bundle = tensor_bundle([4] * 6, init_class=4)
    benchmark = bundle.benchmark
    empty = SimpleNamespace(dataset=[], current_experience=1)
    fake = SimpleNamespace(train_stream=[benchmark.train_stream[0], empty],
                           test_stream=list(benchmark.test_stream))
    bundle = SimpleNamespace(benchmark=fake, class_names=bundle.class_names,
                             class_order=bundle.class_order, protocol={})
    with pytest.raises(RunError, match=r"training experience 1 of the stream is empty; every "
                                       r"experience needs training and test samples"):
        run_experiment(tiny_config(), bundle, untouched, overwrite=True, interactive=False,
                       log=lambda message: None)


def test_class_with_a_single_training_sample_completes_with_a_warning(tmp_path):
    bundle = tensor_bundle([6, 6, 6, 6, 6, 1], init_class=4)
    with pytest.warns(UserWarning, match=r"class 5 has 1 training sample"):
        results = run_experiment(tiny_config(), bundle, tmp_path / "run", interactive=False,
                                 log=lambda message: None)
    assert results["finished"] is True
    assert all(np.isfinite(results["accuracy_matrix"]).ravel())


# ---- data ------------------------------------------------------------------------------------
def test_missing_cifar_root_names_the_layout_and_how_to_get_it(untouched, tmp_path, capsys,
                                                                monkeypatch):
    root = tmp_path / "nowhere"
    code, _, stderr = run_script("run_split_cifar.py", [
        "--data-root", root, "--output-dir", untouched, "--overwrite", "--quiet"],
        capsys, monkeypatch)
    error = the_error(code, stderr)
    assert f"expected {root / 'cifar-100-python'}/{{train,test,meta}}" in error
    assert "--download" in error and "cifar-100-python.tar.gz" in error
    assert not root.exists()


def test_partly_laid_out_cifar_root_lists_the_missing_files(untouched, tmp_path, capsys,
                                                             monkeypatch):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"x")
    code, _, stderr = run_script("run_split_cifar.py", [
        "--data-root", tmp_path, "--output-dir", untouched, "--overwrite", "--quiet"],
        capsys, monkeypatch)
    assert "(missing test, meta)" in the_error(code, stderr)


def test_cifar_files_that_fail_the_checksum_are_named(untouched, tmp_path, capsys,
                                                      monkeypatch):
    for name in ("train", "test", "meta"):
        (tmp_path / "cifar-100-python").mkdir(exist_ok=True)
        (tmp_path / "cifar-100-python" / name).write_bytes(b"not the real file")
    code, _, stderr = run_script("run_split_cifar.py", [
        "--data-root", tmp_path, "--output-dir", untouched, "--overwrite", "--quiet", *TINY],
        capsys, monkeypatch)
    assert "fail torchvision's md5 check" in the_error(code, stderr)


def test_missing_imagenet_r_names_the_layout(untouched, tmp_path, capsys, monkeypatch):
    (tmp_path / "imagenet-r").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet-r" / "loose.jpg")  # no wnid folders
    code, _, stderr = run_script("run_imagenet_r.py", [
        "--data-root", tmp_path, "--output-dir", untouched, "--overwrite", "--quiet"],
        capsys, monkeypatch)
    error = the_error(code, stderr)
    assert f"expected {tmp_path}/imagenet-r/<wnid>/*.jpg" in error
    assert "imagenet-r.tar" in error


@pytest.mark.parametrize("line, message", [
    ("imagenet-r/{wnid}/art_0.jpg", "train.txt, line 2: expected `relative/path label`"),
    ("imagenet-r/{wnid}/art_0.jpg zero", "train.txt, line 2: label 'zero' is not an integer"),
    ("imagenet-r/{wnid}/art_0.jpg 9", "train.txt, line 2: label 9 outside 0..3"),
    ("imagenet-r/{wnid}/missing.jpg 0", "train.txt, line 2: "),
])
def test_split_list_with_a_bad_line_names_file_and_line(line, message, untouched,
                                                         imagenet_r_root, tmp_path, capsys,
                                                         monkeypatch):
    from benchmarks import IMAGENET_R_WNIDS

    wnid = IMAGENET_R_WNIDS[0]
    (tmp_path / "train.txt").write_text(f"imagenet-r/{wnid}/art_1.jpg 0\n"
                                        + line.format(wnid=wnid) + "\n")
    (tmp_path / "test.txt").write_text(f"imagenet-r/{wnid}/art_2.jpg 0\n")
    code, _, stderr = run_script("run_imagenet_r.py", [
        "--data-root", imagenet_r_root, "--split-list", tmp_path, "--output-dir", untouched,
        "--overwrite", *TINY_IMAGENET_R], capsys, monkeypatch)
    error = the_error(code, stderr.replace(_partial_tree_warning(stderr), ""))
    assert f"error: {tmp_path / 'train.txt'}" in error and message in error


def test_split_list_folder_without_its_files(untouched, imagenet_r_root, tmp_path, capsys,
                                             monkeypatch):
    code, _, stderr = run_script("run_imagenet_r.py", [
        "--data-root", imagenet_r_root, "--split-list", tmp_path, "--output-dir", untouched,
        "--overwrite", *TINY_IMAGENET_R], capsys, monkeypatch)
    assert f"--split-list {tmp_path} lacks {tmp_path / 'train.txt'}" in the_error(code, stderr)


# ---- pretrained weights ------------------------------------------------------------------------
def test_missing_pretrained_file_is_named(untouched, tmp_path, capsys, monkeypatch):
    weights = tmp_path / "ViT-B-16.pt"
    code, _, stderr = run_script("run_split_cifar.py", [
        *FAST, "--output-dir", untouched, "--overwrite", "--pretrained", weights],
        capsys, monkeypatch)
    assert the_error(code, stderr) == (f"error: pretrained checkpoint file '{weights}' does not "
                                       "exist; pass an existing file or an open_clip tag such "
                                       "as 'openai'")


def test_unknown_pretrained_tag_is_refused(untouched, capsys, monkeypatch):
    code, _, stderr = run_script("run_split_cifar.py", [
        *FAST, "--output-dir", untouched, "--overwrite", "--pretrained", "openia"],
        capsys, monkeypatch)
    assert "'openia' is neither a file nor a pretrained tag" in the_error(code, stderr)


def test_pretrained_file_that_is_not_a_checkpoint_is_refused(untouched, tmp_path, capsys,
                                                             monkeypatch):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"this is not a torch checkpoint")
    code, _, stderr = run_script("run_split_cifar.py", [
        *FAST, "--output-dir", untouched, "--overwrite", "--pretrained", weights],
        capsys, monkeypatch)
    assert str(weights) in the_error(code, stderr)


# ---- output folder ------------------------------------------------------------------------------
def test_output_dir_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.txt").write_text("keep me too")
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode: use a path below a file
            target, reason = blocker / "sub", "Not a directory"
        else:
            target, reason = locked / "run", "Permission denied"
        code, _, stderr = run_script("run_split_cifar.py", [*FAST, "--output-dir", target],
                                     capsys, monkeypatch)
        assert the_error(code, stderr) == (f"error: cannot write to --output-dir {target} "
                                           f"({reason}); choose a writable folder")
    finally:
        locked.chmod(0o700)
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in locked.iterdir()) == ["old.txt"]


def test_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    code, _, stderr = run_script("run_split_cifar.py", [*FAST, "--output-dir", blocker,
                                                        "--overwrite"], capsys, monkeypatch)
    assert the_error(code, stderr) == (f"error: --output-dir {blocker} is a file, not a "
                                       "folder; choose another --output-dir")
    assert blocker.read_text() == "keep me"
