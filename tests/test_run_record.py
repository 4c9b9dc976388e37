"""The record of a run (results.json's ``protocol``) and the device check.

The protocol names the command that runs the run again as typed, when the run began (a
resumed run keeps its first start), the git commit of the code, and a config file (with what
it reproduces) only while the run follows that file's dataset, layout and class order.
``--device cuda`` on a machine without it is one line before anything slow; ``--debug``
shows what a failed weights download really raised. Runs are in-process.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import torch

from avalanche_cliphinge.app import command
from avalanche_cliphinge.app.cli import rerun_command
from avalanche_cliphinge.app.run_record import config_record, git_commit
from avalanche_cliphinge.app.figure_data import run_title
from avalanche_cliphinge.config import CLIPHingeConfig, config_reproduces
from avalanche_cliphinge.model.backbone import BackboneError, load_clip

from cli_helpers import FAST, ROOT

SMOKE_CHANGES = ["dataset", "init_class", "increment", "total_tasks", "class_order"]


def run_cli(argv, capsys):
    """``cliphinge ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    code = command.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def git_here():
    """The checkout's commit and dirty flag, read with the git command line; ``None`` for an
    installed package."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


# ---- the protocol of a finished run ----------------------------------------------------------
def test_the_recorded_command_runs_the_run_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", *FAST, "--output-dir", "out"]
    before, code_before = datetime.now(timezone.utc).replace(microsecond=0), git_here()
    code, _, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    after, code_after = datetime.now(timezone.utc), git_here()
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    protocol = first["protocol"]
    assert protocol["command"] == "cliphinge run " + " ".join(argv[1:])
    created = datetime.fromisoformat(protocol["created"])  # ISO 8601 with its UTC offset
    assert created.tzinfo is not None and before <= created <= after
    # (a commit may land in this checkout while the run goes: either side of it)
    assert protocol["git_commit"] in (code_before, code_after)
    # the smoke preset replaced the file's dataset, layout and order: no claim of the file
    assert protocol["preset"] == "smoke"
    assert protocol["config_file"] is None and protocol["reproduces"] is None
    assert protocol["config_modified"] == {
        "config_file": "cifar100_b0_inc10",
        "changed": SMOKE_CHANGES,
    }
    assert run_title(protocol) == "CLIPHinge, synthetic patterns B4 Inc2 (preset smoke)"
    # the command as recorded runs again (plus --overwrite: the folder holds a finished run)
    words = shlex.split(protocol["command"])
    assert words[:2] == ["cliphinge", "run"]
    code, _, stderr = run_cli([*words[1:], "--overwrite"], capsys)
    assert code == 0, stderr
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    assert again["protocol"]["command"] == protocol["command"] + " --overwrite"


def test_a_resumed_run_keeps_when_it_began(tmp_path, monkeypatch, capsys):
    """Interrupted after experience 0, resumed: ``created`` and ``git_commit`` are the first
    start's; code that changed in between is named in ``git_commit_resumed``."""
    from avalanche_cliphinge.app import experiment

    monkeypatch.chdir(tmp_path)
    first_code = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(experiment, "now_iso", lambda: "2001-02-03T04:05:06+00:00")
    monkeypatch.setattr(experiment, "git_commit", lambda: first_code)
    real_kill_point = experiment.kill_point

    def interrupt(point, index=None):
        if (point, index) == ("results", 1):
            raise KeyboardInterrupt
        real_kill_point(point, index)

    monkeypatch.setattr(experiment, "kill_point", interrupt)
    code, _, stderr = run_cli(["run", *FAST, "--output-dir", "out"], capsys)
    assert code == 130 and "continue with the same command plus --resume" in stderr
    monkeypatch.setattr(experiment, "kill_point", real_kill_point)
    monkeypatch.setattr(experiment, "now_iso", lambda: "2099-01-01T00:00:00+00:00")
    later_code = {"commit": "b" * 40, "dirty": True}
    monkeypatch.setattr(experiment, "git_commit", lambda: later_code)
    code, stdout, stderr = run_cli(["run", *FAST, "--output-dir", "out", "--resume"], capsys)
    assert code == 0, stderr
    assert "resuming from exp_000.pt" in stdout
    protocol = json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]
    assert protocol["created"] == "2001-02-03T04:05:06+00:00"
    assert protocol["git_commit"] == first_code
    assert protocol["git_commit_resumed"] == later_code


def test_config_file_named_only_while_the_run_follows_it():
    preset = CLIPHingeConfig.from_json("cifar100_b0_inc10")
    # other keys (epochs, seed) keep the file's protocol
    kept = config_record("cifar100_b0_inc10", preset.replace(epochs=3, seed=7))
    assert kept == {
        "config_file": "cifar100_b0_inc10",
        "preset": None,
        "reproduces": config_reproduces("cifar100_b0_inc10"),
        "config_modified": None,
    }
    assert kept["reproduces"].startswith("CIFAR-100 B0 Inc10")
    assert run_title({**kept, "stream_dataset": "cifar100", "stream_init_class": 10}) == (
        "CLIPHinge, CIFAR-100 (cifar100_b0_inc10)"
    )
    other = preset.replace(class_order="natural", init_class=50, total_tasks=6)
    changed = config_record("cifar100_b0_inc10", other)
    assert changed == {
        "config_file": None,
        "preset": None,
        "reproduces": None,
        "config_modified": {
            "config_file": "cifar100_b0_inc10",
            "changed": ["init_class", "total_tasks", "class_order"],
        },
    }
    stream = {"stream_dataset": "cifar100", "stream_init_class": 50, "stream_increment": 10}
    assert run_title({**changed, **stream}) == "CLIPHinge, CIFAR-100 B50 Inc10"


