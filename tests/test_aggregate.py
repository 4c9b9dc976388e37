"""``--seeds`` and ``cliphinge aggregate``: three smoke seeds into one row, checked with numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from avalanche_cliphinge.app.aggregate import aggregate
from avalanche_cliphinge.app.aggregate_inputs import AggregateError
from avalanche_cliphinge.app.cli import main as run_main
from avalanche_cliphinge.app.command import main as command_main

SEEDS = (1993, 1994, 1995)


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("seeds")
    code = run_main(
        ["--preset", "smoke", "--quiet", "--seeds", *map(str, SEEDS), "--output-dir", str(base)]
    )
    assert code == 0
    return base


@pytest.mark.slow
def test_seeds_run_one_after_the_other_in_their_own_folders(seed_runs):
    for seed in SEEDS:
        results = json.loads((seed_runs / f"seed_{seed}" / "results.json").read_text())
        assert results["finished"] and results["protocol"]["seed"] == seed


@pytest.mark.slow
def test_aggregate_equals_numpy_on_the_results_files(seed_runs, tmp_path, capsys):
    runs = [seed_runs / f"seed_{seed}" for seed in SEEDS]
    out = tmp_path / "summary"
    assert command_main(["aggregate", *map(str, runs), "--output-dir", str(out)]) == 0
    files = [json.loads((run / "results.json").read_text()) for run in runs]
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert (row["config"], row["method"], row["n"], row["seeds"]) == (
        "smoke",
        "cliphinge",
        3,
        list(SEEDS),
    )
    for metric in ("AIA", "Last", "AA", "Forgetting"):
        values = np.array([f["metrics"][metric] for f in files])
        assert row[f"{metric}_mean"] == pytest.approx(values.mean(), abs=1e-9)
        assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1), abs=1e-9)
    curves = np.array([[t["all"] for t in f["per_task"]] for f in files])
    assert row["curve"]["mean"] == pytest.approx(curves.mean(0).tolist())
    assert row["curve"]["std"] == pytest.approx(curves.std(0, ddof=1).tolist())
    assert row["curve"]["classes_seen"] == [4, 6, 8, 10]
    table = (out / "summary.md").read_text()
    aia = np.array([f["metrics"]["AIA"] for f in files])
    assert f"| smoke | cliphinge | 3 | {aia.mean():.2f} ± {aia.std(ddof=1):.2f} |" in table
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("config,method,n,seeds,AIA_mean,AIA_std")
    assert lines[1].startswith("smoke,cliphinge,3,1993 1994 1995,")
    for suffix in ("png", "pdf"):
        path = out / f"summary_curve.{suffix}"
        assert path.stat().st_size > 5000
    with Image.open(out / "summary_curve.png") as image:
        pixels = np.asarray(image.convert("L"))
        assert image.size[0] >= 1800  # 300 dpi
        assert pixels.std() > 10  # not blank


@pytest.mark.slow
def test_runs_of_other_protocols_are_refused_naming_the_keys(seed_runs, tmp_path):
    other = tmp_path / "other_lr"
    assert (
        run_main(["--preset", "smoke", "--quiet", "--set", "lr=0.02", "--output-dir", str(other)])
        == 0
    )
    with pytest.raises(AggregateError, match="differ in more than the seed: config.lr"):
        aggregate([seed_runs / "seed_1993", other])
    with pytest.raises(AggregateError, match="holds no results.json"):
        aggregate([tmp_path])
