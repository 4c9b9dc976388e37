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

from avalanche_cliphinge.app.run_options import SMOKE
from avalanche_cliphinge.config import CLIPHingeConfig, ConfigError
from avalanche_cliphinge.app.experiment import RunError, run_experiment
from avalanche_cliphinge.strategy import CLIPHingeStrategy

from cli_helpers import FAST, ROOT, SCRIPTS, run_script, snapshot
from cli_helpers import TINY_IMAGENET_R as SHARED_TINY_IMAGENET_R

TINY = ["--set", "model_name=cliphinge-tiny", "--set", "pretrained=null"]
TINY_IMAGENET_R = [*SHARED_TINY_IMAGENET_R, "--quiet"]


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
    from avalanche_cliphinge.benchmarks import IMAGENET_R_WNIDS

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
    return CLIPHingeConfig.from_dict(
        {
            **SMOKE,
            "total_tasks": 2,
            "init_epochs": 1,
            "epochs": 1,
            "second_stage_epochs": 1,
            **changes,
        }
    )


def tensor_benchmark(
    train_counts, test_per_class=3, init_class=2, increment=2, flat_test_class=None
):
    """A tiny image stream with ``train_counts[c]`` training images of class c
    (``flat_test_class``: that class's test images are flat grey)."""
    from avalanche_cliphinge.benchmarks import NamedBenchmark
    from avalanche_cliphinge.benchmarks.common import make_nc_benchmark

    generator = torch.Generator().manual_seed(0)
    n = len(train_counts)

    def images(counts):
        x = torch.cat(
            [
                torch.full((k, 3, 32, 32), c / n)
                + 0.2 * torch.randn(k, 3, 32, 32, generator=generator)
                for c, k in enumerate(counts)
            ]
        )
        y = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in enumerate(counts)])
        return TensorDataset(x, y)

    order = list(range(n))
    test = images([test_per_class] * n)
    if flat_test_class is not None:
        test.tensors[0][test.tensors[1] == flat_test_class] = 0.5
    benchmark = make_nc_benchmark(
        images(train_counts), test, order, init_class, increment, None, None
    )
    return NamedBenchmark(benchmark, [f"shape {c}" for c in order], order, {"name": "tensors"})


# ---- config ----------------------------------------------------------------------------------
def test_config_key_typo_suggests_the_key(untouched, capsys, monkeypatch):
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", "--set", "text_hinge_margn=0.2"],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == (
        "error: --set: unknown config key 'text_hinge_margn'; did you mean 'text_hinge_margin'?"
    )


