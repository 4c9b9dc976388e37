"""benchmarks/gpu_check.py, the first GPU's one command, run on the CPU at tiny sizes.

Its figures are printed, never asserted here: what is asserted is that it runs, prints one
JSON line with every figure's key, passes its own checks (the eager and the captured step
learn and report the same, within the tolerances it reports) and says why it cannot run.
"""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import ROOT

#: what every ViT run reports
RUN_KEYS = {
    "run_s",
    "process_s",
    "phase_s",
    "stage1_ms_per_step",
    "stage2_ms_per_step",
    "compile_s",
    "graphs_compiled",
    "cudagraph_skips",
    "host_syncs_per_steady_step",
    "peak_mem_gib",
    "fell_back",
}


def gpu_check(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(done) -> dict:
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[0])


@pytest.mark.slow
def test_the_cpu_check_passes_and_prints_every_figure_in_one_json_line():
    done = gpu_check("--device", "cpu")
    report = one_line(done)
    assert done.returncode == 0, (report["failures"], done.stderr[-3000:])
    assert report["ok"] is True and report["failures"] == []
    assert report["device"] == "cpu" and report["backend"] == "eager"

    # (a) the eager and the captured step on the tiny CLIP: within the reported tolerances
    equality = report["equality"]
    assert equality["ok"] and equality["failures"] == [] and equality["fell_back"] == []
    assert equality["model"] == "cliphinge-tiny" and equality["precision"] == "fp32"
    for kind in ("learned", "reported"):
        tolerance = equality["tolerance"][kind]
        assert 0 < tolerance["rtol"] <= 1e-4 and 0 < tolerance["atol"] <= 1e-4, kind
    diffs = equality["max_abs_diff"]
    assert {"prompts", "adapter", "heads", "metrics", "stage2_losses"} <= set(diffs)
    assert all(0 <= diff <= 1e-3 for diff in diffs.values()), diffs
    # the frozen CLIP (one backbone shared by both runs): untouched by either
    assert diffs["clip"] == 0.0
    assert equality["parameters_compared"] > 0 and equality["metrics_compared"] > 0
    # 2 experiences of 3 epochs of 3 steps: the last task's optimizer stepped 9 times
    steps = equality["adam_steps"]
    assert steps["eager"] == steps["captured"] and set(steps["eager"]) == {9}
    assert equality["graphs_compiled"]["stage1"] >= 1 and equality["graphs_compiled"]["stage2"] >= 1

    # (b) the three timed runs (the tiny CLIP here), each with every figure
    runs = report["vit"]
    assert list(runs) == ["eager", "captured_cold", "captured_warm"]
    for name, run in runs.items():
        assert RUN_KEYS <= set(run), (name, RUN_KEYS - set(run))
        assert run["fell_back"] == [] and run["cudagraph_skips"] == 0
        assert run["run_s"] > 0 and run["process_s"] >= run["run_s"]
        assert run["host_syncs_per_steady_step"] is None and run["peak_mem_gib"] is None  # CUDA
        assert run["compile_step"] is (name != "eager")
    assert runs["eager"]["graphs_compiled"] == {"stage1": 0, "stage2": 0, "total": 0}
    for name in ("captured_cold", "captured_warm"):
        graphs = runs[name]["graphs_compiled"]
        assert graphs["stage1"] >= 1 and graphs["stage2"] >= 1, graphs
        assert graphs["total"] >= graphs["stage1"] + graphs["stage2"]
        assert runs[name]["compile_s"]["total"] > 0


def test_without_cuda_it_exits_2_with_one_line():
    done = gpu_check(env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device")
    assert "--device cpu" in lines[0]


def test_a_spent_budget_fails_the_check_in_its_one_line():
    done = gpu_check("--device", "cpu", "--budget-s", "0.5", timeout=120)
    report = one_line(done)
    assert done.returncode == 1 and report["ok"] is False
    assert len(report["failures"]) == 4  # the equality part and the three runs
    assert all("budget" in failure for failure in report["failures"]), report["failures"]


def test_a_bad_config_key_is_refused_before_any_run():
    done = gpu_check("--device", "cpu", "--set", "no_such_key=1", timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "no_such_key" in done.stderr.strip().splitlines()[-1]
