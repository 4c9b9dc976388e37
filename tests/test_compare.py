"""experiments/compare.py and avalanche_cliphinge.app.comparison: every entry on one stream, one table.

One subprocess run of the script on the smoke stream (all default entries) feeds several tests;
the rest runs in-process on the same smoke stream with the tiny random CLIP.
"""

import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_cliphinge import CLIPHingeConfig, CLIPHingeStrategy, SecondStagePlugin
from avalanche_cliphinge.app import comparison as compare
from avalanche_cliphinge.app import compare_cli, compare_features, compare_report, compare_runs
from avalanche_cliphinge.app.run_options import SMOKE, smoke_stream
from avalanche_cliphinge.app.loop import train_and_evaluate
from avalanche_cliphinge.app.results import cil_metrics
from avalanche_cliphinge.model.cliphinge_model import UNSEEN_SCORE
from avalanche_cliphinge.seeding import seed_everything
from avalanche_cliphinge.strategy import build_model
from avalanche_cliphinge.streams import ClipInput

#: subprocess runs of the application: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "compare.py"
SMOKE_LIMIT_S = 180
#: the upper bounds among the defaults: the table puts them last, without AIA or forgetting
UPPER_BOUNDS = ["joint", "joint_probe"]
DEFAULT_ENTRIES = (
    [s for s in compare.DEFAULT_STRATEGIES if s not in UPPER_BOUNDS]
    + [f"cliphinge_{a}" for a in compare.ABLATIONS]
    + UPPER_BOUNDS
)


