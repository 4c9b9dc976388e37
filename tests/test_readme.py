"""The README's Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_example_runs_and_learns():
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Python example.*?```python\n(.*?)```", readme, re.S).group(1)
    done = subprocess.run(
        [sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = float(re.search(r"stream accuracy ([0-9.]+)", done.stdout).group(1))
    assert accuracy > 0.5  # 10 classes: chance is 0.1
    expected = re.search(r"## Python example.*?Expected output: `([^`]+)`", readme, re.S)
    assert done.stdout.strip().splitlines()[-1] == expected.group(1)
