"""``cliphinge aggregate`` on bad inputs and a failing disk (issue 25): the right table, or one
``error:`` line with exit code 2, and the earlier summary whole.

The runs are finished ``results.json`` files written here (no training); the expected means
and standard deviations are worked out by hand in the comments.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avalanche_cliphinge.app import run_lock
from avalanche_cliphinge.app.aggregate import aggregate as aggregate_rows
from avalanche_cliphinge.app.command import main as command_main

SUMMARY = (
    "summary.md",
    "summary.csv",
    "summary.json",
    "summary_curve.png",
    "summary_curve.pdf",
)
#: seed -> (AIA, Last, AA, Forgetting, accuracy on seen classes after each task)
RUNS = {
    1: (80.0, 70.0, 72.0, 10.0, [90.0, 80.0, 75.0, 70.0]),
    2: (82.0, 72.0, 74.0, 8.0, [92.0, 82.0, 77.0, 72.0]),
    3: (87.0, 75.0, 77.0, 6.0, [95.0, 85.0, 80.0, 75.0]),
}


def write_run(folder, seed):
    aia, last, aa, forgetting, curve = RUNS[seed]
    folder.mkdir(parents=True)
    results = {
        "finished": True,
        "completed_tasks": len(curve),
        "metrics": {"AIA": aia, "Last": last, "AA": aa, "Forgetting": forgetting},
        "per_task": [{"all": value} for value in curve],
        "protocol": {
            "preset": "smoke",
            "stream": "synthetic",
            "seed": seed,
            "stream_classes_per_experience": [4, 2, 2, 2],
            "command": f"cliphinge run --preset smoke --seed {seed}",
        },
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def runs(tmp_path):
    """``{seed: folder}``: three finished smoke runs in ``tmp_path/runs``."""
    return {seed: write_run(tmp_path / "runs" / f"seed_{seed}", seed) for seed in RUNS}


@pytest.fixture(scope="module")
def old_summary(tmp_path_factory):
    """The files of a summary over seeds 1, 2, 3 (n=3), to copy as the earlier summary."""
    base = tmp_path_factory.mktemp("old")
    folders = [str(write_run(base / f"seed_{s}", s)) for s in RUNS]
    assert command_main(["aggregate", *folders, "--output-dir", str(base / "summary")]) == 0
    return base / "summary"


def aggregate(capsys, *args):
    code = command_main(["aggregate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def the_error(code, stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    return lines[0]


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- 1: one folder twice ---------------------------------------------------------------------
@pytest.mark.parametrize("again", ["same", "dot", "dotdot", "symlink"])
def test_a_folder_given_twice_is_refused_naming_it(runs, tmp_path, capsys, again):
    first = runs[1]
    second = {
        "same": str(first),
        "dot": f"{first.parent}/./{first.name}",  # the same path once . is dropped
        "dotdot": f"{first.parent}/../runs/{first.name}",
        "symlink": tmp_path / "link",
    }[again]
    if again == "symlink":
        second.symlink_to(first, target_is_directory=True)
    out = tmp_path / "summary"
    code, _, err = aggregate(capsys, first, runs[2], second, "--output-dir", out)
    shown = "" if again in ("same", "dot") else f" (again as {second})"
    assert the_error(code, err) == (
        f"error: {first} is given twice{shown}; pass each run folder once (a run counted "
        "twice weighs double in mean ± std)"
    )
    assert not out.exists()
    # each once: n=2, AIA (80 + 82) / 2 = 81, std |82 - 80| / sqrt(2) = 1.4142
    (row,) = aggregate_rows([first, runs[2]])
    assert (row["n"], row["seeds"]) == (2, [1, 2])
    assert row["AIA_mean"] == pytest.approx(81.0)
    assert row["AIA_std"] == pytest.approx(2**0.5)


# ---- 2: a folder a live run holds ----------------------------------------------------------
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
with run_lock.hold(sys.argv[2]) as lock:
    lock.announce()
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_finished_run_that_a_live_run_holds_is_refused(runs, tmp_path, capsys):
    held = runs[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run_lock.__file__, str(held)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        started = json.loads((held / run_lock.LOCK_NAME).read_text())["started"]
        out = tmp_path / "summary"
        code, _, err = aggregate(capsys, runs[1], held, "--output-dir", out)
        assert the_error(code, err) == (
            f"error: {held} is held by a live run (PID {proc.pid}, started {started}) that "
            "may rewrite or delete its results; wait for it to end, or leave it out"
        )
        assert not out.exists()
        assert proc.poll() is None  # the holder was not disturbed
    finally:
        proc.kill()
        proc.wait()
    # the lock of a process that is gone blocks nothing (its .lock file stays)
    assert (held / run_lock.LOCK_NAME).exists()
    assert [row["n"] for row in aggregate_rows([runs[1], held])] == [2]


# ---- 3: a full disk over an earlier summary --------------------------------------------------
@pytest.mark.parametrize(
    "failing, others",
    [("summary_curve.png", False), ("summary_curve.pdf", True)],
    ids=["png-own-folder", "pdf-shared-folder"],
)
def test_full_disk_leaves_the_earlier_summary_whole(
    runs, old_summary, tmp_path, capsys, monkeypatch, failing, others
):
    out = tmp_path / "summary"
    shutil.copytree(old_summary, out)
    if others:  # a folder that holds more than the summary: those files stay, always
        (out / "notes.txt").write_text("mine")
    before = contents(out)
    real_fsync = os.fsync

    def full_disk(fd):
        # the disk fills up while the `failing` file is flushed (delayed allocation)
        if failing in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    code, _, err = aggregate(capsys, runs[1], runs[2], "--output-dir", out)
    assert contents(out) == before  # byte for byte, n=3 everywhere
    assert the_error(code, err) == (
        f"error: cannot write to --output-dir {out} (No space left on device); the summary "
        "already there is unchanged; free some space, then run aggregate again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "summary"]  # no temp left
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert aggregate(capsys, runs[1], runs[2], "--output-dir", out)[0] == 0
    after = contents(out)
    assert sorted(after) == sorted(before)
    assert all(after[name] != before[name] for name in SUMMARY)  # the whole set is new
    assert json.loads(after["summary.json"])["rows"][0]["n"] == 2
    assert after["summary.csv"].decode().splitlines()[1].startswith("smoke,cliphinge,2,1 2,")
    assert "| smoke | cliphinge | 2 | 81.00 ± 1.41 |" in after["summary.md"].decode()
    if others:
        assert after["notes.txt"] == b"mine"


def test_file_size_limit_from_the_kernel_leaves_the_earlier_summary_whole(
    runs, old_summary, tmp_path
):
    """A real write failure: ``ulimit -f`` (50 kB) stops the 300 dpi PNG (about 100 kB) after
    the tables and the PDF would fit."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    out = tmp_path / "summary"
    shutil.copytree(old_summary, out)
    before = contents(out)
    proc = subprocess.run(
        [sys.executable, "-m", "avalanche_cliphinge", "aggregate", str(runs[1]), str(runs[2])]
        + ["--output-dir", str(out)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert contents(out) == before
    assert the_error(proc.returncode, proc.stderr) == (
        f"error: cannot write to --output-dir {out} (File too large); the summary already "
        "there is unchanged; free space or raise the file size limit (ulimit -f), then run "
        "aggregate again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "summary"]


# ---- 4: a results.json that is not a run's ----------------------------------------------------
@pytest.mark.parametrize(
    "content, problem",
    [
        (
            [1, 2],
            "holds a JSON list, not a run's results (an object with finished, protocol, "
            "metrics and per_task); pass the output folder of a cliphinge run",
        ),
        (
            {"finished": True},
            "lacks protocol, metrics, per_task; pass the output folder of a "
            "finished cliphinge run (a damaged one: run it again with --overwrite)",
        ),
    ],
    ids=["list", "finished-only"],
)
def test_results_that_are_not_a_runs_are_one_line(runs, tmp_path, capsys, content, problem):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps(content))
    out = tmp_path / "summary"
    code, _, err = aggregate(capsys, runs[1], bad, "--output-dir", out)
    assert the_error(code, err) == f"error: {bad / 'results.json'} {problem}"
    assert not out.exists()


def test_a_metric_that_is_not_a_number_is_named(runs, tmp_path, capsys):
    results = json.loads((runs[2] / "results.json").read_text())
    results["metrics"]["AIA"] = "n/a"
    del results["metrics"]["Last"]
    (runs[2] / "results.json").write_text(json.dumps(results))
    code, _, err = aggregate(capsys, runs[1], runs[2], "--output-dir", tmp_path / "summary")
    assert the_error(code, err) == (
        f'error: {runs[2] / "results.json"} lacks metrics.Last; has metrics.AIA = "n/a", not '
        "a finite number; pass the output folder of a finished cliphinge run (a damaged one: "
        "run it again with --overwrite)"
    )


# ---- 5: an --output-dir that is a file, or read-only ---------------------------------------
@pytest.mark.parametrize("below", [False, True], ids=["file", "below-a-file"])
def test_output_dir_that_is_a_file(runs, tmp_path, capsys, below):
    blocker = tmp_path / "summary"
    blocker.write_text("keep me")
    out = blocker / "sub" if below else blocker
    code, _, err = aggregate(capsys, runs[1], "--output-dir", out)
    where = f"lies below the file {blocker}" if below else "is a file"
    assert the_error(code, err) == (
        f"error: --output-dir {out} {where}, not a folder; choose another --output-dir"
    )
    assert blocker.read_text() == "keep me"


def test_read_only_output_dir_is_one_line_and_keeps_the_old_summary(
    runs, old_summary, tmp_path, capsys, monkeypatch
):
    """``ro`` behaves as a read-only mount: no folder or file can be created in it."""
    ro = tmp_path / "ro"
    out = ro / "summary"
    shutil.copytree(old_summary, out)
    before = contents(out)
    real_mkdir, real_open = os.mkdir, os.open

    def read_only(path):
        return str(os.path.abspath(path)).startswith(f"{ro}{os.sep}")

    def mkdir(path, *args, **kwargs):
        if read_only(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if read_only(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    code, _, err = aggregate(capsys, runs[1], runs[2], "--output-dir", out)
    assert the_error(code, err) == (
        f"error: cannot write to --output-dir {out} (Read-only file system); the summary "
        "already there is unchanged; choose a writable folder"
    )
    monkeypatch.undo()
    assert contents(out) == before
    assert sorted(p.name for p in ro.iterdir()) == ["summary"]