def test_rerun_command_as_typed(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["experiments/run_split_cifar.py", "--preset", "smoke", "--set", "a=b c"]
    )
    assert rerun_command("run_split_cifar.py", None) == (
        "python experiments/run_split_cifar.py --preset smoke --set 'a=b c'"
    )
    main_file = "/site-packages/avalanche_cliphinge/__main__.py"
    monkeypatch.setattr(sys, "argv", [main_file, "run", "--preset", "smoke"])
    assert rerun_command("cliphinge run", ["--preset", "smoke"]) == (
        "python -m avalanche_cliphinge run --preset smoke"
    )
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/cliphinge", "run", "--preset", "smoke"])
    assert rerun_command("cliphinge run", ["--preset", "smoke"]) == "cliphinge run --preset smoke"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_commit_of_a_checkout_and_without_git(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "sub" / "code.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "new.py").write_text("y = 2\n")
    assert git_commit(repo) == {"commit": head, "dirty": True}
    assert git_commit(repo / "sub") is None  # inside a checkout, not its top: another project
    assert git_commit(tmp_path) is None  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path / "no_git_here"))
    assert git_commit(repo) is None  # git missing: no record, no error


# ---- the device ---------------------------------------------------------------------------------
def _no_model(*args, **kwargs):
    raise AssertionError("CLIP was loaded before the device was checked")


def test_a_device_this_machine_lacks_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("avalanche_cliphinge.model.backbone.load_clip", _no_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:3"):
        code, _, stderr = run_cli(
            ["run", "--preset", "smoke", "--device", device, "--output-dir", "out"], capsys
        )
        assert code == 2
        assert stderr == (
            f"error: --device {device}: this machine has no CUDA device "
            "(torch.cuda.is_available() is False); use --device cpu\n"
        )
    code, _, stderr = run_cli(
        ["compare", "--benchmark", "smoke", "--device", "cuda", "--output-dir", "cmp"], capsys
    )
    assert code == 2 and stderr.startswith("error: --device cuda: this machine has no CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, stderr = run_cli(
        ["run", "--preset", "smoke", "--device", "cuda:3", "--output-dir", "out"], capsys
    )
    assert code == 2
    assert stderr == (
        "error: --device cuda:3: this machine has 1 CUDA device (cuda:0); use one of them "
        "or --device cpu\n"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cmp").exists()


def test_debug_shows_what_a_weights_download_raised(tmp_path, monkeypatch, capsys):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("HTTPSConnectionPool: Max retries exceeded (name resolution)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    argv = ["run", "--preset", "smoke", "--set", "model_name=ViT-B-16-quickgelu"]
    argv += ["--set", "pretrained=openai", "--quiet"]
    code, _, stderr = run_cli([*argv, "--output-dir", "a"], capsys)
    assert code == 2
    assert stderr.startswith("error: could not fetch the 'openai' weights of ViT-B-16-quickgelu")
    assert "(RuntimeError: HTTPSConnectionPool: Max retries exceeded (name resolution))" in stderr
    with pytest.raises(BackboneError) as raised:
        command.main([*argv, "--output-dir", "b", "--debug"])
    cause = raised.value.__cause__
    assert isinstance(cause, RuntimeError) and "Max retries exceeded" in str(cause)
    # random weights download nothing: open_clip's own error, not a download message
    with pytest.raises(RuntimeError, match="Max retries") as raised:
        load_clip("cliphinge-tiny", None)
    assert not isinstance(raised.value, BackboneError)


def test_aggregate_takes_runs_that_began_at_other_times_or_commits(tmp_path, capsys):
    """``--seeds`` runs differ in when they began and may straddle a commit: one row; another
    dataset is still refused."""
    folders = []
    for seed, commit in ((1, "a" * 40), (2, "b" * 40)):
        folder = tmp_path / f"seed_{seed}"
        folder.mkdir()
        results = {
            "finished": True,
            "completed_tasks": 2,
            "metrics": {"AIA": 80.0 + seed, "Last": 70.0, "AA": 72.0, "Forgetting": 5.0},
            "per_task": [{"all": 90.0}, {"all": 70.0}],
            "protocol": {
                "preset": "smoke",
                "seed": seed,
                "stream_classes_per_experience": [4, 2],
                "command": f"cliphinge run --preset smoke --seed {seed}",
                "created": f"2030-01-0{seed}T00:00:00+00:00",
                "git_commit": {"commit": commit, "dirty": seed == 2},
                "config": {"dataset": "synthetic", "seed": seed},
            },
        }
        (folder / "results.json").write_text(json.dumps(results))
        folders.append(folder)
    code, _, stderr = run_cli(["aggregate", *folders, "--output-dir", tmp_path / "s"], capsys)
    assert code == 0, stderr
    rows = json.loads((tmp_path / "s" / "summary.json").read_text())["rows"]
    assert [(r["config"], r["n"], r["seeds"], r["AIA_mean"]) for r in rows] == [
        ("smoke", 2, [1, 2], 81.5)  # AIA 81 and 82
    ]
    other = json.loads((folders[1] / "results.json").read_text())
    other["protocol"]["config"]["dataset"] = "image_folder"
    (folders[1] / "results.json").write_text(json.dumps(other))
    code, _, stderr = run_cli(["aggregate", *folders, "--output-dir", tmp_path / "t"], capsys)
    assert code == 2 and "config.dataset" in stderr