def test_config_file_typo_names_the_file(untouched, tmp_path, capsys, monkeypatch):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"epoch": 5}))
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--config", config, "--output-dir", untouched, "--overwrite"],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == (
        f"error: {config}: unknown config key 'epoch'; did you mean 'epochs'?"
    )
    config.write_text('{"epochs": 5,}')
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--config", config, "--output-dir", untouched, "--overwrite"],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr).startswith(f"error: {config} is not valid JSON (line 1")


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("epochs=five", "error: --set: config key 'epochs' expects int, got 'five' (str)"),
        ("epochs=2.5", "error: --set: config key 'epochs' expects int, got 2.5 (float)"),
        (
            "use_image_adapter=1",
            "error: --set: config key 'use_image_adapter' expects bool, got 1 (int)",
        ),
        ("batch_size=0", "error: config key 'batch_size' must be >= 1, got 0"),
        ("lr=-1", "error: config key 'lr' must be > 0 and finite, got -1.0"),
        ("epochs", "error: --set expects key=value, got 'epochs'"),
        # upper bounds the run can honour
        (
            "lr=1e300",
            "error: config key 'lr' must be finite and within float32's range "
            "(|x| <= 3.403e+38), got 1e+300",
        ),
        (
            "weight_decay=1e300",
            "error: config key 'weight_decay' must be finite and within "
            "float32's range (|x| <= 3.403e+38), got 1e+300",
        ),
        (
            "second_stage_lr=1e300",
            "error: config key 'second_stage_lr' must be finite and within "
            "float32's range (|x| <= 3.403e+38), got 1e+300",
        ),
        (
            "second_stage_weight_decay=Infinity",
            "error: config key 'second_stage_weight_decay' must "
            "be finite and within float32's range (|x| <= "
            "3.403e+38), got inf",
        ),
        (
            "second_stage_logit_scale=Infinity",
            "error: config key 'second_stage_logit_scale' must be > 0 and finite, got inf",
        ),
        (
            "second_stage_fusion_weight=Infinity",
            "error: config key 'second_stage_fusion_weight' "
            "must be finite and within float32's range (|x| "
            "<= 3.403e+38), got inf",
        ),
        (
            "feature_cache_max_gb=1e300",
            "error: config key 'feature_cache_max_gb' must be finite "
            "and within float32's range (|x| <= 3.403e+38), got 1e+300",
        ),
        ("n_ctx=100", "error: config key 'n_ctx' must be at most 73, got 100"),
        (
            "n_ctx=73",
            "error: class name 'red horizontal stripes' makes the prompt 79 tokens long, "
            "beyond the text encoder's 77 (n_ctx=73); lower n_ctx or shorten the name or "
            "the template",
        ),
        (
            "samples_per_old_class=1000000000000",
            "error: config key 'samples_per_old_class' must be "
            "at most 349525 (replayed 1024-d float32 features "
            "of 6 classes within 8 GiB), got 1000000000000",
        ),
        (
            "hinge_samples_per_pair=1000000000000",
            "error: config key 'hinge_samples_per_pair' must "
            "be at most 233016 (hinge samples of 9 pairs, "
            "1024-d float32, within 8 GiB), got 1000000000000",
        ),
        (
            "hinge_samples_per_pair=0",
            "error: config key 'hinge_samples_per_pair' must be >= 1, got 0",
        ),
        (
            "seed=18446744073709551616",
            "error: config key 'seed' must be in 0..2**32 - 1 (numpy's "
            "legacy seeds), got 18446744073709551616",
        ),
        (
            "prompt_template=a {} of {}",
            "error: config key 'prompt_template' must be a template "
            "with exactly one '{}' for the class name and no other "
            "field, got 'a {} of {}'",
        ),
        (
            "prompt_template=a photo of {name}",
            "error: config key 'prompt_template' must be a "
            "template with exactly one '{}' for the class name "
            "and no other field, got 'a photo of {name}'",
        ),
        ("epochs=1000000", "error: config key 'epochs' must be at most 10000, got 1000000"),
        ("num_workers=100000", "error: config key 'num_workers' must be at most 512, got 100000"),
        ("EPOCHS=3", "error: --set: unknown config key 'EPOCHS'; did you mean 'epochs'?"),
        (
            "class_order=icarl",
            "error: class_order 'icarl' is a CIFAR-100 order; the smoke stream "
            "has 6 classes: use 'natural' or a list of its class ids",
        ),
    ],
)
def test_wrong_types_and_ranges_name_the_key(assignment, message, untouched, capsys, monkeypatch):
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", "--set", assignment],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == message


def test_debug_shows_the_traceback(untouched, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="text_hinge_margin"):
        run_script(
            "run_split_cifar.py",
            [*FAST, "--output-dir", untouched, "--debug", "--set", "text_hinge_margn=0.2"],
            capsys,
            monkeypatch,
        )


# ---- class counts ----------------------------------------------------------------------------
def test_class_counts_that_do_not_divide_are_refused(
    untouched, imagenet_r_root, capsys, monkeypatch
):
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        [
            "--data-root",
            imagenet_r_root,
            "--output-dir",
            untouched,
            "--overwrite",
            *TINY_IMAGENET_R,
            "--set",
            "increment=3",
        ],
        capsys,
        monkeypatch,
    )
    error = the_error(code, stderr.replace(_partial_tree_warning(stderr), ""))
    assert "init_class + increment * (tasks - 1) must equal the 4 classes" in error
    assert "increment must divide 2" in error


def test_total_tasks_that_do_not_match_the_stream_are_refused(
    untouched, imagenet_r_root, capsys, monkeypatch
):
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        [
            "--data-root",
            imagenet_r_root,
            "--output-dir",
            untouched,
            "--overwrite",
            *TINY_IMAGENET_R,
            "--set",
            "total_tasks=3",
        ],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr.replace(_partial_tree_warning(stderr), "")) == (
        "error: init_class + increment * (total_tasks - 1) = 2 + 2 * 2 = 6, but the stream has "
        "4 classes; change init_class, increment or total_tasks to add up"
    )


