"""Helpers shared by the CLI test modules (imported by name: pytest puts tests/ on sys.path;
``tests.x`` would resolve to avalanche-lib's own ``tests`` package)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "experiments"
#: One epoch per task in stage 1 and in stage 2.
ONE_EPOCH = ["--set", "init_epochs=1", "--set", "epochs=1", "--set", "second_stage_epochs=1"]
#: A cheap smoke run: 2 tasks (4 + 2 classes), 1 epoch each.
FAST = [
    "--preset",
    "smoke",
    "--quiet",
    "--set",
    "total_tasks=2",
    *ONE_EPOCH,
]

#: The tiny random CLIP on a 2-task ImageNet-R tree (2 + 2 classes), 1 epoch each.
TINY_IMAGENET_R = [
    "--set",
    "model_name=cliphinge-tiny",
    "--set",
    "pretrained=null",
    "--set",
    "init_class=2",
    "--set",
    "increment=2",
    "--set",
    "total_tasks=2",
    *ONE_EPOCH,
    "--set",
    "class_order=natural",
]


#: ``python -c PROBE ARGS``: ``python -m avalanche_cliphinge ARGS``, then the exit code and
#: which heavy packages it imported, on stderr: ``exit 2 imported -`` (``-``: none of them).
PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['cliphinge', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('avalanche_cliphinge', run_name='__main__')\n"
    "except SystemExit as stop:\n"
    "    code = stop.code\n"
    "heavy = [m for m in ('avalanche', 'torch', 'open_clip') if m in sys.modules]\n"
    "print('exit', code, 'imported', ','.join(heavy) or '-', file=sys.stderr)\n"
)


def smoke_command(output_dir: Path, *extra: str):
    """The smoke preset as a subprocess command line."""
    return [
        sys.executable,
        str(SCRIPTS / "run_split_cifar.py"),
        "--preset",
        "smoke",
        "--output-dir",
        str(output_dir),
        "--quiet",
        *extra,
    ]


def uninterrupted_smoke_run(tmp_path_factory):
    """One finished smoke run per pytest session: ``(output dir, {returncode, stdout, stderr})``."""
    out = tmp_path_factory.getbasetemp() / "smoke_uninterrupted"
    record = tmp_path_factory.getbasetemp() / "smoke_uninterrupted.json"
    if not record.exists():
        proc = subprocess.run(
            smoke_command(out), cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        record.write_text(
            json.dumps(
                {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
            )
        )
    return out, json.loads(record.read_text())


def run_script(script: str, args, capsys, monkeypatch):
    """Run an experiment script in this process: ``(exit code, stdout, stderr)``."""
    monkeypatch.chdir(ROOT)
    argv = [str(SCRIPTS / script), *map(str, args)]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as stop:
        runpy.run_path(argv[0], run_name="__main__")
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def run_script_here(script: str, args):
    """Run an experiment script in this process outside a test (a module-scoped fixture, where
    ``capsys`` is not available): ``(exit code, stdout, stderr)``."""
    argv = [str(SCRIPTS / script), *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as stop,
    ):
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", argv)
        runpy.run_path(argv[0], run_name="__main__")
    return stop.value.code, out.getvalue(), err.getvalue()


def snapshot(folder: Path):
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