def smoke_config(**overrides) -> CLIPHingeConfig:
    """The config ``--benchmark smoke`` runs CLIPHinge with."""
    config = CLIPHingeConfig.from_json(compare_cli.DEFAULT_CONFIGS["smoke"]).replace(**SMOKE)
    return config.replace(**overrides)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The smoke script runs torch single-threaded (--threads 1): so do the in-process runs, for
    speed and for bit-identical numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``compare.py --benchmark smoke`` with every default entry, in a subprocess, timed."""
    out = tmp_path_factory.mktemp("compare_smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--benchmark", "smoke", "--output-dir", str(out), "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "dir": out,
        "stdout": proc.stdout,
        "wall": wall,
        "cpu": cpu,
        "json": json.loads((out / "comparison.json").read_text()),
        "csv": list(csv.DictReader(open(out / "comparison.csv"))),
    }


@pytest.fixture(scope="module")
def smoke_setup():
    """Backbone, stream and feature stream of the smoke comparison, built in-process."""
    config = smoke_config()
    backbone = compare_runs.load_backbone(config, config.seed)
    named_benchmark = smoke_stream(config)
    return (
        config,
        backbone,
        named_benchmark,
        compare_features.extract_feature_stream(named_benchmark, backbone),
    )


# ---- the script, end to end -----------------------------------------------------------------
def test_smoke_comparison_finishes_offline_in_time(smoke_run):
    print(
        f"\ncompare.py --benchmark smoke: {smoke_run['wall']:.1f} s wall, "
        f"{smoke_run['cpu']:.1f} s CPU\n{smoke_run['stdout']}"
    )
    assert smoke_run["wall"] < SMOKE_LIMIT_S


def test_smoke_table_holds_every_entry_with_percentages(smoke_run):
    rows = smoke_run["csv"]
    assert [r["entry"] for r in rows] == DEFAULT_ENTRIES
    for row in rows:
        upper = row["entry"] in UPPER_BOUNDS
        assert row["upper_bound"] == str(upper).lower()
        for key in ("AIA", "Last", "AA", "Forgetting", "stream_forgetting"):
            if upper and key not in ("Last", "AA"):
                assert row[f"{key}_mean"] == "", (row["entry"], key)
                continue
            assert 0.0 <= float(row[f"{key}_mean"]) <= 100.0, (row["entry"], key)
        assert float(row["peak_memory_mib_mean"]) > 0
    printed = smoke_run["stdout"]
    assert printed.startswith("| entry | AIA | Last | AA |")
    for entry in DEFAULT_ENTRIES:
        assert f"| {entry}{' (upper bound)' if entry in UPPER_BOUNDS else ''} |" in printed
    report = (smoke_run["dir"] / "comparison.md").read_text()
    assert "| cliphinge |" in report and "accuracy_vs_task.png" in report
    for field in (
        "model: cliphinge-tiny",
        "class_order: [0, 1, 2",
        "seeds: [1993]",
        "avalanche-lib: 0.6.0",
        "stream:",
    ):
        assert field in report, field
    assert (smoke_run["dir"] / "accuracy_vs_task.png").stat().st_size > 0


def test_zeroshot_has_no_training_time(smoke_run):
    rows = {r["entry"]: r for r in smoke_run["csv"]}
    assert rows["zeroshot"]["train_seconds_mean"] == ""
    assert all(float(rows[e]["train_seconds_mean"]) > 0 for e in DEFAULT_ENTRIES if e != "zeroshot")
    line = next(row for row in smoke_run["stdout"].splitlines() if row.startswith("| zeroshot |"))
    assert line.split("|")[7].strip() == "-"


def test_every_entry_has_its_tensorboard_run_and_text_log(smoke_run):
    for entry in DEFAULT_ENTRIES:
        assert list((smoke_run["dir"] / "tb" / entry).glob("events.out.tfevents.*")), entry
        assert "Top1_Acc_Stream" in (smoke_run["dir"] / "logs" / f"{entry}.txt").read_text()


def test_no_fusion_scores_stage1_logits_only(smoke_run):
    """alpha = 0 gives exactly the stage-1 logits: the same numbers as no stage 2 at all."""
    runs = {r["entry"]: r for r in smoke_run["json"]["runs"]}
    assert runs["cliphinge_no_fusion"]["matrix"] == runs["cliphinge_no_stage2"]["matrix"]


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_no_replay_no_hinge_equals_strategy_without_those_plugins(smoke_run):
    """The ablation (config switches) equals the full config with replay and hinge left out by
    hand, on the same seed and the same backbone, metric for metric."""
    config = smoke_config()
    assert config.samples_per_old_class > 0 and config.text_use_hinge_loss
    backbone = compare_runs.load_backbone(config, config.seed)  # the weights the script used
    named_benchmark = smoke_stream(config)
    seed_everything(config.seed)
    strategy = CLIPHingeStrategy(
        config=config,
        class_names=named_benchmark.class_names,
        model=build_model(config, named_benchmark.class_names, backbone=backbone),
        use_default_plugins=False,
        plugins=[SecondStagePlugin.from_config(config)],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]),
    )
    matrix = [
        [a if j <= task.index else None for j, a in enumerate(task.row)]
        for task in train_and_evaluate(
            strategy, named_benchmark.benchmark.train_stream, named_benchmark.benchmark.test_stream
        )
    ]
    run = next(r for r in smoke_run["json"]["runs"] if r["entry"] == "cliphinge_no_replay_no_hinge")
    assert matrix == run["matrix"]
    assert cil_metrics(matrix, run["test_sizes"]) == run["metrics"]


# ---- command-line errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--strategies", "lfw"], "unknown strategy 'lfw'; did you mean 'lwf'?"),
        (["--strategies", "naive", "gdump"], "did you mean 'gdumb'?"),
        (["--ablations", "no_replai"], "unknown ablation 'no_replai'; did you mean 'no_replay'?"),
        (["--set", "baseline.lrr=0.1"], "did you mean 'baseline.lr'?"),
        (["--set", "epoch=3"], "did you mean 'epochs'?"),
    ],
)
def test_unknown_names_exit_2_with_a_suggestion(tmp_path, capsys, argv, expected):
    code = compare_cli.main(["--benchmark", "smoke", "--output-dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1


def test_unknown_benchmark_exit_2(tmp_path, capsys):
    assert compare_cli.main(["--benchmark", "cifar100", "--output-dir", str(tmp_path)]) == 2
    assert "did you mean 'split_cifar100'?" in capsys.readouterr().err


def test_missing_cifar_is_one_line_exit_2(tmp_path, capsys):
    code = compare_cli.main(
        [
            "--benchmark",
            "split_cifar100",
            "--data-root",
            str(tmp_path / "none"),
            "--set",
            "model_name=cliphinge-tiny",
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--strategies",
            "naive",
            "--ablations",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: CIFAR-100 not found")


def test_a_finished_comparison_is_not_overwritten_silently(tmp_path, capsys):
    (tmp_path / "comparison.csv").write_text("entry\n")
    code = compare_cli.main(["--benchmark", "smoke", "--output-dir", str(tmp_path)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


# ---- library pieces -------------------------------------------------------------------------
def test_feature_stream_is_aligned_with_the_image_stream(smoke_setup):
    config, backbone, named_benchmark, features = smoke_setup
    for ours, theirs in zip(features.benchmark.test_stream, named_benchmark.benchmark.test_stream):
        assert list(ours.dataset.targets) == list(theirs.dataset.targets)
        to_input = ClipInput.for_backbone(backbone)  # the stream serves uint8 images
        images = torch.stack([to_input(theirs.dataset[i][0]) for i in range(3)])
        with torch.no_grad():
            expected = backbone.model.encode_image(images)
        got = torch.stack([ours.dataset[i][0] for i in range(3)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert features.dim == backbone.embed_dim


def test_baseline_model_on_features_equals_it_on_images(smoke_setup):
    """The identity encoder on extracted features gives the scores the frozen encoder gives."""
    config, backbone, named_benchmark, features = smoke_setup
    torch.manual_seed(0)
    on_features = compare_features.FrozenCLIPClassifier(features.dim)
    on_images = compare_features.FrozenCLIPClassifier(
        features.dim, encoder=compare_features.FrozenImageEncoder(backbone)
    )
    on_images.classifier.load_state_dict(on_features.classifier.state_dict())
    test = named_benchmark.benchmark.test_stream[0].dataset
    to_input = ClipInput.for_backbone(backbone)  # the stream serves uint8 images
    images = torch.stack([to_input(test[i][0]) for i in range(4)])
    feats = torch.stack([features.benchmark.test_stream[0].dataset[i][0] for i in range(4)])
    on_images.train()
    assert not on_images.feature_extractor.encoder.training
    assert [n for n, p in on_images.named_parameters() if p.requires_grad] == [
        "classifier.classifier.weight",
        "classifier.classifier.bias",
    ]
    torch.testing.assert_close(on_images(images), on_features(feats), rtol=1e-5, atol=1e-5)


def test_zeroshot_scores_only_seen_classes():
    text = torch.eye(4)
    model = compare_features.ZeroShotCLIP(text, logit_scale=10.0)

    class Exp:
        classes_in_this_experience = [1, 2]

    model.train()
    model.adaptation(Exp())
    model.eval()
    scores = model(torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert scores[0].tolist() == [UNSEEN_SCORE, 10.0, 0.0, UNSEEN_SCORE]
    assert scores[1, [1, 2]].tolist() == [0.0, 0.0]  # class 0 unseen: never predicted


def test_two_seeds_give_mean_and_std_and_one_run_per_seed(smoke_setup, tmp_path):
    config, backbone, _, _ = smoke_setup
    entries = compare.resolve_entries(["zeroshot", "naive"], [])
    settings = compare.BaselineSettings(epochs=2)
    result = compare_runs.run_comparison(
        entries,
        config=config,
        stream_factory=smoke_stream,
        backbone=backbone,
        seeds=[0, 1],
        output_dir=tmp_path,
        settings=settings,
        log=lambda m: None,
    )
    compare_report.write_outputs(result, tmp_path)
    assert [(r.entry, r.seed) for r in result.runs] == [
        ("zeroshot", 0),
        ("naive", 0),
        ("zeroshot", 1),
        ("naive", 1),
    ]
    for entry in ("zeroshot", "naive"):
        for seed in (0, 1):
            assert list((tmp_path / "tb" / entry / f"seed{seed}").glob("events.out.*"))
    table = compare_report.markdown_table(compare_report.summarize(result))
    naive = next(row for row in table.splitlines() if row.startswith("| naive |"))
    assert naive.count("±") == 7
    rows = {r["entry"]: r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    assert rows["naive"]["n_seeds"] == "2" and rows["naive"]["AIA_std"] != ""


def test_format_cell():
    assert compare_report.format_cell([84.4321]) == "84.43"
    assert compare_report.format_cell([80.0, 82.0]) == "81.00 ± 1.41"
    assert compare_report.format_cell([None]) == "-"
    assert compare_report.format_cell([12.34], digits=1) == "12.3"


def test_resolve_entries_names_and_order():
    entries = compare.resolve_entries(["Naive", "cliphinge"], ["no_hinge"])
    assert [e.name for e in entries] == ["naive", "cliphinge", "cliphinge_no_hinge"]
    assert dict(entries[2].overrides) == compare.ABLATIONS["no_hinge"]
    with pytest.raises(compare.CompareError, match="named twice"):
        compare.resolve_entries(["naive", "naive"], [])
    with pytest.raises(compare.CompareError, match="nothing to compare"):
        compare.resolve_entries([], [])


def test_another_avalanche_strategy_joins_through_baselines(tmp_path, monkeypatch, capsys):
    """The recipe of docs/comparison.md: one factory in ``BASELINES`` makes a new
    ``--strategies`` name."""
    from avalanche.training import AGEM

    monkeypatch.setitem(
        compare.BASELINES,
        "agem",
        lambda ctx: AGEM(
            **ctx.common, patterns_per_exp=ctx.settings.memory_per_class, sample_size=32
        ),
    )
    code = compare_cli.main(
        [
            "--benchmark",
            "smoke",
            "--strategies",
            "naive",
            "agem",
            "--ablations",
            "--set",
            "baseline.epochs=2",
            "--output-dir",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| naive |" in table and "| agem |" in table
    assert list((tmp_path / "tb" / "agem").glob("events.out.*"))