def _partial_tree_warning(stderr: str) -> str:
    """The (expected) warning that the test tree has 4 of the 200 ImageNet-R classes."""
    return "".join(
        line + "\n" for line in stderr.splitlines() if line.startswith("warning: ImageNet-R at")
    )


def test_class_names_of_the_wrong_length_are_refused():
    config = tiny_config()  # 4 + 2 classes
    with pytest.raises(
        ConfigError,
        match=r"class_names has 5 names but init_class \+ increment \* \(total_tasks - 1\) "
        r"= 6 classes; pass a name for every class id",
    ):
        CLIPHingeStrategy(config=config, class_names=[f"c{i}" for i in range(5)])


def test_stream_with_other_class_names_is_refused_before_writing(untouched):
    named_benchmark = tensor_benchmark([4] * 6)
    named_benchmark.class_names = named_benchmark.class_names[:5]
    with pytest.raises(ConfigError, match="but the stream has 5 classes"):
        run_experiment(
            tiny_config(),
            named_benchmark,
            untouched,
            overwrite=True,
            interactive=False,
            log=lambda message: None,
        )


def test_empty_experience_is_refused_before_writing(untouched):
    named_benchmark = tensor_benchmark([4] * 6, init_class=4)
    benchmark = named_benchmark.benchmark
    empty = SimpleNamespace(dataset=[], current_experience=1)
    fake = SimpleNamespace(
        train_stream=[benchmark.train_stream[0], empty], test_stream=list(benchmark.test_stream)
    )
    named_benchmark = SimpleNamespace(
        benchmark=fake,
        class_names=named_benchmark.class_names,
        class_order=named_benchmark.class_order,
        protocol={},
    )
    with pytest.raises(
        RunError,
        match=r"training experience 1 of the stream is empty; every "
        r"experience needs training and test samples",
    ):
        run_experiment(
            tiny_config(),
            named_benchmark,
            untouched,
            overwrite=True,
            interactive=False,
            log=lambda message: None,
        )


@pytest.mark.slow
def test_class_with_a_single_training_sample_completes_with_a_warning(tmp_path):
    named_benchmark = tensor_benchmark([6, 6, 6, 6, 6, 1], init_class=4)
    with pytest.warns(UserWarning, match=r"class 5 has 1 training sample"):
        results = run_experiment(
            tiny_config(),
            named_benchmark,
            tmp_path / "run",
            interactive=False,
            log=lambda message: None,
        )
    assert results["finished"] is True
    trained = [a for t, row in enumerate(results["accuracy_matrix"]) for a in row[: t + 1]]
    assert np.isfinite(trained).all()


# ---- data ------------------------------------------------------------------------------------
def test_missing_cifar_root_names_the_layout_and_how_to_get_it(
    untouched, tmp_path, capsys, monkeypatch
):
    root = tmp_path / "nowhere"
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--data-root", root, "--output-dir", untouched, "--overwrite", "--quiet"],
        capsys,
        monkeypatch,
    )
    error = the_error(code, stderr)
    assert f"expected {root / 'cifar-100-python'}/{{train,test,meta}}" in error
    assert "--download" in error and "cifar-100-python.tar.gz" in error
    assert not root.exists()


def test_partly_laid_out_cifar_root_lists_the_missing_files(
    untouched, tmp_path, capsys, monkeypatch
):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"x")
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--data-root", tmp_path, "--output-dir", untouched, "--overwrite", "--quiet"],
        capsys,
        monkeypatch,
    )
    assert "(missing test, meta)" in the_error(code, stderr)


def test_cifar_files_that_fail_the_checksum_are_named(untouched, tmp_path, capsys, monkeypatch):
    for name in ("train", "test", "meta"):
        (tmp_path / "cifar-100-python").mkdir(exist_ok=True)
        (tmp_path / "cifar-100-python" / name).write_bytes(b"not the real file")
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--data-root", tmp_path, "--output-dir", untouched, "--overwrite", "--quiet", *TINY],
        capsys,
        monkeypatch,
    )
    assert "fail torchvision's md5 check" in the_error(code, stderr)


