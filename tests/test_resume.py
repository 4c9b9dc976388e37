"""Checkpoints and --resume: a run killed mid-experience continues as if never stopped.

A smoke run is SIGKILLed in the middle of experience 3 (after ``checkpoints/exp_002.pt``) and
resumed in another process; everything it reports must EQUAL an uninterrupted run with the
same seed (the same run ``test_experiments.py`` checks). The refusals (corrupt checkpoints,
another config, finished or unfinished folders) run in this process on copies of the killed
run's folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from avalanche_cliphinge.app import checkpoint as ckpt
from avalanche_cliphinge.app.run_options import SMOKE
from avalanche_cliphinge.config import CLIPHingeConfig
from avalanche_cliphinge.app.experiment import run_experiment
from avalanche_cliphinge.strategy import build_model

from cli_helpers import (
    FAST,
    ROOT,
    run_script,
    run_script_here,
    smoke_command,
    snapshot,
    uninterrupted_smoke_run,
)

#: subprocess runs of the application: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow
N_TASKS = 4
EPOCHS = 8
STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
SAME_RESULTS = (
    "finished",
    "completed_tasks",
    "metrics",
    "avalanche_stream_forgetting",
    "per_task",
    "accuracy_matrix",
    "test_sizes",
    "hard_pairs",
)


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.strip()]


def stream_events(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def resume(folder: Path, capsys, monkeypatch, *extra):
    """``--resume`` of the smoke preset in ``folder``: ``(exit code, stdout, stderr)``."""
    return run_script(
        "run_split_cifar.py",
        ["--preset", "smoke", "--quiet", "--output-dir", folder, "--resume", *extra],
        capsys,
        monkeypatch,
    )


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out, proc = uninterrupted_smoke_run(tmp_path_factory)
    assert proc["returncode"] == 0, proc["stderr"][-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, uninterrupted):
    """Kill a smoke run during experience 3, keep a copy of its folder, resume it.

    Returns ``(resumed folder, copy of the killed folder, resume process record)``.
    """
    base = tmp_path_factory.getbasetemp()
    out = base / "smoke_killed"
    log = open(base / "smoke_killed.log", "w")
    proc = subprocess.Popen(smoke_command(out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    checkpoint = out / "checkpoints" / "exp_002.pt"
    training_csv = out / "csv" / "training_results.csv"
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # Experience 3 is under way once its first epoch is logged.
            if (
                checkpoint.exists()
                and training_csv.exists()
                and any(line.startswith("3,") for line in training_csv.read_text().splitlines())
            ):
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (base / "smoke_killed.log").read_text()[-3000:]
    template = base / "smoke_killed_copy"
    shutil.copytree(out, template)
    code, stdout, stderr = run_script_here("run_split_cifar.py", smoke_command(out, "--resume")[2:])
    assert code == 0, stderr[-3000:]
    return out, template, {"stdout": stdout, "stderr": stderr}


@pytest.fixture
def unfinished(killed_and_resumed, tmp_path):
    """A fresh copy of the killed run's folder (3 experiences done, killed in the 4th)."""
    folder = tmp_path / "run"
    shutil.copytree(killed_and_resumed[1], folder)
    return folder


# ---- kill and resume ---------------------------------------------------------------------------
def test_killed_run_is_unfinished_with_the_last_two_checkpoints(killed_and_resumed, uninterrupted):
    template = killed_and_resumed[1]
    results = json.loads((template / "results.json").read_text())
    assert results["finished"] is False and results["completed_tasks"] == 3
    names = [p.name for _, p in ckpt.list_checkpoints(template / "checkpoints")]
    assert names == ["exp_002.pt", "exp_001.pt"]
    assert ckpt.load_checkpoint(template / "checkpoints" / "exp_002.pt")["completed"] == 3
    # Determinism: another process with the same seed measured exactly the same.
    assert results["accuracy_matrix"] == uninterrupted[1]["accuracy_matrix"][:3]
    assert results["per_task"] == uninterrupted[1]["per_task"][:3]


def test_resumed_run_equals_the_uninterrupted_run(killed_and_resumed, uninterrupted):
    out, _, proc = killed_and_resumed
    resumed = json.loads((out / "results.json").read_text())
    reference = uninterrupted[1]
    for key in SAME_RESULTS:
        assert resumed[key] == reference[key], key
    differing = {
        k for k in reference["protocol"] if resumed["protocol"].get(k) != reference["protocol"][k]
    }
    # "... --resume"; each run records when it began (the resumed run keeps its first
    # start, the killed run's) and its code's commit (a commit may land between two runs)
    assert differing - {"created", "git_commit"} == {"command"}
    killed = json.loads((killed_and_resumed[1] / "results.json").read_text())
    assert resumed["protocol"]["created"] == killed["protocol"]["created"] is not None
    assert "resuming from exp_002.pt: after experience 2 (3 of 4 done)" in proc["stdout"]


