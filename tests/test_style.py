"""The project's one formatter and linter (ruff, configured in pyproject.toml) hold on the tree."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff() -> str:
    """The ruff executable next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).with_name("ruff")
    found = str(local) if local.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: `pip install -r requirements.txt` (it pins ruff)")
    return found


@pytest.mark.parametrize("args", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_tree_is_formatted_and_lint_free(args):
    done = subprocess.run([ruff(), *args, "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"`ruff {' '.join(args)}` found problems; run `make format`:\n{done.stdout}{done.stderr}"
    )