def test_missing_imagenet_r_names_the_layout(untouched, tmp_path, capsys, monkeypatch):
    (tmp_path / "imagenet-r").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet-r" / "loose.jpg")  # no wnid folders
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        ["--data-root", tmp_path, "--output-dir", untouched, "--overwrite", "--quiet"],
        capsys,
        monkeypatch,
    )
    error = the_error(code, stderr)
    assert f"expected {tmp_path}/imagenet-r/<wnid>/*.jpg" in error
    assert "imagenet-r.tar" in error


@pytest.mark.parametrize(
    "line, message",
    [
        ("imagenet-r/{wnid}/art_0.jpg", "train.txt, line 2: expected `relative/path label`"),
        ("imagenet-r/{wnid}/art_0.jpg zero", "train.txt, line 2: label 'zero' is not an integer"),
        ("imagenet-r/{wnid}/art_0.jpg 9", "train.txt, line 2: label 9 outside 0..3"),
        ("imagenet-r/{wnid}/missing.jpg 0", "train.txt, line 2: "),
    ],
)
def test_split_list_with_a_bad_line_names_file_and_line(
    line, message, untouched, imagenet_r_root, tmp_path, capsys, monkeypatch
):
    from avalanche_cliphinge.benchmarks import IMAGENET_R_WNIDS

    wnid = IMAGENET_R_WNIDS[0]
    (tmp_path / "train.txt").write_text(
        f"imagenet-r/{wnid}/art_1.jpg 0\n" + line.format(wnid=wnid) + "\n"
    )
    (tmp_path / "test.txt").write_text(f"imagenet-r/{wnid}/art_2.jpg 0\n")
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        [
            "--data-root",
            imagenet_r_root,
            "--split-list",
            tmp_path,
            "--output-dir",
            untouched,
            "--overwrite",
            *TINY_IMAGENET_R,
        ],
        capsys,
        monkeypatch,
    )
    error = the_error(code, stderr.replace(_partial_tree_warning(stderr), ""))
    assert f"error: {tmp_path / 'train.txt'}" in error and message in error


def test_split_list_folder_without_its_files(
    untouched, imagenet_r_root, tmp_path, capsys, monkeypatch
):
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        [
            "--data-root",
            imagenet_r_root,
            "--split-list",
            tmp_path,
            "--output-dir",
            untouched,
            "--overwrite",
            *TINY_IMAGENET_R,
        ],
        capsys,
        monkeypatch,
    )
    assert f"--split-list {tmp_path} lacks {tmp_path / 'train.txt'}" in the_error(code, stderr)


# ---- pretrained weights ------------------------------------------------------------------------
def test_missing_pretrained_file_is_named(untouched, tmp_path, capsys, monkeypatch):
    weights = tmp_path / "ViT-B-16.pt"
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", "--pretrained", weights],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == (
        f"error: pretrained checkpoint file '{weights}' does not "
        "exist; pass an existing file or an open_clip tag such "
        "as 'openai'"
    )


def test_unknown_pretrained_tag_is_refused(untouched, capsys, monkeypatch):
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", "--pretrained", "openia"],
        capsys,
        monkeypatch,
    )
    assert "'openia' is neither a file nor a pretrained tag" in the_error(code, stderr)


def test_pretrained_file_that_is_not_a_checkpoint_is_refused(
    untouched, tmp_path, capsys, monkeypatch
):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"this is not a torch checkpoint")
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", "--pretrained", weights],
        capsys,
        monkeypatch,
    )
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
        code, _, stderr = run_script(
            "run_split_cifar.py", [*FAST, "--output-dir", target], capsys, monkeypatch
        )
        assert the_error(code, stderr) == (
            f"error: cannot write to --output-dir {target} ({reason}); choose a writable folder"
        )
    finally:
        locked.chmod(0o700)
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in locked.iterdir()) == ["old.txt"]


def test_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", blocker, "--overwrite"], capsys, monkeypatch
    )
    assert the_error(code, stderr) == (
        f"error: --output-dir {blocker} is a file, not a folder; choose another --output-dir"
    )
    assert blocker.read_text() == "keep me"


# ---- issue 14: more config and file inputs --------------------------------------------------
@pytest.mark.parametrize(
    "option, message",
    [
        (
            ["--pretrained", ""],
            "error: config key 'pretrained' must be an open_clip tag (openai), a "
            "weights file, or null for random weights, got ''",
        ),
        (
            ["--seed", str(2**64)],
            f"error: config key 'seed' must be in 0..2**32 - 1 (numpy's legacy seeds), got {2**64}",
        ),
    ],
    ids=["empty-pretrained", "seed-beyond-64-bits"],
)
def test_options_out_of_range_are_refused(option, message, untouched, capsys, monkeypatch):
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", *option],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == message


