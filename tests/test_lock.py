"""One writer per run folder: a second run into a locked folder is refused, whatever its flags.

The holder is always another process (``fcntl.flock`` locks belong to open files, so only a
second process shows the real behaviour): a small Python process holding the lock through
``run_lock.hold``, and a real smoke run. A holder that dies (SIGKILL) never blocks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from avalanche_cliphinge.app import run_lock

from cli_helpers import FAST, ROOT, run_script, smoke_command, snapshot

#: subprocess runs of the application: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

#: Holds the lock through ``run_lock`` loaded from its file, without importing the package
#: (and torch): the helper process starts in a fraction of a second.
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
with run_lock.hold(sys.argv[2]) as lock:
    if sys.argv[3] == "announce":
        lock.announce()
    print("held", flush=True)
    sys.stdin.read()
"""
REFUSAL = re.compile(
    r"^error: (?P<folder>.+) is in use by another run \(PID (?P<pid>\d+), "
    r"started (?P<started>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC)\); wait for it "
    r"to end or choose another --output-dir$"
)


def the_error(code, stderr) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    return lines[0]


def start_holder(folder, announce: bool = True) -> subprocess.Popen:
    """A live process holding the lock of ``folder`` (it waits for its stdin to close)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER,
            run_lock.__file__,
            str(folder),
            "announce" if announce else "quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    """``(folder, process)``: a folder locked by another live process for the whole module."""
    folder = tmp_path_factory.mktemp("locked") / "run"
    folder.mkdir()
    (folder / "results.json").write_text('{"finished": false}')
    proc = start_holder(folder)
    yield folder, proc
    stop(proc)


@pytest.mark.parametrize(
    "extra",
    [[], ["--resume"], ["--overwrite"], ["--set", "lr=0.5", "--overwrite"]],
    ids=["fresh", "resume", "overwrite", "another-config"],
)
def test_second_run_into_a_locked_folder_is_refused_naming_the_holder(
    holder, extra, capsys, monkeypatch
):
    folder, proc = holder
    before = snapshot(folder)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", folder, *extra], capsys, monkeypatch
    )
    match = REFUSAL.match(the_error(code, stderr))
    assert match, stderr
    assert match["folder"] == str(folder) and int(match["pid"]) == proc.pid
    assert snapshot(folder) == before
    assert proc.poll() is None  # the holder was not disturbed


def test_lock_of_a_killed_process_never_blocks(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    proc = start_holder(folder)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((folder / run_lock.LOCK_NAME).read_text())["pid"] == proc.pid  # stale
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", folder], capsys, monkeypatch
    )
    assert code == 0, stderr
    assert json.loads((folder / "results.json").read_text())["finished"] is True
    assert (folder / run_lock.LOCK_NAME).read_text() == ""  # emptied when the run ended


def test_lock_is_reentrant_in_one_process_and_exclusive_between_processes(tmp_path):
    with run_lock.hold(tmp_path) as outer:
        with run_lock.hold(tmp_path) as inner:
            assert inner is outer
    proc = start_holder(tmp_path, announce=False)
    try:
        with pytest.raises(
            run_lock.RunLockedError, match=f"in use by another run \\(PID {proc.pid}, "
        ):
            with run_lock.hold(tmp_path):
                pass
    finally:
        stop(proc)
    with run_lock.hold(tmp_path) as lock:  # free again once the holder is gone
        lock.announce()
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / run_lock.LOCK_NAME).read_text() == ""


@pytest.mark.slow
def test_a_real_run_in_progress_refuses_a_second_run(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    command = smoke_command(
        folder,
        "--set",
        "total_tasks=2",
        "--set",
        "init_epochs=2",
        "--set",
        "epochs=2",
        "--set",
        "second_stage_epochs=1",
    )
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lock_file = folder / run_lock.LOCK_NAME
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if lock_file.exists() and lock_file.read_text():
            break
        time.sleep(0.05)
    try:
        assert proc.poll() is None, proc.stdout.read()
        code, _, stderr = run_script(
            "run_split_cifar.py",
            [*FAST, "--output-dir", folder, "--overwrite"],
            capsys,
            monkeypatch,
        )
        match = REFUSAL.match(the_error(code, stderr))
        assert match and int(match["pid"]) == proc.pid, stderr
    finally:
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["finished"] is True and results["completed_tasks"] == 2


def test_a_holder_is_named_from_the_moment_it_takes_the_lock(tmp_path, capsys, monkeypatch):
    # a run still loading its model has only taken the lock (announce comes later)
    proc = start_holder(tmp_path, announce=False)
    try:
        holder = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
        code, _, stderr = run_script(
            "run_split_cifar.py", [*FAST, "--output-dir", tmp_path], capsys, monkeypatch
        )
        match = REFUSAL.match(the_error(code, stderr))
        assert match and int(match["pid"]) == proc.pid, stderr
        assert match["started"] == holder["started"] and holder["pid"] == proc.pid
    finally:
        stop(proc)


def test_a_lock_file_deleted_by_hand_still_refuses_a_second_run(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text('{"finished": false}')
    proc = start_holder(folder)
    try:
        (folder / run_lock.LOCK_NAME).unlink()
        before = snapshot(folder)
        code, _, stderr = run_script(
            "run_split_cifar.py",
            [*FAST, "--output-dir", folder, "--overwrite"],
            capsys,
            monkeypatch,
        )
        assert the_error(code, stderr) == (
            f"error: {folder} is in use by another run (PID {proc.pid}; its .lock file was "
            "deleted, the lock holds all the same); wait for it to end or choose another "
            "--output-dir"
        )
        assert snapshot(folder) == before and proc.poll() is None
    finally:
        stop(proc)


def test_a_deleted_lock_file_is_written_again_at_the_next_write_boundary(tmp_path):
    path = tmp_path / run_lock.LOCK_NAME
    with run_lock.hold(tmp_path):
        first = json.loads(path.read_text())
        path.unlink()
        run_lock.check(tmp_path)
        assert json.loads(path.read_text()) == first and first["pid"] == os.getpid()
        with pytest.raises(run_lock.RunLockedError, match=f"PID {os.getpid()}, started "):
            run_lock._lock_folder(tmp_path)  # a second open of the folder is refused
    assert path.read_text() == ""


@pytest.mark.parametrize("owner", ["another user", "this user"])
def test_a_lock_file_this_user_cannot_open_gets_advice_about_that_file(
    owner, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "run"
    folder.mkdir()
    lock_file = folder / run_lock.LOCK_NAME
    lock_file.write_text("")
    root = os.geteuid() == 0
    owner_uid = 65534 if root else os.geteuid()
    if owner == "another user":
        if root:
            os.chown(lock_file, owner_uid, owner_uid)
        else:  # only root gives a file away: this process plays another user instead
            monkeypatch.setattr(os, "geteuid", lambda: owner_uid + 1)
    lock_file.chmod(0)
    if root:  # root opens any file: the refusal a user gets, simulated
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if str(path) == str(lock_file) and flags & os.O_RDWR:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", folder], capsys, monkeypatch
    )
    if owner == "another user":
        import pwd

        name = pwd.getpwuid(owner_uid).pw_name
        want = (
            f"error: cannot open the lock file {lock_file} (Permission denied): it belongs to "
            f"user {name}; if no run of theirs uses {folder}, remove it (rm {lock_file}; it "
            "holds no results), or choose another --output-dir"
        )
    else:
        want = (
            f"error: cannot open the lock file {lock_file} (Permission denied); make it "
            f"readable and writable (chmod u+rw {lock_file}) or remove it (it holds no "
            "results), or choose another --output-dir"
        )
    assert the_error(code, stderr) == want
    assert [p.name for p in folder.iterdir()] == [run_lock.LOCK_NAME]  # nothing written
    assert lock_file.stat().st_mode & 0o777 == 0 and lock_file.stat().st_size == 0


def test_a_run_writes_its_deleted_lock_file_again_before_the_next_experience(
    tmp_path, capsys, monkeypatch
):
    from avalanche_cliphinge.app import experiment

    folder = tmp_path / "run"
    lock_file = folder / run_lock.LOCK_NAME
    seen = {}

    def at_boundary(point, index=None):
        if point == "results" and index == 0:
            lock_file.unlink()  # by hand, during experience 0's writes
        if point == "results" and index == 1:
            seen["lock"] = json.loads(lock_file.read_text())

    monkeypatch.setattr(experiment, "kill_point", at_boundary)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", folder], capsys, monkeypatch
    )
    assert code == 0, stderr
    assert seen["lock"]["pid"] == os.getpid()  # back before experience 1's results
    assert lock_file.read_text() == ""  # and emptied at the end, as ever


def test_a_lock_file_that_is_a_folder_is_named(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    (folder / run_lock.LOCK_NAME).mkdir(parents=True)
    code, _, stderr = run_script(
        "run_split_cifar.py", [*FAST, "--output-dir", folder], capsys, monkeypatch
    )
    assert the_error(code, stderr) == (
        f"error: {folder / run_lock.LOCK_NAME} is a folder, not a lock file; remove it (rmdir "
        f"{folder / run_lock.LOCK_NAME}), or choose another --output-dir"
    )
    assert [p.name for p in folder.iterdir()] == [run_lock.LOCK_NAME]
