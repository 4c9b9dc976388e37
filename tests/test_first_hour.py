"""A newcomer's first hour (issue 26, items 1, 4 and 8): commands that answer at once,
``cliphinge evaluate``, ``predict`` on folders, whole messages, the presets listed, the
compare usage line, the demo's short console output, aggregate on a folder of runs."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import PROBE

from avalanche_cliphinge.app import cli
from avalanche_cliphinge.app.command import main
from avalanche_cliphinge.config import list_presets
from avalanche_cliphinge.errors import first_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, code, said",
    [
        (["presets"], 0, "smoke (--preset smoke)"),
        (["run", "--help"], 0, "usage: cliphinge run"),
        (
            ["run", "--preset", "smoke", "--set", "lr=abc"],
            2,
            "error: --set: config key 'lr' expects float, got 'abc' (str)",
        ),
        (
            ["run", "--preset", "smoke", "--set", "lrr=1"],
            2,
            "error: --set: unknown config key 'lrr'; did you mean 'lr'?",
        ),
        (["run", "--config", "missing.json"], 2, "error: config 'missing.json' is neither"),
        (["predict", "--model", "missing.pt", "x.png"], 2, "error: saved model missing.pt does"),
        (
            ["evaluate", "--model", "missing.pt", "--preset", "smoke"],
            2,
            "error: saved model missing.pt does not exist; a finished run writes final_model.pt",
        ),
    ],
    ids=["presets", "run-help", "bad-value", "bad-key", "missing-config", "predict", "evaluate"],
)
def test_help_and_bad_requests_answer_without_importing_torch_or_avalanche(args, code, said):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert said in done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == f"exit {code} imported -"


def test_process_seconds_counts_from_the_start_of_the_process():
    began = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(1.0)\n"
            "from avalanche_cliphinge.app.cli import process_seconds; print(process_seconds())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    outside = time.perf_counter() - began
    inside = float(done.stdout)
    # the interpreter's start-up and the sleep before the import are counted; the child cannot
    # have lived longer than the parent waited for it (clock ticks of 1/100 s)
    assert 1.0 < inside <= outside + 0.02


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A smoke run in this process: ``(output folder, its results.json, stdout)``; its summary's
    process time is replaced by 1234.5 s, to see which figure the line prints."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(cli, "process_seconds", lambda: 1234.5)
        code = cli.main(["--preset", "smoke", "--quiet", "--output-dir", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), printed.getvalue()


def test_the_summary_line_gives_the_whole_process_time(smoke_run):
    *_, stdout = smoke_run
    assert stdout.rstrip().endswith("| this process: 1234.5 s")


# ---------------------------------------------------------------- item 4: cliphinge evaluate
def test_evaluate_gives_the_runs_last_and_its_last_row(smoke_run, tmp_path, capsys):
    out, results, _ = smoke_run
    written = tmp_path / "eval" / "smoke.json"
    args = ["--model", str(out / "final_model.pt"), "--preset", "smoke"]
    assert main(["evaluate", *args, "--output", str(written)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(written.read_text())
    assert report["accuracy"] == pytest.approx(results["metrics"]["Last"], abs=1e-9)
    assert round(report["accuracy"], 2) == 94.67  # the smoke preset's Last (README)
    last_row = results["accuracy_matrix"][-1]
    assert [t["accuracy"] for t in report["per_task"]] == pytest.approx(last_row, abs=1e-9)
    assert [t["classes"] for t in report["per_task"]] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    # 15 test images per class (the smoke stream); the whole stream is the size-weighted mean
    assert [t["test_images"] for t in report["per_task"]] == [60, 30, 30, 30]
    weighted = np.average(last_row, weights=[60, 30, 30, 30])
    assert report["accuracy"] == pytest.approx(weighted, abs=1e-9)
    assert report["protocol"]["preset"] == "smoke"
    assert report["protocol"]["class_order"] == list(range(10))
    assert "accuracy: 94.67 %" in stdout.splitlines()
    assert stdout.rstrip().endswith(f"written: {written}")


def test_evaluate_refuses_a_stream_the_model_has_no_classes_for(smoke_run, capsys):
    out, *_ = smoke_run
    model = out / "final_model.pt"
    # 5 tasks: classes 10 and 11 are beyond the 10 the model was trained on
    args = ["evaluate", "--model", str(model), "--preset", "smoke", "--set", "total_tasks=5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model} was not trained on this stream: its class 10 is no ")


def test_evaluate_answers_a_bad_set_before_reading_the_model(tmp_path, capsys):
    args = ["--model", str(tmp_path / "none.pt"), "--preset", "smoke", "--set", "epochs=x"]
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err == "error: --set: config key 'epochs' expects int, got 'x' (str)\n"


def test_predict_takes_a_folder_as_its_images_sorted_by_path(smoke_run, tmp_path, capsys):
    out, *_ = smoke_run
    model = str(out / "final_model.pt")
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    paths = [folder / "b.png", folder / "a" / "z.JPG", folder / "a" / "c.png"]
    for path in paths + [folder / ".hidden" / "d.png", folder / ".e.png"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="PNG")
    (folder / "notes.txt").write_text("not an image")
    in_order = sorted(paths)  # a/c.png, a/z.JPG, b.png
    assert main(["predict", "--model", model, "--top", "2", *map(str, in_order)]) == 0
    one_by_one = capsys.readouterr().out
    assert main(["predict", "--model", model, "--top", "2", str(folder)]) == 0
    from_folder = capsys.readouterr().out
    assert from_folder == one_by_one
    assert [line.split(": ")[0] for line in from_folder.splitlines()] == list(map(str, in_order))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["predict", "--model", model, str(empty)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: folder {empty} holds no image file (in it or its subfolders: .jpg .jpeg .png"
    )


class NotAModel:
    """Pickled into a file: what ``torch.load(weights_only=True)`` refuses."""


def test_a_file_of_pickled_objects_is_named_in_whole_words(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"format": NotAModel()}, path)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--model", str(path), str(image)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path} is not a readable saved model (it holds a pickled Python object, "
        f"{__name__}.NotAModel, which torch.load with weights_only=True refuses; this "
        "package's files hold tensors and plain values only); pass final_model.pt of a run\n"
    )


def test_long_messages_are_cut_between_words():
    words = ValueError("word " * 60)  # 299 characters once stripped: spaces at 4, 9, 14...
    # the last space within 200 characters is at 199: 40 whole words (199 characters) kept
    assert first_line(words) == " ".join(["word"] * 40) + " ..."
    assert first_line(ValueError("\n\x1b[1mbold\x1b[0m first\nsecond")) == "bold first"
    unbroken = "x" * 250
    assert first_line(ValueError(unbroken)) == unbroken  # no space to cut at: kept whole


# ---------------------------------------------------------------- item 8: small things
def test_presets_lists_the_run_presets_and_the_config_presets_marked(capsys):
    assert main(["presets"]) == 0
    names = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert names == ["smoke (--preset smoke)"] + [f"{n} (--config {n})" for n in list_presets()]


def test_compare_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: cliphinge compare [-h] --benchmark")


def test_progress_only_prints_no_metric_lines(tmp_path):
    from cli_helpers import ONE_EPOCH

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(
            ["--preset", "smoke", "--progress-only", "--set", "total_tasks=2", *ONE_EPOCH]
            + ["--output-dir", str(tmp_path / "run")]
        )
    assert code == 0
    lines = printed.getvalue().splitlines()
    # Avalanche's InteractiveLogger lines: "-- >> Start of training phase << --", "Epoch 0
    # ended.", "\tTop1_Acc_Epoch/... = 0.7167", "> Eval on experience 0 ..."
    noise = ("--", "Epoch", "\t", "> Eval")
    assert not [line for line in lines if line.lstrip("\r").startswith(noise)]
    per_task = [line for line in lines if line.startswith(("task 0: ", "task 1: "))]
    assert len(per_task) == 2  # one line per task stays
    assert "Epoch 0 ended." in (tmp_path / "run" / "log.txt").read_text()  # kept in the log
    assert "\r" in printed.getvalue()  # the progress bars are there
    assert "--progress-only" in (ROOT / "Makefile").read_text().split("demo:")[1].split("\n\n")[0]


def test_aggregate_takes_a_folder_of_seed_folders(smoke_run, tmp_path, capsys):
    _, results, _ = smoke_run
    parent = tmp_path / "smoke_seeds"
    for seed in (1, 2):
        run = dict(results, protocol={**results["protocol"], "seed": seed})
        (parent / f"seed_{seed}").mkdir(parents=True)
        (parent / f"seed_{seed}" / "results.json").write_text(json.dumps(run))
    unfinished = dict(results, finished=False, completed_tasks=2)
    (parent / "seed_3").mkdir()
    (parent / "seed_3" / "results.json").write_text(json.dumps(unfinished))
    (parent / "notes").mkdir()  # not a run: passed over
    out = tmp_path / "summary"
    assert main(["aggregate", str(parent), "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0] == (
        f"{parent}: 2 finished runs (seed_1, seed_2); left out: {parent / 'seed_3'} holds an "
        "unfinished run (2 tasks)"
    )
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert (row["n"], row["seeds"]) == (2, [1, 2])
    assert row["Last_mean"] == pytest.approx(results["metrics"]["Last"], abs=1e-9)
    shutil.rmtree(parent / "seed_1")
    shutil.rmtree(parent / "seed_2")
    assert main(["aggregate", str(parent), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {parent} holds no results.json and none of its subfolders a finished run ("
    )
