"""The package as a user installs it: one top-level name, the ``cliphinge`` command from any
folder, the method importable without the application, a saved model used by ``predict``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "avalanche_cliphinge"
SHARED_JPEGS = REPO.parent / "shared/data/cifar10-jpeg-subset"


def run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_importing_the_method_loads_no_application_module(tmp_path):
    probe = (
        "import json, sys, avalanche_cliphinge as package\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'avalanche', "
        "'open_clip'})\n"
        "bare = heavy()\n"
        "package.CLIPHingeStrategy, package.CLIPHingeModel\n"
        "import avalanche_cliphinge.benchmarks\n"
        "print(json.dumps([bare, heavy(), "
        "[m for m in sys.modules if m.startswith('avalanche_cliphinge.app')]]))"
    )
    done = run([sys.executable, "-c", probe], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bare, used, application = json.loads(done.stdout)
    assert bare == []  # the public names are imported on first use
    assert used == ["avalanche", "open_clip", "torch"]
    assert application == []
    # and no method module names the application, even lazily inside a function
    for path in PACKAGE.rglob("*.py"):
        if "app" in path.relative_to(PACKAGE).parts or path.name == "__main__.py":
            continue
        text = path.read_text()
        assert not re.search(r"from \.+app\b|avalanche_cliphinge\.app\b", text), path


@pytest.mark.slow
def test_command_usage_and_unknown_command(tmp_path, capsys):
    from avalanche_cliphinge.app.command import main

    bare = run([sys.executable, "-m", "avalanche_cliphinge"], cwd=tmp_path)
    assert bare.returncode == 2 and "usage: cliphinge" in bare.stdout
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for command in ("run", "compare", "presets", "evaluate", "predict", "aggregate"):
        assert f"\n  {command}" in shown
    assert main(["train"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown command 'train'; choose run, compare, presets, evaluate, predict or "
        "aggregate (cliphinge --help)"
    ]
    assert main(["presets"]) == 0
    assert (
        "rapf_cifar100_b0_inc10 (--config rapf_cifar100_b0_inc10)\n    CIFAR-100"
        in capsys.readouterr().out
    )


def test_every_public_name_resolves_and_an_unknown_one_is_an_attribute_error():
    import avalanche_cliphinge as package
    from avalanche_cliphinge.config import CLIPHingeConfig
    from avalanche_cliphinge.strategy import CLIPHingeStrategy

    namespace = {}
    exec("from avalanche_cliphinge import *", namespace)
    assert set(package.__all__) == {*package._EXPORTS, "__version__"}
    assert set(package.__all__) <= set(namespace) and set(package.__all__) <= set(dir(package))
    assert namespace["CLIPHingeStrategy"] is CLIPHingeStrategy
    assert package.CLIPHingeConfig is CLIPHingeConfig
    with pytest.raises(AttributeError, match="has no attribute 'CLIPHingeStrateg'"):
        _ = package.CLIPHingeStrateg


def test_default_threads():
    from avalanche_cliphinge.app.cli import default_threads

    cores = len(os.sched_getaffinity(0))
    assert default_threads() == (1 if cores <= 2 else min(cores, 8))


@pytest.mark.slow
def test_wheel_installs_one_package_whose_command_runs_from_any_folder(tmp_path):
    # a copy of the checkout: building writes build/ and *.egg-info beside the sources
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__"
        ),
    )
    wheels = tmp_path / "wheels"
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("avalanche_cliphinge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"avalanche_cliphinge"}
    assert "avalanche_cliphinge/configs/cifar100_b0_inc10.json" in names
    assert "avalanche_cliphinge/model/configs/cliphinge-tiny.json" in names
    target = tmp_path / "site"
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "benchmarks").mkdir()  # a user's own folder of that name
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = run(
        [sys.executable, "-c", "import avalanche_cliphinge; print(avalanche_cliphinge.__file__)"],
        cwd=elsewhere,
        env=env,
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    out = elsewhere / "runs" / "smoke"
    smoke = run(
        [
            str(target / "bin" / "cliphinge"),
            "run",
            "--preset",
            "smoke",
            "--quiet",
            "--output-dir",
            str(out),
        ],
        cwd=elsewhere,
        env=env,
        timeout=600,
    )
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    assert "Last                      94.67" in smoke.stdout  # the smoke numbers
    assert (out / "final_model.pt").is_file()
    images = sorted(SHARED_JPEGS.glob("test/*/*.jpg"))[:2]
    if not images:  # a clone without ../shared: two JPEGs of its own
        rng = np.random.default_rng(0)
        images = [elsewhere / f"photo_{i}.jpg" for i in range(2)]
        for path in images:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    predicted = run(
        [
            str(target / "bin" / "cliphinge"),
            "predict",
            "--model",
            str(out / "final_model.pt"),
            *map(str, images),
        ],
        cwd=elsewhere,
        env=env,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    lines = predicted.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(p) for p in images]
    assert all(line.count("(") == 5 for line in lines)  # top 5 names with their scores


def test_qpsolvers_warning_without_solvers_is_not_shown_once_the_package_is_imported():
    """An environment where no QP solver imports (a bare wheel install): qpsolvers warns at
    import; after ``import avalanche_cliphinge`` (which Avalanche's GEM import follows) not."""
    solvers = Path(importlib.util.find_spec("qpsolvers").origin).parent / "solvers"
    names = re.findall(r"^\s+from \.(\w+_) import", (solvers / "__init__.py").read_text(), re.M)
    assert names, "qpsolvers' solvers/__init__.py lists no solver modules to block"
    block = "".join(f"sys.modules['qpsolvers.solvers.{n}'] = None\n" for n in names)
    shown = {}
    for first in ("", "import avalanche_cliphinge\n"):
        code = f"import sys, warnings\nwarnings.simplefilter('default')\n{block}{first}"
        code += "import qpsolvers\nprint(qpsolvers.available_solvers)\n"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "[]"
        shown[bool(first)] = "no QP solver found" in done.stderr
    assert shown == {False: True, True: False}
