"""``cliphinge compare`` with the CLIP baselines of issue 28: SimpleCIL, CoOp, RAPF and the joint
upper bounds beside zero-shot CLIP, iCaRL and CLIPHinge on the smoke stream.

One in-process run of the command (the issue's "Done when" entries, no ablations) feeds the
end-to-end tests; the rest checks the pieces (the upper-bound branch of the run loop, its
metrics, the table's marks and parameter counts) on small hand-made inputs.
"""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avalanche_cliphinge.app import compare_cli, compare_report
from avalanche_cliphinge.app import comparison as compare
from avalanche_cliphinge.app.compare_runs import Comparison, RunResult
from avalanche_cliphinge.app.loop import is_upper_bound, train_and_evaluate
from avalanche_cliphinge.app.results import upper_bound_metrics
from avalanche_cliphinge.app.run_options import SMOKE
from avalanche_cliphinge.config import CLIPHingeConfig

#: the entries of the issue's "Done when" command, in its order
ENTRIES = ["zeroshot", "simplecil", "coop", "rapf", "icarl", "cliphinge", "joint", "joint_probe"]
UPPER_BOUNDS = ["joint", "joint_probe"]
#: the tiny CLIP of the smoke stream: 64-d embedding, text width 64; the smoke stream's classes
EMBED_DIM, TEXT_WIDTH, N_CLASSES = 64, 64, 10


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``cliphinge compare --benchmark smoke --strategies <ENTRIES> --ablations`` in-process
    (torch's thread count restored after it: the command sets 1 for smoke)."""
    out = tmp_path_factory.mktemp("compare_clip")
    threads = torch.get_num_threads()
    try:
        code = compare_cli.main(
            ["--benchmark", "smoke", "--strategies", *ENTRIES, "--ablations"]
            + ["--output-dir", str(out), "--quiet"]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return {
        "dir": out,
        "csv": list(csv.DictReader(open(out / "comparison.csv"))),
        "json": json.loads((out / "comparison.json").read_text()),
        "md": (out / "comparison.md").read_text(),
    }


def table_lines(markdown: str):
    """The data rows of the first Markdown table, split into stripped cells."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows[1:]]


# ---- the command, end to end ----------------------------------------------------------------
def test_one_row_per_entry_upper_bounds_last_and_marked(compared):
    rows = compared["csv"]
    assert [r["entry"] for r in rows] == ENTRIES  # the upper bounds are already last here
    assert {r["entry"]: r["upper_bound"] for r in rows} == {
        e: str(e in UPPER_BOUNDS).lower() for e in ENTRIES
    }
    assert all(r["n_seeds"] == "1" for r in rows)
    lines = table_lines(compared["md"])
    assert [line[0] for line in lines] == [
        e + (" (upper bound)" if e in UPPER_BOUNDS else "") for e in ENTRIES
    ]
    assert [r["entry"] for r in compared["json"]["table"]] == ENTRIES
    assert [r["upper_bound"] for r in compared["json"]["table"]] == [
        e in UPPER_BOUNDS for e in ENTRIES
    ]


def test_upper_bounds_have_one_evaluation_and_no_forgetting(compared):
    runs = {r["entry"]: r for r in compared["json"]["runs"]}
    rows = {r["entry"]: r for r in compared["csv"]}
    for entry in UPPER_BOUNDS:
        run = runs[entry]
        assert run["upper_bound"] is True
        assert len(run["matrix"]) == 1 and None not in run["matrix"][0]  # every experience
        row, sizes = np.asarray(run["matrix"][0]), np.asarray(run["test_sizes"])
        assert len(row) == len(sizes) == SMOKE["total_tasks"]
        assert run["metrics"]["Last"] == pytest.approx(float((row * sizes).sum() / sizes.sum()))
        assert run["metrics"]["AA"] == pytest.approx(float(row.mean()))
        assert run["metrics"]["AIA"] is None and run["metrics"]["Forgetting"] is None
        assert run["stream_forgetting"] is None
        assert run["curve"] == [pytest.approx(run["metrics"]["Last"])]
        for key in ("AIA", "Forgetting", "stream_forgetting"):
            assert rows[entry][f"{key}_mean"] == ""
        assert 0 < float(rows[entry]["Last_mean"]) <= 100
    line = next(cells for cells in table_lines(compared["md"]) if cells[0].startswith("joint "))
    assert line[1] == line[4] == line[5] == "-"  # AIA, Forgetting, StreamForgetting
    for entry in set(ENTRIES) - set(UPPER_BOUNDS):
        run = runs[entry]
        assert run["upper_bound"] is False
        assert len(run["matrix"]) == SMOKE["total_tasks"]
        assert run["metrics"]["Forgetting"] is not None and run["stream_forgetting"] is not None


def test_trainable_parameters_column(compared):
    """What each entry learned, worked out from the tiny CLIP's sizes: zero-shot and SimpleCIL
    nothing, CoOp one shared context ``[n_ctx, width]``, RAPF a ``[dim, dim]`` adapter, iCaRL
    and the probe a linear layer over every class, CLIPHinge and joint their prompts and
    heads."""
    config = CLIPHingeConfig.from_json(compare_cli.DEFAULT_CONFIGS["smoke"]).replace(**SMOKE)
    linear = (EMBED_DIM + 1) * N_CLASSES
    expected = {
        "zeroshot": 0,
        "simplecil": 0,
        "coop": config.n_ctx * TEXT_WIDTH,
        "rapf": EMBED_DIM * EMBED_DIM,
        "icarl": linear,
        "joint_probe": linear,
    }
    runs = {r["entry"]: r["trainable_parameters"] for r in compared["json"]["runs"]}
    assert {e: runs[e] for e in expected} == expected
    # CLIPHinge: a context per task at least; joint: the same method on one task
    assert runs["cliphinge"] > config.n_ctx * TEXT_WIDTH * SMOKE["total_tasks"]
    assert runs["joint"] >= config.n_ctx * TEXT_WIDTH
    rows = {r["entry"]: r for r in compared["csv"]}
    assert {e: int(rows[e]["trainable_parameters_mean"]) for e in ENTRIES} == runs
    cells = {line[0].split(" ")[0]: line[-1] for line in table_lines(compared["md"])}
    assert cells["rapf"] == "4,096" and cells["zeroshot"] == "0"
    assert compared["md"].splitlines()[4].endswith("| trainable parameters |")


def test_protocol_names_the_clip_baselines(compared):
    described = compared["json"]["protocol"]["clip_baselines"]
    assert set(described) == {"simplecil", "coop", "rapf", "joint", "joint_probe", "input"}
    # the smoke stream is none of RAPF's datasets: its method values, the run's schedule
    assert "released no config for this stream" in described["rapf"]
    assert "batch 16" in described["rapf"] and "Euclidean distance < 0.55" in described["rapf"]
    assert (compared["dir"] / "tb" / "joint").is_dir()
    assert "upper bound" in (compared["dir"] / "comparison.md").read_text()


# ---- the pieces -----------------------------------------------------------------------------
def test_upper_bound_metrics_against_numpy():
    row, sizes = [90.0, 60.0, 30.0], [10, 20, 30]
    metrics = upper_bound_metrics(row, sizes)
    assert metrics["Last"] == pytest.approx((900 + 1200 + 900) / 60)
    assert metrics["AA"] == pytest.approx(60.0)
    assert metrics["AIA"] is None and metrics["Forgetting"] is None
    with pytest.raises(ValueError, match="one accuracy per test experience"):
        upper_bound_metrics([1.0], [1, 2])


class _Trained:
    """A stand-in strategy: records what ``train`` got, ``eval`` reports fixed accuracies."""

    upper_bound = True

    def __init__(self):
        self.trained = []

    def train(self, experiences, eval_streams=None):
        self.trained.append(experiences)

    def eval(self, stream):
        return {f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}": 0.5 for j in stream}


def test_the_loop_trains_an_upper_bound_once_on_the_whole_stream():
    strategy = _Trained()
    assert is_upper_bound(strategy) and not is_upper_bound(SimpleNamespace())
    train, test = ["e0", "e1", "e2"], [0, 1, 2]
    results = list(train_and_evaluate(strategy, train, test))
    assert strategy.trained == [train]  # one call, every experience
    assert len(results) == 1
    task = results[0]
    assert task.upper_bound and task.index == 2 and task.stream_forgetting is None
    assert task.trained_row == [50.0, 50.0, 50.0]
    with pytest.raises(ValueError, match="cannot start at experience 1"):
        list(train_and_evaluate(_Trained(), train, test, start=1))


def _run(entry, upper, last, parameters, seed=0):
    metrics = {"AIA": None if upper else 80.0, "AA": last, "Last": last}
    metrics["Forgetting"] = None if upper else 5.0
    return RunResult(
        entry=entry,
        seed=seed,
        matrix=[[last, last]] if upper else [[90.0, None], [80.0, last]],
        test_sizes=[5, 5],
        curve=[last] if upper else [90.0, last],
        metrics=metrics,
        stream_forgetting=None if upper else 4.0,
        train_seconds=1.0,
        peak_memory_mib=100.0,
        trainable_parameters=parameters,
        upper_bound=upper,
    )


def test_report_puts_upper_bounds_last_and_writes_every_format(tmp_path):
    entries = compare.resolve_entries(["joint", "naive", "rapf"], [])
    assert [e.kind for e in entries] == ["clip", "baseline", "clip"]
    result = Comparison(
        entries,
        [
            _run("joint", True, 97.0, 2560),
            _run("naive", False, 20.0, 650),
            _run("rapf", False, 60.0, 4096),
        ],
        [0],
        {"stream": {"classes_per_experience": [2, 2]}},
    )
    rows = compare_report.summarize(result)
    assert [r["entry"] for r in rows] == ["naive", "rapf", "joint"]
    table = compare_report.markdown_table(rows)
    assert "| joint (upper bound) | - | 97.00 | 97.00 | - | - |" in table
    assert table.splitlines()[2].endswith("| 650 |")
    compare_report.write_outputs(result, tmp_path)
    written = {r["entry"]: r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    assert written["joint"]["upper_bound"] == "true" and written["joint"]["AIA_mean"] == ""
    assert written["rapf"]["trainable_parameters_mean"] == "4096"
    table_json = json.loads((tmp_path / "comparison.json").read_text())["table"]
    assert table_json[-1]["Forgetting"] == [None] and table_json[-1]["upper_bound"] is True
    assert (tmp_path / "accuracy_vs_task.png").stat().st_size > 0


def test_parameter_cell_over_seeds():
    assert compare_report.format_count([262144, 262144]) == "262,144"
    assert compare_report.format_count([10, 20]) == "15 ± 7"
    assert compare_report.format_count([None]) == "-"
