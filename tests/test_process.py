"""The run command's progress without per-step callbacks and its process's start and end
(issue 27, item 5): ``app.progress.EpochProgress``, ``app.process``."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from avalanche.core import SupervisedPlugin

from cli_helpers import ONE_EPOCH, SCRIPTS

from avalanche_cliphinge.app import cli, experiment, process
from avalanche_cliphinge.app.evaluation import make_evaluator
from avalanche_cliphinge.runner_checks import overrides, plugin_needs

ROOT = Path(__file__).resolve().parents[1]
#: A 2-task smoke run, one epoch a task.
TWO_TASKS = ["--preset", "smoke", "--set", "total_tasks=2", *ONE_EPOCH]
#: The callbacks of a step, training and evaluation.
STEP_CALLBACKS = [
    name
    for name in dir(SupervisedPlugin)
    if name.endswith("_iteration") or name.endswith(("_forward", "_backward", "_update"))
]


def _bars(printed: str):
    """Every drawing of a progress bar (tqdm redraws a bar after a carriage return)."""
    return {part for line in printed.splitlines() for part in line.split("\r") if "|" in part}


@pytest.mark.parametrize("display", ["default", "--progress-only"])
def test_the_run_shows_its_progress_without_a_callback_per_step(display, tmp_path, monkeypatch):
    made = []

    def recorded(**kwargs):
        made.append(make_evaluator(**kwargs))
        return made[-1]

    monkeypatch.setattr(experiment, "make_evaluator", recorded)
    printed = io.StringIO()
    extra = [] if display == "default" else [display]
    with contextlib.redirect_stdout(printed):
        code = cli.main([*TWO_TASKS, *extra, "--output-dir", str(tmp_path / "run")])
    assert code == 0
    (evaluation,) = made
    evaluator = evaluation.plugin
    # the captured step calls nothing per step for this evaluator
    assert not plugin_needs(evaluator, "after_training_iteration", True)
    assert not plugin_needs(evaluator, "before_training_iteration", True)
    for logger in evaluator.loggers:
        assert not [name for name in STEP_CALLBACKS if overrides(logger, name)], logger
    text = printed.getvalue()
    drawn = _bars(text)
    # a bar per experience over its epochs, with the epoch's loss and accuracy ...
    for task in (0, 1):
        assert any(
            f"stage 1, task {task}: 100%" in bar
            and "1/1" in bar
            and "loss=" in bar
            and "acc=" in bar
            for bar in drawn
        ), drawn
    # ... and one per evaluation over the test stream's experiences, with their accuracy
    # (after task 0 the second experience is not trained yet: "-", not 0%)
    assert any("evaluation: 100%" in bar and "2/2" in bar and "acc=-" in bar for bar in drawn)
    assert any("evaluation: 100%" in bar and "2/2" in bar and "%]" in bar for bar in drawn)
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("task 0: ")]
    metric_lines = [line for line in lines if line.lstrip("\r").startswith("Epoch 0 ended.")]
    if display == "default":  # Avalanche's metric lines, above the bars
        assert len(metric_lines) == 2
        assert any(line.startswith("\tTop1_Acc_Epoch/train_phase/train_stream") for line in lines)
        assert any(line.startswith("> Eval on experience 1 ") for line in lines)
    else:
        assert metric_lines == []


@pytest.mark.parametrize(
    "started, argv, owned",
    [
        (
            ["python", "experiments/run_split_cifar.py", "--x"],
            ["experiments/run_split_cifar.py", "--x"],
            True,
        ),
        (["python", "-X", "utf8", "s.py", "a"], ["s.py", "a"], True),
        (["/venv/bin/python", "/venv/bin/cliphinge", "run"], ["/venv/bin/cliphinge", "run"], True),
        (["python", "-m", "avalanche_cliphinge", "run"], ["/pkg/__main__.py", "run"], True),
        # a test running a script with runpy, a probe with -c, another module with -m
        (["python", "-m", "pytest", "tests"], ["experiments/run_split_cifar.py", "--x"], False),
        (["python", "-c", "probe", "run"], ["cliphinge", "run"], False),
        (["python", "-m", "pytest", "run"], ["/pytest/__main__.py", "run"], False),
        (["python"], [""], False),
    ],
)
def test_the_process_is_the_commands_when_the_interpreter_was_started_on_it(
    started, argv, owned, monkeypatch
):
    monkeypatch.setattr(sys, "orig_argv", started)
    monkeypatch.setattr(sys, "argv", argv)
    assert process.started_on_command() is owned


def test_a_process_not_claimed_keeps_its_collector_and_its_end(monkeypatch):
    monkeypatch.setattr(process, "_claimed", False)
    frozen = gc.get_freeze_count()
    with process.heavy_imports():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    assert process.finish(0) == 0  # returned, not exited
    assert process.finish(2) == 2


#: Put in front of the run's ``sys.path`` (``sitecustomize``): says on standard error when
#: the interpreter's teardown clears the modules (never after ``os._exit``) ...
TEARDOWN_PROBE = """
import os

import frozen_probe  # noqa: F401


class _Teardown:
    def __del__(self, write=os.write):
        write(2, b"\\nprobe: teardown\\n")


teardown = _Teardown()
"""
#: ... and at exit the most objects the collector held frozen in a collection.
FROZEN_PROBE = """
import atexit, gc, os

frozen = [0]
gc.callbacks.append(lambda phase, info: frozen.append(max(frozen.pop(), gc.get_freeze_count())))
atexit.register(lambda: os.write(2, b"\\nprobe: frozen %d\\n" % frozen[0]))
"""


def _script_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(TEARDOWN_PROBE)
    (probe / "frozen_probe.py").write_text(FROZEN_PROBE)
    path = [str(probe), os.environ.get("PYTHONPATH", "")]
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "run_split_cifar.py"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_script_run_ends_without_teardown_and_keeps_every_file(tmp_path):
    out = tmp_path / "run"
    done = _script_run(tmp_path, *TWO_TASKS, "--quiet", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("probe: ")]
    # the imports' objects frozen (the collector ran after them); no teardown
    assert said[-1].startswith("probe: frozen ") and int(said[-1].split()[-1]) > 10_000
    assert "probe: teardown" not in said
    assert "results: " in done.stdout.splitlines()[-1]  # the last line flushed
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and results["completed_tasks"] == 2
    assert (out / "checkpoints" / "exp_001.pt").is_file() and (out / "final_model.pt").is_file()
    rows = (out / "csv" / "training_results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header, one epoch per task
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tb").glob("events.*")
    board = EventAccumulator(str(events))
    board.Reload()
    assert len(board.Scalars("Top1_Acc_Epoch/train_phase/train_stream/Task000")) == 2
    assert board.Scalars("hparam/AIA")  # written last, as the run finishes
    # a failure ends through the interpreter: its teardown, the one error line, nothing else
    again = _script_run(tmp_path, *TWO_TASKS, "--quiet", "--output-dir", str(out))
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "--overwrite" in lines[0]
    assert lines[1:] == [line for line in lines[1:] if line.startswith("probe: ")]
    assert "probe: teardown" in lines
