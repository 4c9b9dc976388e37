"""The command's surfaces on bad input: a closed output pipe, a config file nested too deep,
``--config smoke``. Each gives the right answer, or one ``error:`` line and exit code 2.

The pipes are real: the reader's end is closed before the command writes, so every write
fails as under ``cliphinge presets | head -1`` once ``head`` has exited.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from avalanche_cliphinge.app import command

from cli_helpers import ROOT

PRESET_NAMES = sorted(
    path.stem for path in (ROOT / "avalanche_cliphinge" / "configs").glob("*.json")
)


def one_error_line(code, stderr) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    return lines[0]


def closed_pipe() -> int:
    """The writing end of a pipe whose reading end is already closed."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize(
    "args, buffered",
    [
        (["presets"], False),  # each print written at once: the first fails
        (["--help"], False),
        (["presets"], True),  # block-buffered: the flush at the end fails
        (["--help"], True),
        (["presets", "--help"], True),
    ],
    ids=["presets", "help", "presets-buffered", "help-buffered", "presets-help-buffered"],
)
def test_output_closed_by_its_reader_ends_a_printing_command_quietly(args, buffered):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    write = closed_pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "avalanche_cliphinge", *args],
            cwd=ROOT,
            env=env,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_run_help_into_a_closed_pipe_is_quiet(monkeypatch, capsys):
    out = open(closed_pipe(), "w")  # block-buffered: the help fails at the flush
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert command.main(["run", "--help"]) == 0
    finally:
        out.close()  # what was left goes to the null device, without an error
    assert capsys.readouterr().err == ""


def test_a_command_cut_off_by_a_closed_pipe_says_it_stopped(monkeypatch, capsys):
    from avalanche_cliphinge.app import aggregate

    def long_table(argv):
        for row in range(20000):
            print(f"row {row}: a table longer than any pipe buffer")
        return 0

    monkeypatch.setattr(aggregate, "main", long_table)
    out = open(closed_pipe(), "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        code = command.main(["aggregate", "runs/x"])
    finally:
        out.close()
    assert one_error_line(code, capsys.readouterr().err) == (
        "error: the output of cliphinge aggregate was closed by the program reading it (a "
        "pipe); the command stopped: run it again with its output to a file (a run continues "
        "with --resume)"
    )


@pytest.mark.parametrize("kind", ["arrays", "objects"])
def test_a_config_nested_100000_deep_is_one_error_line(kind, tmp_path, monkeypatch, capsys):
    depth = 100_000
    text = "[" * depth + "]" * depth if kind == "arrays" else '{"a": ' * depth + "1" + "}" * depth
    config = tmp_path / "deep.json"
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    code = command.main(["run", "--config", str(config), "--output-dir", "out", "--quiet"])
    assert one_error_line(code, capsys.readouterr().err) == (
        f"error: {config} is not a config: its JSON is nested too deep to read (a config is "
        "one object of config keys, a list at most inside it); pass a preset name or a JSON "
        "config file (cliphinge presets)"
    )
    assert sorted(os.listdir(tmp_path)) == ["deep.json"]  # no output folder made


def test_config_smoke_points_to_the_preset_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no file called smoke here
    code = command.main(["run", "--config", "smoke", "--quiet"])
    assert one_error_line(code, capsys.readouterr().err) == (
        "error: config 'smoke' is neither a file nor a shipped preset of --config; 'smoke' is "
        "a --preset: pass --preset smoke instead of --config smoke (--config presets: "
        f"{', '.join(PRESET_NAMES)})"
    )
    assert os.listdir(tmp_path) == []
    # a file of that name is a config file like any other
    (tmp_path / "smoke").write_text("[1]")
    code = command.main(["run", "--config", "smoke", "--quiet"])
    assert one_error_line(code, capsys.readouterr().err) == (
        "error: smoke must hold one JSON object of config keys, got list"
    )
