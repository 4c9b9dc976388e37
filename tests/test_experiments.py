"""The experiment scripts end to end: results.json, TensorBoard, CSV logs, plots, checkpoints.

``run_split_cifar.py --preset smoke`` runs once, in a subprocess, for the whole module (and
for ``test_resume.py``, which compares its resumed run with it); ``run_imagenet_r.py`` runs
in-process on a generated four-class ``imagenet-r/<wnid>/*.jpg`` tree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avalanche_cliphinge.app.checkpoint import list_checkpoints, load_checkpoint
from avalanche_cliphinge.app.run_options import build_parser, resolve_config
from avalanche_cliphinge.app.results import cil_metrics, grouped_accuracy

from cli_helpers import TINY_IMAGENET_R as SHARED_TINY_IMAGENET_R
from cli_helpers import run_script, uninterrupted_smoke_run

#: subprocess runs of the application: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow
N_TASKS = 4  # --preset smoke: 4 + 2 + 2 + 2 synthetic classes
EPOCHS = 8  # --preset smoke: init_epochs = epochs = 8
STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
STREAM_FORGETTING = "StreamForgetting/eval_phase/test_stream"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out, proc = uninterrupted_smoke_run(tmp_path_factory)
    assert proc["returncode"] == 0, proc["stderr"][-3000:]
    return out, proc


@pytest.fixture(scope="module")
def results(smoke_run):
    return json.loads((smoke_run[0] / "results.json").read_text())


@pytest.fixture(scope="module")
def events(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(
        str(smoke_run[0] / "tb"), size_guidance={"scalars": 0, "images": 0}
    )
    accumulator.Reload()
    return accumulator


def read_csv(path: Path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


# ---- run_split_cifar.py --preset smoke ---------------------------------------------------------
def test_smoke_run_exits_0_and_prints_the_summary(smoke_run):
    out, proc = smoke_run
    assert "AIA (avg incremental acc)" in proc["stdout"]
    assert f"results: {out / 'results.txt'}" in proc["stdout"]
    assert "error" not in proc["stderr"].lower()


def test_results_json_holds_grouped_accuracy_after_every_task(results):
    assert results["finished"] is True
    assert results["completed_tasks"] == N_TASKS
    matrix, sizes = results["accuracy_matrix"], results["test_sizes"]
    assert np.shape(matrix) == (N_TASKS, N_TASKS)
    assert sizes == [60, 30, 30, 30]  # 15 test images per class, 4 + 2 + 2 + 2 classes
    assert len(results["per_task"]) == N_TASKS
    for t, group in enumerate(results["per_task"]):
        assert set(group) == {"all", "tasks", "old", "new"}
        assert group == grouped_accuracy(matrix[t], sizes, t)
        assert len(group["tasks"]) == t + 1
        assert (group["old"] is None) == (t == 0)
    values = [v for t, row in enumerate(matrix) for v in row[: t + 1]]
    assert all(0.0 <= v <= 100.0 for v in values + [g["all"] for g in results["per_task"]])
    # Tasks not trained yet are null, not a measured 0.
    assert all(matrix[t][j] is None for t in range(N_TASKS) for j in range(t + 1, N_TASKS))


def test_results_json_metrics_follow_their_definitions(results):
    matrix = results["accuracy_matrix"]
    metrics = results["metrics"]
    assert set(metrics) == {"AIA", "AA", "Last", "Forgetting"}
    assert metrics == pytest.approx(cil_metrics(matrix, results["test_sizes"]))
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("AIA", "AA", "Last"))
    assert metrics["Last"] == pytest.approx(results["per_task"][-1]["all"])
    # Avalanche's StreamForgetting: accuracy right after learning minus the last one.
    last = N_TASKS - 1
    expected = np.mean([matrix[j][j] - matrix[last][j] for j in range(last)])
    assert results["avalanche_stream_forgetting"] == pytest.approx(expected, abs=1e-6)
    assert -100.0 <= metrics["Forgetting"] <= 100.0


def test_results_json_records_the_protocol(results):
    protocol = results["protocol"]
    for key in (
        "model",
        "pretrained",
        "weights_sha256",
        "class_order",
        "seed",
        "config",
        "versions",
        "device",
    ):
        assert key in protocol, key
    assert protocol["model"] == "cliphinge-tiny"
    assert protocol["pretrained"] is None and protocol["weights_sha256"] is None
    assert protocol["class_order"] == list(range(10))
    assert protocol["seed"] == protocol["config"]["seed"] == 1993
    assert protocol["config"]["total_tasks"] == N_TASKS
    assert protocol["device"].startswith("cpu")
    for package in ("python", "torch", "avalanche-lib", "open_clip_torch"):
        assert protocol["versions"][package] != "not installed", package
    assert protocol["stream"] == "synthetic"
    assert "--preset smoke" in protocol["command"]
    assert results["wall_seconds"] > 0 and 0 < results["train_seconds"] <= results["wall_seconds"]
    assert len(results["hard_pairs"]) == N_TASKS


def test_tensorboard_holds_stream_accuracy_and_forgetting_after_every_task(events, results):
    accuracy = events.Scalars(STREAM_ACC)
    forgetting = events.Scalars(STREAM_FORGETTING)
    assert len(accuracy) == len(forgetting) == N_TASKS
    steps = [e.step for e in accuracy]
    assert steps == sorted(set(steps)) and [e.step for e in forgetting] == steps
    sizes = np.asarray(results["test_sizes"], dtype=float)
    for event, row in zip(accuracy, results["accuracy_matrix"]):
        # The stream accuracy covers the whole test stream, unseen classes included (scored 0).
        whole_stream = float(np.dot([a or 0.0 for a in row], sizes) / sizes.sum())
        assert 100 * event.value == pytest.approx(whole_stream, abs=1e-3)
    assert 100 * forgetting[-1].value == pytest.approx(
        results["avalanche_stream_forgetting"], abs=1e-3
    )
    epochs = events.Scalars("Top1_Acc_Epoch/train_phase/train_stream/Task000")
    assert len(epochs) == len({e.step for e in epochs}) == N_TASKS * EPOCHS


def test_tensorboard_holds_the_results_images_and_scalars(events, results):
    tags = events.Tags()
    # one step axis: Avalanche's clock.train_iterations, the steps of its stream accuracy
    steps = [e.step for e in events.Scalars(STREAM_ACC)]
    for name in ("results/accuracy_matrix", "results/accuracy_curve"):
        assert name in tags["images"]
        assert [e.step for e in events.Images(name)] == steps
    aia = events.Scalars("results/AIA")
    assert [e.step for e in aia] == steps
    assert [e.value for e in events.Scalars("results/task")] == list(range(N_TASKS))
    assert aia[-1].value == pytest.approx(results["metrics"]["AIA"], rel=1e-6)


def test_eval_csv_has_one_row_per_training_and_eval_experience(smoke_run, results):
    header, rows = read_csv(smoke_run[0] / "csv" / "eval_results.csv")
    # Avalanche's CSVLogger: one row per evaluated experience after each training experience.
    assert header == ["eval_exp", "training_exp", "eval_accuracy", "eval_loss", "forgetting"]
    assert [(int(r[1]), int(r[0])) for r in rows] == [
        (t, j) for t in range(N_TASKS) for j in range(N_TASKS)
    ]
    for row in rows:
        t, j = int(row[1]), int(row[0])
        expected = results["accuracy_matrix"][t][j] if j <= t else 0.0  # Avalanche's 0
        assert 100 * float(row[2]) == pytest.approx(expected, abs=0.01)


def test_training_csv_has_one_row_per_epoch(smoke_run):
    header, rows = read_csv(smoke_run[0] / "csv" / "training_results.csv")
    assert header == [
        "training_exp",
        "epoch",
        "training_accuracy",
        "val_accuracy",
        "training_loss",
        "val_loss",
    ]
    assert [(int(r[0]), int(r[1])) for r in rows] == [
        (t, e) for t in range(N_TASKS) for e in range(EPOCHS)
    ]


def test_plots_report_and_logs_are_written(smoke_run):
    out = smoke_run[0]
    for name in ("accuracy_matrix.png", "accuracy_curve.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    text = (out / "results.txt").read_text()
    assert all(f"task {t:2d}: all" in text for t in range(N_TASKS))
    assert "Forgetting (max - last)" in text and "Avalanche StreamForgetting" in text
    assert "Start of training phase" in (out / "log.txt").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((out / "results.json").read_text())["protocol"]["config"]
    # no temporary file left; the run lock's file stays, emptied
    assert [p.name for p in out.glob(".*")] == [".lock"] and not (out / ".lock").read_text()
    assert not list((out / "checkpoints").glob(".*"))


def test_the_last_two_checkpoints_are_kept(smoke_run, results):
    found = list_checkpoints(smoke_run[0] / "checkpoints")
    assert [(k, p.name) for k, p in found] == [(3, "exp_003.pt"), (2, "exp_002.pt")]
    state = load_checkpoint(found[0][1])
    assert state["completed"] == N_TASKS
    assert state["run"]["matrix"] == results["accuracy_matrix"]
    assert state["config"] == results["protocol"]["config"]


# ---- issue 16: what the reports and TensorBoard hold --------------------------------------
SEEN_ACC = "Top1_Acc_Stream_SeenClasses/eval_phase/test_stream/Task000"
TRAIN = "train_phase/train_stream/Task000"


def test_seen_classes_accuracy_is_the_size_weighted_mean_of_the_trained_tasks(events, results):
    matrix, sizes = results["accuracy_matrix"], np.asarray(results["test_sizes"], dtype=float)
    seen = events.Scalars(SEEN_ACC)
    assert [e.step for e in seen] == [e.step for e in events.Scalars(STREAM_ACC)]
    for t, event in enumerate(seen):
        expected = np.dot(matrix[t][: t + 1], sizes[: t + 1]) / sizes[: t + 1].sum()
        assert 100 * event.value == pytest.approx(expected, abs=1e-3)
        assert 100 * results["seen_stream_accuracy"][t] == pytest.approx(expected, abs=1e-3)
    # after the first task Avalanche's stream accuracy counts the 6 untrained classes too
    assert events.Scalars(STREAM_ACC)[0].value == pytest.approx(
        seen[0].value * sizes[0] / sizes.sum(), abs=1e-6
    )


def test_loss_terms_learning_rate_and_stage2_loss_are_logged_per_epoch(events, results):
    config = results["protocol"]["config"]
    epoch_steps = [e.step for e in events.Scalars(f"Loss_Epoch/{TRAIN}")]
    assert len(epoch_steps) == N_TASKS * EPOCHS
    cross_entropy = events.Scalars(f"Loss_Epoch_cross_entropy/{TRAIN}")
    assert [e.step for e in cross_entropy] == epoch_steps
    # the hinge exists from the second task on, where hard pairs were chosen
    hinge_tasks = [t for t, pairs in enumerate(results["hard_pairs"]) if pairs["text"]]
    assert len(events.Scalars(f"Loss_Epoch_text_hinge/{TRAIN}")) == len(hinge_tasks) * EPOCHS
    lr = [e.value for e in events.Scalars(f"LR_Epoch/{TRAIN}")]
    # step decay: lr_decay_factor once per lr_decay_epochs entry reached (float32 in TB)
    expected = [
        config["init_lr"]
        * config["lr_decay_factor"] ** sum(e >= d for d in config["lr_decay_epochs"])
        for e in range(EPOCHS)
    ]
    assert lr[:EPOCHS] == pytest.approx(expected, rel=1e-6)
    stage2 = events.Scalars(f"Loss_Stage2_Epoch/{TRAIN}")
    trained = [t for t in range(N_TASKS) if t >= config["second_stage_start_task"]]
    assert len(stage2) == len(trained) * config["second_stage_epochs"]
    assert all(np.isfinite(e.value) and e.value >= 0 for e in stage2)


def test_hparams_hold_the_config_and_the_final_metrics(events, results):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    data = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    session = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    config = results["protocol"]["config"]
    assert set(session.hparams) == set(config)
    assert session.hparams["seed"].number_value == config["seed"]
    assert session.hparams["model_name"].string_value == config["model_name"]
    for name, value in results["metrics"].items():
        assert events.Scalars(f"hparam/{name}")[-1].value == pytest.approx(value, rel=1e-6)


def test_hard_pairs_carry_class_names_and_results_txt_holds_everything(smoke_run, results):
    from avalanche_cliphinge import CLIPHingeConfig
    from avalanche_cliphinge.app.run_options import smoke_stream

    names = smoke_stream(CLIPHingeConfig.from_dict(results["protocol"]["config"])).class_names
    pairs = [p for task in results["hard_pairs"] for p in task["text"]]
    assert pairs
    for pair in pairs:
        assert pair["old_name"] == names[pair["old"]] and pair["new_name"] == names[pair["new"]]
        assert -1.0 <= pair["similarity"] <= 1.0
    text = (smoke_run[0] / "results.txt").read_text()
    for needle in (
        "Accuracy matrix (%)",
        "Hard pairs",
        "Time: training",
        f"{pairs[0]['old_name']} ({pairs[0]['old']}) -> {pairs[0]['new_name']}",
        "Top1_Acc_Stream_SeenClasses",
        "  config:",
        "    seed: 1993",
        "versions",
    ):
        assert needle in text, needle
    matrix_rows = [line for line in text.splitlines() if line.startswith("task  0 ")]
    assert matrix_rows and matrix_rows[0].split()[2:] == ["100.00", "-", "-", "-"]


def test_confusion_matrix_agrees_with_the_last_row_of_the_accuracy_matrix(smoke_run, results):
    counts = np.asarray(results["confusion_matrix"])  # [true, predicted], class order
    sizes = results["test_sizes"]
    per_class = 15  # --preset smoke: 15 test images
    assert counts.shape == (10, 10) and (counts.sum(axis=1) == per_class).all()
    bounds = np.cumsum([0] + [s // per_class for s in sizes])
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        correct = np.trace(counts[lo:hi, lo:hi])
        assert 100 * correct / sizes[j] == pytest.approx(results["accuracy_matrix"][-1][j])
    for stem in ("confusion_matrix", "accuracy_matrix", "accuracy_curve"):
        with Image.open(smoke_run[0] / f"{stem}.png") as image:
            assert image.format == "PNG" and min(image.size) > 600  # 300 dpi
        assert (smoke_run[0] / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


# ---- --set parsing ---------------------------------------------------------------------------
def test_set_values_are_read_as_json_then_as_strings():
    parser = build_parser("test", "imagenet_r_b0_inc20")
    args = parser.parse_args(
        [
            "--set",
            "pretrained=null",
            "--set",
            'class_order="natural"',
            "--set",
            "lr_decay_epochs=[2, 3]",
            "--set",
            "epochs=1",
            "--set",
            "model_name=cliphinge-tiny",
            "--set",
            "lr=1e-2",
            "--set",
            "use_image_adapter=true",
        ]
    )
    config = resolve_config(args)
    assert config.pretrained is None
    assert config.class_order == "natural"
    assert config.lr_decay_epochs == [2, 3]
    assert config.epochs == 1 and config.lr == 0.01 and config.use_image_adapter is True
    assert config.model_name == "cliphinge-tiny"


# ---- run_imagenet_r.py -------------------------------------------------------------------------
def make_imagenet_r_tree(root: Path, n_classes: int = 4, per_class: int = 5) -> list:
    """``root/imagenet-r/<wnid>/*.jpg`` for the first ``n_classes`` ImageNet-R wnids."""
    from avalanche_cliphinge.benchmarks import IMAGENET_R_WNIDS

    rng = np.random.RandomState(0)
    wnids = list(IMAGENET_R_WNIDS[:n_classes])
    for c, wnid in enumerate(wnids):
        folder = root / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((40, 48, 3), 40 + 50 * c, dtype=np.uint8)
            pixels = np.clip(pixels + rng.randint(0, 30, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"art_{i}.jpg")
    return wnids


TINY_IMAGENET_R = [*SHARED_TINY_IMAGENET_R, "--set", "num_workers=2"]  # 8 workers scaled to 2 cores


def test_run_imagenet_r_finishes_on_a_tiny_tree(tmp_path, capsys, monkeypatch):
    wnids = make_imagenet_r_tree(tmp_path / "data")
    out = tmp_path / "run"
    code, stdout, stderr = run_script(
        "run_imagenet_r.py",
        ["--data-root", tmp_path / "data", "--output-dir", out, "--quiet", *TINY_IMAGENET_R],
        capsys,
        monkeypatch,
    )
    assert code == 0, stderr
    assert "AIA (avg incremental acc)" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is True and results["completed_tasks"] == 2
    assert results["protocol"]["pretrained"] is None
    assert results["protocol"]["config"]["pretrained"] is None
    assert results["protocol"]["stream"] == "split_imagenet_r"
    assert results["test_sizes"] == [2, 2]  # 5 images per class: 4 train / 1 test
    assert results["protocol"]["class_order"] == [0, 1, 2, 3]
    assert results["protocol"]["activation"] == "gelu"  # the tiny model's; OpenAI's: quickgelu
    # --set changed the preset's layout: the record no longer claims its protocol
    assert results["protocol"]["config_file"] is None and results["protocol"]["reproduces"] is None
    assert results["protocol"]["config_modified"] == {
        "config_file": "imagenet_r_b0_inc20",
        "changed": ["init_class", "increment", "total_tasks"],
    }
    assert len(wnids) == 4
    # The partial tree is announced on one line, not as a Python warning with source code.
    assert "warning: ImageNet-R at" in stderr and "warnings.warn" not in stderr
