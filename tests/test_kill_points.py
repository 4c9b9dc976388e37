"""Resume is exact at every write boundary: kill a run there, resume it, compare every output.

Each case SIGKILLs a cheap smoke run (3 tasks, 1 epoch) at one named point of one experience,
resumes it with ``--resume`` and compares results, plots, CSV logs, TensorBoard events (every
tag, scalars and images), config and checkpoints with one uninterrupted run.

The kill points are a private test hook: ``CLIPHINGE_KILL_AT=<point>:<experience>`` makes
``avalanche_cliphinge.kill_points.kill_point`` SIGKILL the process when the run passes that point
(``results``, ``plots``, ``tensorboard``: after those writes of an experience;
``checkpoint_write``: inside the checkpoint's temporary file, before its flush;
``checkpoint_temp``: the temporary file complete, not renamed; ``checkpoint``: renamed, the
older checkpoint not yet removed and, on the last experience, the run not yet marked
finished; ``resume_loggers``: inside ``--resume``, right after the loggers reopened).

Runs are children of a forkserver that has imported the package once, so a case costs its
training time, not torch's import time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from avalanche_cliphinge.app import checkpoint as ckpt
from avalanche_cliphinge.kill_points import KILL_ENV

from cli_helpers import ONE_EPOCH, ROOT, SCRIPTS

pytestmark = pytest.mark.slow

CHEAP = [
    "--preset",
    "smoke",
    "--quiet",
    "--set",
    "total_tasks=3",
    *ONE_EPOCH,
]
N_TASKS = 3
#: (point, experience): every write boundary in the middle of the run, and those that come
#: before "finished" on its last task (``checkpoint_write`` of the last task is the
#: temporary-file test below).
KILL_POINTS = [
    *[
        (point, 1)
        for point in (
            "results",
            "plots",
            "tensorboard",
            "checkpoint_write",
            "checkpoint_temp",
            "checkpoint",
        )
    ],
    *[(point, 2) for point in ("results", "plots", "tensorboard", "checkpoint")],
]
#: TensorBoard tags whose values are wall-clock times: compared by step only.
TIMING = ("Time_",)


def _main(output_dir: str, extra, kill_at, log_path: str) -> None:
    """A child process: the CLI on ``output_dir``, killed at ``kill_at`` when given."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(ROOT)
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    script = str(SCRIPTS / "run_split_cifar.py")
    sys.argv = [script, *CHEAP, "--output-dir", output_dir, *extra]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code or 0)
    os._exit(0)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """``launch(folder, *extra, kill_at=None) -> exit code`` through a preloaded forkserver."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "avalanche_cliphinge.app.cli",
            "avalanche_cliphinge.app.experiment",
            "avalanche_cliphinge.benchmarks",
            "matplotlib.pyplot",
            "tensorboard",
        ]
    )
    logs = tmp_path_factory.mktemp("logs")

    def launch(folder: Path, *extra: str, kill_at=None) -> int:
        log = logs / f"{folder.name}.log"
        process = context.Process(target=_main, args=(str(folder), list(extra), kill_at, str(log)))
        process.start()
        process.join(600)
        assert process.exitcode is not None, "timed out"
        expected = -signal.SIGKILL if kill_at else 0
        assert process.exitcode == expected, log.read_text()[-3000:]
        return process.exitcode

    return launch


@pytest.fixture(scope="module")
def reference(launcher, tmp_path_factory):
    """One uninterrupted run of the cheap config."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    launcher(folder)
    return folder