def test_config_file_that_is_not_utf8_names_the_file(untouched, tmp_path, capsys, monkeypatch):
    config = tmp_path / "latin1.json"
    config.write_bytes('{"ctx_init": "une photo d\'un caf\xe9"}'.encode("latin-1"))
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--config", config, "--output-dir", untouched, "--overwrite"],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == (
        f"error: {config} is not UTF-8 text (byte 32: b'\\xe9'); save it as UTF-8 JSON"
    )


def test_feature_cache_dir_that_is_a_file(untouched, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", untouched, "--overwrite", "--set", f"feature_cache_dir={blocker}"],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == (
        f"error: feature_cache_dir {blocker} is a file, not a "
        "folder; choose another feature_cache_dir or set it to "
        "null"
    )
    assert blocker.read_text() == "not a folder"


def test_smoke_preset_follows_the_class_order():
    from avalanche_cliphinge.app.run_options import smoke_stream

    order = [5, 4, 3, 2, 1, 0]
    named_benchmark = smoke_stream(tiny_config(class_order=order))
    assert named_benchmark.class_order == order and named_benchmark.protocol["class_order"] == order
    assert sorted(
        int(c) for c in named_benchmark.benchmark.train_stream[0].classes_in_this_experience
    ) == [2, 3, 4, 5]


def test_download_offline_is_one_line(untouched, tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [
            "--data-root",
            tmp_path / "data",
            "--download",
            "--output-dir",
            untouched,
            "--overwrite",
            "--quiet",
            *TINY,
        ],
        capsys,
        monkeypatch,
    )
    assert the_error(code, stderr) == (
        f"error: could not download CIFAR-100 into {tmp_path / 'data'} ([Errno -3] Temporary "
        "failure in name resolution); offline? Download https://www.cs.toronto.edu/~kriz/"
        f"cifar-100-python.tar.gz on a machine with internet and extract it into "
        f"{tmp_path / 'data'}, then run without --download"
    )


# ---- issue 14: images and numerics -----------------------------------------------------------
BAD_IMAGES = {
    "corrupt jpeg": lambda path: path.write_bytes(path.read_bytes()[:20] + b"\x00" * 400),
    "truncated jpeg": lambda path: path.write_bytes(path.read_bytes()[:-200]),
    "zero bytes": lambda path: path.write_bytes(b""),
    "text named .png": None,
}


def spoil(root, kind, index=3):
    """Spoil image ``art_<index>`` of the first class; returns its path."""
    from avalanche_cliphinge.benchmarks import IMAGENET_R_WNIDS

    folder = root / "imagenet-r" / IMAGENET_R_WNIDS[0]
    if kind == "text named .png":
        (folder / f"art_{index}.jpg").unlink()
        path = folder / f"art_{index}.png"
        path.write_text("this is not an image\n")
    else:
        path = folder / f"art_{index}.jpg"
        BAD_IMAGES[kind](path)
    return path


@pytest.fixture
def imagenet_r_copy(imagenet_r_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(imagenet_r_root, root)
    return root


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_names_the_file(kind, imagenet_r_copy, tmp_path, capsys, monkeypatch):
    path = spoil(imagenet_r_copy, kind)
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        [
            "--data-root",
            imagenet_r_copy,
            "--output-dir",
            tmp_path / "run",
            *TINY_IMAGENET_R,
            "--set",
            "num_workers=0",
        ],
        capsys,
        monkeypatch,
    )
    error = the_error(code, stderr.replace(_partial_tree_warning(stderr), ""))
    assert error.startswith(f"error: cannot read image {path} (")
    assert error.endswith(
        "replace or delete it, or pass --skip-bad-images to leave unreadable files out"
    )