def test_csv_logs_after_resume_hold_each_experience_once(killed_and_resumed, uninterrupted):
    out = killed_and_resumed[0]
    for name in ("eval_results.csv", "training_results.csv"):
        # Same rows, same values, same order as without the interruption: the rows the killed
        # process wrote for experience 3 are gone, none of experiences 0-2 is repeated.
        assert (out / "csv" / name).read_text() == (uninterrupted[0] / "csv" / name).read_text(), (
            name
        )
    eval_rows = (out / "csv" / "eval_results.csv").read_text().splitlines()[1:]
    assert len(eval_rows) == len(set(eval_rows)) == N_TASKS * N_TASKS


def test_tensorboard_after_resume_has_no_duplicated_or_orphaned_points(
    killed_and_resumed, uninterrupted
):
    resumed = stream_events(killed_and_resumed[0] / "tb")
    reference = stream_events(uninterrupted[0] / "tb")
    assert len(list((killed_and_resumed[0] / "tb").iterdir())) == 2  # one file per process
    for tag in (
        STREAM_ACC,
        "StreamForgetting/eval_phase/test_stream",
        "Top1_Acc_Epoch/train_phase/train_stream/Task000",
        "Loss_Epoch/train_phase/train_stream/Task000",
        "results/AIA",
    ):
        got = [(e.step, e.value) for e in resumed.Scalars(tag)]
        assert got == [(e.step, e.value) for e in reference.Scalars(tag)], tag
    assert len(resumed.Scalars(STREAM_ACC)) == N_TASKS
    assert [e.step for e in resumed.Images("results/accuracy_matrix")] == [
        e.step for e in reference.Scalars(STREAM_ACC)
    ]


def test_resume_is_marked_in_the_log_and_checkpoints_roll_on(killed_and_resumed):
    out = killed_and_resumed[0]
    assert "=== resuming from exp_002.pt: after experience 2" in (out / "log.txt").read_text()
    names = [p.name for _, p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["exp_003.pt", "exp_002.pt"]
    assert not list((out / "checkpoints").glob(".*"))  # no temporary file of the killed save


# ---- corrupt checkpoints -----------------------------------------------------------------------
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    unfinished, uninterrupted, capsys, monkeypatch
):
    truncate(unfinished / "checkpoints" / "exp_002.pt")
    code, stdout, stderr = resume(unfinished, capsys, monkeypatch)
    assert code == 0, stderr
    assert (
        f"warning: checkpoint {unfinished / 'checkpoints' / 'exp_002.pt'} is corrupt or "
        "truncated" in stdout
    )
    assert "resuming from the previous checkpoint exp_001.pt instead" in stdout
    assert "resuming from exp_001.pt: after experience 1 (2 of 4 done)" in stdout
    results = json.loads((unfinished / "results.json").read_text())
    for key in SAME_RESULTS:  # experiences 2 and 3 redone in this process: still identical
        assert results[key] == uninterrupted[1][key], key
    assert (unfinished / "csv" / "eval_results.csv").read_text() == (
        uninterrupted[0] / "csv" / "eval_results.csv"
    ).read_text()
    assert ckpt.load_checkpoint(unfinished / "checkpoints" / "exp_002.pt")["completed"] == 3


def test_all_checkpoints_corrupt_is_an_error_naming_them(unfinished, capsys, monkeypatch):
    truncate(unfinished / "checkpoints" / "exp_002.pt", keep=0.1)
    (unfinished / "checkpoints" / "exp_001.pt").write_bytes(b"not a checkpoint at all")
    before = snapshot(unfinished)
    code, stdout, stderr = run_script(
        "run_split_cifar.py",
        ["--preset", "smoke", "--quiet", "--output-dir", unfinished, "--resume"],
        capsys,
        monkeypatch,
    )
    assert code == 2
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(
        f"error: no usable checkpoint in {unfinished / 'checkpoints'}: "
        "exp_002.pt, exp_001.pt cannot be read"
    )
    assert "--overwrite" in lines[0]
    assert snapshot(unfinished) == before