# ---- comparing two run folders -------------------------------------------------------------
def tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def assert_same_outputs(folder: Path, reference: Path) -> None:
    """Every output of ``folder`` equals the uninterrupted ``reference`` (times, the command
    line, when each run began and the git commit of its code aside)."""
    got, want = (json.loads((f / "results.json").read_text()) for f in (folder, reference))
    assert got["finished"] is True
    for key in want:
        if key not in ("protocol", "train_seconds", "wall_seconds"):
            assert got[key] == want[key], key
    launch = ("command", "created", "git_commit", "git_commit_resumed")
    assert {k: v for k, v in got["protocol"].items() if k not in launch} == {
        k: v for k, v in want["protocol"].items() if k not in launch
    }
    text = [(f / "results.txt").read_text().splitlines() for f in (folder, reference)]
    varying = ("command:", "created:", "git_commit", "Time: training")
    assert [ln for ln in text[0] if not ln.startswith(varying, ln.find(ln.strip()))] == [
        ln for ln in text[1] if not ln.startswith(varying, ln.find(ln.strip()))
    ]
    for name in (
        "config.json",
        "accuracy_matrix.png",
        "accuracy_curve.png",
        "confusion_matrix.png",
        "accuracy_matrix.pdf",
        "confusion_matrix.pdf",
        "csv/eval_results.csv",
        "csv/training_results.csv",
    ):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    names = [p.name for _, p in ckpt.list_checkpoints(folder / "checkpoints")]
    assert names == [p.name for _, p in ckpt.list_checkpoints(reference / "checkpoints")]
    for name in names:
        a, b = (ckpt.load_checkpoint(f / "checkpoints" / name) for f in (folder, reference))
        for key in ("completed", "clock", "csv_rows", "evaluator", "config"):
            assert a[key] == b[key], (name, key)
        assert a["run"]["matrix"] == b["run"]["matrix"]
        assert all(torch.equal(x, y) for x, y in zip(a["model"]["prompts"], b["model"]["prompts"]))
    events, expected = tensorboard(folder), tensorboard(reference)
    assert events.Tags()["scalars"] == expected.Tags()["scalars"]
    assert events.Tags()["images"] == expected.Tags()["images"]
    for tag in expected.Tags()["scalars"]:
        if tag.startswith(TIMING):
            assert [e.step for e in events.Scalars(tag)] == [
                e.step for e in expected.Scalars(tag)
            ], tag
        else:
            assert [(e.step, e.value) for e in events.Scalars(tag)] == [
                (e.step, e.value) for e in expected.Scalars(tag)
            ], tag
    for tag in expected.Tags()["images"]:
        assert [(e.step, e.encoded_image_string) for e in events.Images(tag)] == [
            (e.step, e.encoded_image_string) for e in expected.Images(tag)
        ], tag
    leftovers = [p for p in folder.rglob(".*") if p.name != ".lock"]
    assert not leftovers, leftovers


# ---- the cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("point, experience", KILL_POINTS, ids=[f"{p}-{e}" for p, e in KILL_POINTS])
def test_resume_after_a_kill_equals_the_uninterrupted_run(
    point, experience, launcher, reference, tmp_path
):
    folder = tmp_path / f"{point}_{experience}"
    launcher(folder, kill_at=f"{point}:{experience}")
    results = json.loads((folder / "results.json").read_text())
    assert results["finished"] is False  # never marked finished before everything is written
    launcher(folder, "--resume")
    assert_same_outputs(folder, reference)


def test_kill_inside_resume_after_the_loggers_reopen(launcher, reference, tmp_path):
    folder = tmp_path / "resume_loggers"
    launcher(folder, kill_at="tensorboard:1")
    csv_before = (folder / "csv" / "eval_results.csv").read_text()
    launcher(folder, "--resume", kill_at="resume_loggers:1")
    # The reopened CSV logger truncated nothing: the kept rows are all still there.
    assert (
        (folder / "csv" / "eval_results.csv")
        .read_text()
        .startswith("".join(csv_before.splitlines(keepends=True)[: 1 + N_TASKS]))
    )
    launcher(folder, "--resume")
    assert_same_outputs(folder, reference)


def test_finished_looking_folder_with_lagging_outputs_is_repaired_by_resume(
    launcher, reference, tmp_path
):
    """What an older version left when killed on the last task after results.json: the run
    marked finished, the plots, TensorBoard and checkpoints one task behind."""
    folder = tmp_path / "lagging"
    launcher(folder, kill_at=f"results:{N_TASKS - 1}")
    results_path = folder / "results.json"
    results = json.loads(results_path.read_text())
    results_path.write_text(json.dumps({**results, "finished": True}, indent=2) + "\n")
    launcher(folder, "--resume")
    assert_same_outputs(folder, reference)


def test_kill_point_hook_is_inert_without_the_variable(monkeypatch):
    from avalanche_cliphinge.kill_points import kill_point

    monkeypatch.delenv(KILL_ENV, raising=False)
    kill_point("results", 0)
    monkeypatch.setenv(KILL_ENV, "plots:3")
    kill_point("plots", 2)
    kill_point("results", 3)


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(
    launcher, reference, tmp_path
):
    folder = tmp_path / "temp"
    launcher(folder, kill_at=f"checkpoint_write:{N_TASKS - 1}")
    assert [p.name for p in (folder / "checkpoints").glob(f".exp_00{N_TASKS - 1}.pt.*")]
    shutil.copy(folder / "results.json", folder / ".results.json.killed1")
    (folder / ".notes.md").write_text("not ours")
    launcher(folder, "--resume")
    assert (folder / ".notes.md").read_text() == "not ours"
    (folder / ".notes.md").unlink()
    assert_same_outputs(folder, reference)  # no .exp_*.pt.* nor .results.json.* left