@pytest.mark.slow
def test_skip_bad_images_leaves_them_out_with_one_warning(
    imagenet_r_copy, tmp_path, capsys, monkeypatch
):
    bad = sorted(
        [spoil(imagenet_r_copy, "zero bytes", 1), spoil(imagenet_r_copy, "text named .png", 3)]
    )
    code, _, stderr = run_script(
        "run_imagenet_r.py",
        [
            "--data-root",
            imagenet_r_copy,
            "--output-dir",
            tmp_path / "run",
            *TINY_IMAGENET_R,
            "--set",
            "num_workers=0",
            "--skip-bad-images",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, stderr
    warnings = [ln for ln in stderr.splitlines() if "--skip-bad-images" in ln]
    assert len(warnings) == 1, stderr
    assert warnings[0].startswith(
        "warning: --skip-bad-images: left out 2 unreadable image file(s) of "
    )
    assert all(str(p) in warnings[0] for p in bad)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["finished"] is True


def test_non_finite_test_features_are_refused_naming_the_experience(tmp_path, monkeypatch):
    """An encoder that gives NaN features for some test images (here: flat images, through a
    patched encoder) stops the evaluation naming the experience; nothing is reported."""
    from avalanche_cliphinge.model.cliphinge_model import CLIPHingeModel

    encode = CLIPHingeModel.run_image_encoder

    def nan_for_flat_images(self, images):
        features = encode(self, images)
        flat = images.float().flatten(2).std(2).amax(1) == 0
        return torch.where(flat[:, None], torch.full_like(features, float("nan")), features)

    monkeypatch.setattr(CLIPHingeModel, "run_image_encoder", nan_for_flat_images)
    poisoned = tensor_benchmark([6] * 6, init_class=4, flat_test_class=5)  # test exp 1: 4, 5
    with pytest.raises(
        FloatingPointError,
        match=r"^test experience 1: 3 of 6 samples give NaN "
        r"or Inf scores \(non-finite image features\); "
        r"check that experience's test images",
    ):
        run_experiment(
            tiny_config(), poisoned, tmp_path / "run", interactive=False, log=lambda message: None
        )
    assert not (tmp_path / "run" / "results.json").exists()  # nothing reported on NaN scores


def test_non_finite_stage_two_is_refused_and_earlier_checkpoints_kept(
    tmp_path, capsys, monkeypatch
):
    from avalanche_cliphinge.app import checkpoint as ckpt

    out = tmp_path / "run"
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", out, "--set", "second_stage_weight_decay=1e38"],
        capsys,
        monkeypatch,
    )
    error = the_error(code, stderr)
    assert error.startswith("error: non-finite stage-2 loss or weights at task 1, epoch 0")
    assert "second_stage_weight_decay" in error
    assert json.loads((out / "results.json").read_text())["completed_tasks"] == 1
    assert ckpt.load_checkpoint(out / "checkpoints" / "exp_000.pt")["completed"] == 1


# ---- issue 14: the disk ---------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_is_one_line_naming_the_file_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import errno

    from avalanche_cliphinge.app import experiment

    out = tmp_path / "run"
    real_write = experiment.write_text_atomic
    calls = []

    def full_disk(text, path):
        calls.append(path)
        if len(calls) == 4:  # config.json, then results.json and .txt, then results.json
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(text, path)

    monkeypatch.setattr(experiment, "write_text_atomic", full_disk)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", out], capsys, monkeypatch
    )
    assert the_error(code, stderr) == (
        f"error: cannot write {out / 'results.json'} (No space left on device); free some "
        f"space, then continue with --resume (the files written so far in {out} are intact)"
    )
    assert json.loads((out / "results.json").read_text())["completed_tasks"] == 1
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary file left
    monkeypatch.setattr(experiment, "write_text_atomic", real_write)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", out, "--resume"], capsys, monkeypatch
    )
    assert code == 0, stderr
    assert json.loads((out / "results.json").read_text())["finished"] is True


@pytest.mark.slow
def test_file_size_limit_is_one_line_and_resume_finishes(tmp_path, capsys, monkeypatch):
    """A real write failure from the kernel: ``ulimit -f`` (100 kB) stops the first write that
    outgrows it (TensorBoard's event file with its figures, or a checkpoint); one line, nothing
    half-written, and ``--resume`` without the limit finishes the run."""
    import resource
    import signal
    import subprocess

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_split_cifar.py"), *FAST, "--output-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write {out}") and "(File too large)" in lines[0]
    assert "continue with --resume" in lines[0]
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary file left
    for checkpoint in (out / "checkpoints").glob("*.pt"):  # whole ones only
        torch.load(checkpoint, weights_only=True)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", out, "--resume"], capsys, monkeypatch
    )
    assert code == 0, stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["finished"] is True