def test_load_checkpoint_names_the_file_and_the_problem(tmp_path):
    foreign = tmp_path / "exp_000.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match=r"exp_000.pt is not an avalanche-cliphinge"):
        ckpt.load_checkpoint(foreign)
    empty = tmp_path / "exp_001.pt"
    empty.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"exp_001.pt is corrupt or truncated"):
        ckpt.load_checkpoint(empty)
    assert ckpt.load_latest(tmp_path / "nothing here") is None


def test_save_checkpoint_keeps_two_and_clears_leftover_temporary_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".exp_001.pt.abc123").write_bytes(b"half a file from a killed save")
    for completed in (1, 2, 3):
        ckpt.save_checkpoint(checkpoint_state(completed), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["exp_001.pt", "exp_002.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "exp_002.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    messages = []
    truncate(folder / "exp_002.pt")
    assert ckpt.load_latest(folder, warn=messages.append)["completed"] == 2
    assert len(messages) == 1 and "exp_002.pt" in messages[0] and "exp_001.pt" in messages[0]


def checkpoint_state(completed: int, n_exps: int = 4):
    """A well-formed checkpoint state of ``completed`` 2-class tasks (values are dummies)."""
    tasks = [[2 * t, 2 * t + 1] for t in range(completed)]
    return {
        "completed": completed,
        "config": {},
        "stream": {},
        "model": {
            "task_classes": tasks,
            "prompts": [torch.zeros(2, 4, 8) for _ in tasks],
            "gaussians": {k: torch.zeros(0) for k in ("class_ids", "means", "chols")},
            "heads": {},
            "head_scales": {},
            "adapter": None,
            "lora": {},
        },
        "clock": dict.fromkeys(ckpt._CLOCK_FIELDS, 0),
        "evaluator": [],
        "rng": ckpt.rng_state(),
        "run": {
            "matrix": [[0.0] * n_exps for _ in tasks],
            "per_task": [{}] * completed,
            "stream_forgetting": [None] * completed,
            "hard_pairs": [{}] * completed,
            "train_seconds": 0.0,
            "wall_seconds": 0.0,
        },
        "csv_rows": {"eval_results.csv": 1},
        "tb_files": {},
    }


FORGERIES = {
    "completed=-1": (lambda s: s.update(completed=-1), "completed=-1 is not a positive"),
    "completed=99": (
        lambda s: s.update(completed=99),
        "completed=99 is not a positive|model.task_classes is not 99",
    ),
    "no numpy RNG": (lambda s: s["rng"].pop("numpy"), "rng lacks the python, numpy or torch"),
    "config a list": (lambda s: s.update(config=[1, 2]), "config is a list, not a mapping"),
    "short matrix": (lambda s: s["run"]["matrix"].pop(), "run.matrix is not 3 rows"),
    "prompt shape": (
        lambda s: s["model"]["prompts"].__setitem__(0, torch.zeros(3, 4)),
        "model.prompts is not 3 tensors",
    ),
    "clock": (lambda s: s.update(clock={"train_iterations": -5}), "clock is not Avalanche"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_checkpoint_fields_are_refused_by_name(forgery, tmp_path):
    change, message = FORGERIES[forgery]
    state = checkpoint_state(3)
    change(state)
    path = tmp_path / "exp_002.pt"
    torch.save({**state, "format": ckpt.FORMAT_VERSION}, path)
    with pytest.raises(ckpt.CheckpointError, match=rf"{path} is damaged or forged \(({message})"):
        ckpt.load_checkpoint(path)


def test_checkpoint_named_for_another_experience_is_refused(tmp_path):
    path = tmp_path / "exp_001.pt"
    torch.save({**checkpoint_state(3), "format": ckpt.FORMAT_VERSION}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"completed=3 in a file named exp_001.pt"):
        ckpt.load_checkpoint(path)


# ---- refusals ---------------------------------------------------------------------------------
def test_unfinished_run_without_resume_is_refused(unfinished, capsys, monkeypatch):
    before = snapshot(unfinished)
    code, _, stderr = run_script(
        "run_split_cifar.py",
        ["--preset", "smoke", "--quiet", "--output-dir", unfinished],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert error_lines(stderr) == [
        f"error: {unfinished} holds an unfinished run (3 experiences done); pass --resume to "
        "continue it or --overwrite to start again"
    ]
    assert snapshot(unfinished) == before


def test_checkpoint_of_another_config_lists_the_differences_and_force_overrides(
    unfinished, uninterrupted, capsys, monkeypatch
):
    before = snapshot(unfinished)
    args = [
        "--preset",
        "smoke",
        "--quiet",
        "--output-dir",
        unfinished,
        "--resume",
        "--set",
        "lr=0.02",
        "--set",
        "text_hinge_margin=0.2",
        "--set",
        "num_workers=1",
    ]
    code, _, stderr = run_script("run_split_cifar.py", args, capsys, monkeypatch)
    assert code == 2
    assert error_lines(stderr) == [
        "error: exp_002.pt was made with another config (lr: 0.01 -> 0.02; text_hinge_margin: "
        "0.1 -> 0.2); pass --force to resume anyway"
    ]  # num_workers does not change results
    assert snapshot(unfinished) == before
    code, stdout, stderr = run_script("run_split_cifar.py", args + ["--force"], capsys, monkeypatch)
    assert code == 0, stderr
    assert "--force: resuming although lr: 0.01 -> 0.02; text_hinge_margin: 0.1 -> 0.2" in stdout
    results = json.loads((unfinished / "results.json").read_text())
    assert results["finished"] is True
    assert results["accuracy_matrix"][:3] == uninterrupted[1]["accuracy_matrix"][:3]
    assert results["protocol"]["config"]["lr"] == 0.02


def test_finished_run_is_refused_and_overwrite_starts_again(
    uninterrupted, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "finished"
    shutil.copytree(uninterrupted[0], folder)
    before = snapshot(folder)
    for extra in ([], ["--resume"]):
        code, _, stderr = run_script(
            "run_split_cifar.py",
            ["--preset", "smoke", "--quiet", "--output-dir", folder, *extra],
            capsys,
            monkeypatch,
        )
        assert code == 2
        assert error_lines(stderr) == [
            f"error: {folder} already holds a finished run (results.json); pass --overwrite "
            "to run again or choose another --output-dir"
        ]
    assert snapshot(folder) == before
    (folder / "notes.md").write_text("mine")  # not a run file: --overwrite leaves it
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", folder, "--overwrite"], capsys, monkeypatch
    )
    assert code == 0, stderr
    results = json.loads((folder / "results.json").read_text())
    assert results["finished"] is True and results["completed_tasks"] == 2
    assert [p.name for _, p in ckpt.list_checkpoints(folder / "checkpoints")] == [
        "exp_001.pt",
        "exp_000.pt",
    ]  # the old run's exp_002/exp_003 are gone
    assert len(list((folder / "tb").iterdir())) == 1
    assert (folder / "notes.md").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys, monkeypatch):
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", tmp_path, "--resume", "--overwrite"],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert "argument --overwrite: not allowed with argument --resume" in stderr


def test_resume_without_a_checkpoint_starts_from_the_first_experience(
    tmp_path, capsys, monkeypatch
):
    code, stdout, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", tmp_path / "new", "--resume"],
        capsys,
        monkeypatch,
    )
    assert code == 0, stderr
    assert "--resume: no checkpoint in" in stdout
    assert json.loads((tmp_path / "new" / "results.json").read_text())["finished"] is True


# ---- numerics ---------------------------------------------------------------------------------
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    # Task 0 trains with init_lr = 0.01; lr = 1e30 (task 1 on) makes the first Adam step
    # blow the prompts up and the next loss NaN.
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", out, "--set", "lr=1e30"], capsys, monkeypatch
    )
    assert code == 2
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: non-finite loss at task 1, epoch 0, iteration ")
    assert "cross_entropy=nan" in lines[0] and "lower lr" in lines[0]
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is False and results["completed_tasks"] == 1
    state = ckpt.load_checkpoint(out / "checkpoints" / "exp_000.pt")
    assert state["completed"] == 1
    assert all(torch.isfinite(ctx).all() for ctx in state["model"]["prompts"])
    config = CLIPHingeConfig.from_dict({**state["config"]})
    model = build_model(config, [f"class {c}" for c in range(config.n_classes)])
    ckpt.load_model_state(model, state["model"])
    assert model.n_tasks == 1
    # The run continues from that checkpoint once lr is sane (a changed key needs --force).
    code, _, stderr = run_script(
        "run_split_cifar.py",
        [*FAST, "--output-dir", out, "--resume", "--force", "--set", "lr=0.01"],
        capsys,
        monkeypatch,
    )
    assert code == 0, stderr
    assert json.loads((out / "results.json").read_text())["finished"] is True


def test_smoke_preset_matches_the_documented_layout():
    assert SMOKE["total_tasks"] == N_TASKS
    assert SMOKE["init_epochs"] == SMOKE["epochs"] == EPOCHS


# ---- what a checkpoint holds ---------------------------------------------------------------
class StopAtExperience(SupervisedPlugin):
    """Interrupts the run (as Ctrl-C would) when experience ``index`` starts training."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def before_training_exp(self, strategy, **kwargs):
        if strategy.experience.current_experience == self.index:
            raise KeyboardInterrupt


def test_resume_restores_adapter_lora_heads_and_image_pairs(tmp_path):
    """Every optional learned part survives a checkpoint: the continued run is identical."""
    config = CLIPHingeConfig.from_dict(
        {
            **SMOKE,
            "total_tasks": 3,
            "init_epochs": 2,
            "epochs": 2,
            "second_stage_epochs": 1,
            "use_image_adapter": True,
            "use_image_hinge_loss": True,
            "image_hard_pair_threshold": -1.0,
            "use_lora_in_second_stage": True,
            "lora_layers": [0, 1],
            "lora_rank": 2,
        }
    )
    from avalanche_cliphinge.app.run_options import smoke_stream

    named_benchmark = smoke_stream(config)
    quiet = {"interactive": False, "log": lambda message: None}
    reference = run_experiment(config, named_benchmark, tmp_path / "reference", **quiet)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(
            config, named_benchmark, tmp_path / "run", plugins=[StopAtExperience(2)], **quiet
        )
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "exp_001.pt")
    assert state["model"]["adapter"] is not None and set(state["model"]["lora"]) == {"task1"}
    assert set(state["model"]["heads"]) == {"1"}
    resumed = run_experiment(config, named_benchmark, tmp_path / "run", resume=True, **quiet)
    assert any(pairs["image"] for pairs in resumed["hard_pairs"])
    for key in SAME_RESULTS:
        assert resumed[key] == reference[key], key


# ---- checkpoints that cannot continue this run (issue 14) -------------------------------------
def test_forged_newest_checkpoint_falls_back_and_all_forged_is_an_error(
    unfinished, capsys, monkeypatch
):
    newest = unfinished / "checkpoints" / "exp_002.pt"
    state = torch.load(newest, weights_only=True)
    torch.save({**state, "completed": -1}, newest)
    previous = unfinished / "checkpoints" / "exp_001.pt"
    older = torch.load(previous, weights_only=True)
    torch.save({**older, "config": list(older["config"].items())}, previous)
    before = snapshot(unfinished)
    code, _, stderr = resume(unfinished, capsys, monkeypatch)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith(
        f"error: no usable checkpoint in {unfinished / 'checkpoints'}: "
        "exp_002.pt, exp_001.pt cannot be read"
    )
    assert snapshot(unfinished) == before
    torch.save(older, previous)  # the previous one intact again: used, with a warning
    code, stdout, stderr = resume(unfinished, capsys, monkeypatch)
    assert code == 0, stderr
    assert (
        f"warning: checkpoint {newest} is damaged or forged (completed=-1 is not a "
        "positive experience count)" in stdout
    )
    assert "resuming from exp_001.pt: after experience 1 (2 of 4 done)" in stdout


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            ["--set", "init_class=6", "--set", "total_tasks=3"],
            r"exp_002.pt was trained on tasks of \[4, 2, 2\] classes, but this stream's first 3 "
            r"tasks hold \[6, 2, 2\]",
        ),
        (
            ["--set", "increment=3", "--set", "total_tasks=3", "--set", "init_class=4"],
            r"exp_002.pt was trained on tasks of \[4, 2, 2\] classes, but this stream's first 3 "
            r"tasks hold \[4, 3, 3\]",
        ),
        (
            ["--set", "total_tasks=2", "--set", "init_class=8"],
            r"exp_002.pt was trained on tasks of \[4, 2, 2\] classes, but this stream's first 2 "
            r"tasks hold \[8, 2\]",
        ),
        (
            ["--set", "total_tasks=3"],
            r"exp_002.pt holds 3 experiences of a 4-experience stream, but this stream has 3",
        ),
        (
            ["--set", "n_ctx=6"],
            r"exp_002.pt has prompts of \[4\] context tokens, the config n_ctx=6",
        ),
    ],
    ids=["6+2+2", "4+3+3", "8+2", "4+2+2", "n_ctx"],
)
def test_checkpoint_of_another_layout_is_refused_even_with_force(
    changes, message, unfinished, capsys, monkeypatch
):
    before = snapshot(unfinished)
    code, _, stderr = resume(unfinished, capsys, monkeypatch, "--force", *changes)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr
    assert re.search(message, lines[0]), lines[0]
    assert lines[0].endswith(
        "--force cannot bridge that: resume with the config and data it "
        "was made with, or start again with --overwrite"
    )
    assert snapshot(unfinished) == before  # no CSV row, TensorBoard point or file written
