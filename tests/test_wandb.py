"""Weights & Biases logging, offline: what a run logs is read back from wandb's own run file.

wandb 0.31 has no Python reader of its ``.wandb`` run file; ``wandb_records`` reads it: the
LevelDB log format (32 KiB blocks of records: crc32, length, kind, data; kind 1 a whole
record, 2 / 3 / 4 its first / middle / last piece) after a 7-byte ``:W&B`` header, each record
a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avalanche_cliphinge.app.command import main as cliphinge
from avalanche_cliphinge.wandb_logger import last_run_id

#: ``--preset smoke`` (tiny random CLIP, synthetic images) in 2 tasks of one epoch each.
SMOKE_RUN = [
    "run",
    "--preset",
    "smoke",
    "--quiet",
    "--set",
    "total_tasks=2",
    "--set",
    "init_epochs=1",
    "--set",
    "epochs=1",
    "--set",
    "second_stage_epochs=1",
]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, every folder it writes under ``tmp_path``."""
    for name, folder in [
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_DATA_DIR", "wandb_data"),
    ]:
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def wandb_records(path: Path):
    """The ``Record`` protobufs of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill: the end of what was written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a ``.wandb`` file once wandb has written its ``exit`` record.

    ``finish()`` can return before wandb's service process has written the file (seen under
    a loaded machine: the file read back empty, its records all there a moment later), so
    this reads it again until the run's last record is in, for ``timeout`` seconds at most.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
        except Exception:  # noqa: BLE001 - a record cut short: the file is being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            return list(wandb_records(path))
        time.sleep(0.1)


def read_offline_run(folder: Path):
    """The one offline run under ``folder``: ``(run dir, config, {step: {name: value}})``.

    Rows of the same step are merged, and so are the config updates of every run and config
    record; a nested value (an image: ``{"path": ...}``) is a dict.
    """
    (run_file,) = folder.rglob("offline-run-*/run-*.wandb")
    return read_run_file(run_file)


def read_run_file(run_file: Path):
    """``read_offline_run`` of one ``.wandb`` file."""
    config, history = {}, {}
    for record in finished_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # wandb may write the run record again, or config apart
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                keys = [item.key] if item.key else list(item.nested_key)
                target = row
                for key in keys[:-1]:
                    target = target.setdefault(key, {})
                target[keys[-1]] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return run_file.parent, config, history


def logged_pixels(run_dir: Path, image: dict) -> np.ndarray:
    """The pixels of a logged ``wandb.Image`` (its PNG under the run's ``files``)."""
    assert image["_type"] == "image-file"
    with Image.open(run_dir / "files" / image["path"]) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[:2] == (image["height"], image["width"])
    return pixels


def test_wandb_logger_in_a_user_script(
    offline_wandb, tmp_path, tiny_config, synthetic_stream, class_names
):
    """Avalanche's metrics through the package's ``WandBLogger`` in a plain Avalanche
    ``EvaluationPlugin``: every stream accuracy, the config and the confusion-matrix figure
    land in the offline run, at the step Avalanche gives them."""
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics, confusion_matrix_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_cliphinge import CLIPHingeStrategy
    from avalanche_cliphinge.wandb_logger import WandBLogger

    logger = WandBLogger(
        project_name="script",
        run_name="user-script",
        dir=str(tmp_path / "logs"),
        config={"lr": 0.01, "note": "user script"},
        save_code=False,
    )
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        confusion_matrix_metrics(num_classes=len(class_names), stream=True),
        loggers=[logger],
    )
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=tiny_config(init_epochs=1, epochs=1, second_stage_epochs=0),
        class_names=class_names,
        evaluator=evaluator,
    )
    returned = []
    for experience in synthetic_stream.train_stream[:2]:
        strategy.train(experience)
        returned.append(
            (strategy.clock.train_iterations, strategy.eval(synthetic_stream.test_stream))
        )
    logger.finish()

    run_dir, config, history = read_offline_run(tmp_path / "logs")
    assert config == {"lr": 0.01, "note": "user script"}
    stream_acc = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    for step, results in returned:
        assert history[step][stream_acc] == results[stream_acc]
        for exp in range(3):
            name = f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp00{exp}"
            assert history[step][name] == results[name]
        # the confusion matrix figure Avalanche drew, as an image of the figure's size
        figure, counts = results["ConfusionMatrix_Stream/eval_phase/test_stream"].alternatives
        assert int(counts.sum()) == len(synthetic_stream.test_stream[0].dataset) * 3
        pixels = logged_pixels(
            run_dir, history[step]["ConfusionMatrix_Stream/eval_phase/test_stream"]
        )
        width, height = figure.get_size_inches() * figure.dpi
        assert pixels.shape == (round(height), round(width), 3)
        assert pixels.std() > 10  # drawn, not blank


def test_run_with_wandb_logs_config_results_and_figures(offline_wandb, tmp_path, capsys):
    """``cliphinge run --wandb``: the run's config, Avalanche's metrics, the package's
    results and figures in the offline run, equal to results.json, config.json and the
    TensorBoard images of the same run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cliphinge([*SMOKE_RUN, "--output-dir", str(out), "--wandb"]) == 0, capsys.readouterr()
    results = json.loads((out / "results.json").read_text())

    run_dir, config, history = read_offline_run(out / "wandb")
    assert config == json.loads((out / "config.json").read_text())
    rows = {
        row["results/task"]: (step, row) for step, row in history.items() if "results/task" in row
    }
    assert sorted(rows) == [0, 1]
    for task, (_step, row) in rows.items():
        assert row["results/accuracy_seen_classes"] == results["per_task"][task]["all"]
    last_step, last = rows[1]
    for name, value in results["metrics"].items():
        assert last[f"results/{name}"] == value
    # Avalanche's forgetting as a fraction, results.json's in percent
    forgetting = last["StreamForgetting/eval_phase/test_stream"]
    assert 100 * forgetting == pytest.approx(results["avalanche_stream_forgetting"], abs=1e-12)

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    figures = {"results/accuracy_matrix", "results/accuracy_curve", "results/confusion_matrix"}
    for tag in figures:
        steps = sorted(step for step, row in history.items() if tag in row)
        tb_images = {image.step: image for image in events.Images(tag)}
        # the confusion matrix once every task is trained, the others after every task
        assert steps == (
            [last_step] if tag.endswith("confusion_matrix") else sorted(s for s, _ in rows.values())
        )
        for step in steps:
            tb_pixels = np.asarray(
                Image.open(io.BytesIO(tb_images[step].encoded_image_string)).convert("RGB")
            )
            np.testing.assert_array_equal(logged_pixels(run_dir, history[step][tag]), tb_pixels)


def test_a_resumed_run_continues_its_wandb_run(offline_wandb, tmp_path, capsys):
    """A run killed after its first checkpoint and resumed with ``--resume --wandb`` logs to
    the same W&B run (same id, wandb's ``resume="allow"``): the killed attempt's offline run
    holds task 0's results, the resumed one task 1's and the final metrics."""
    out = tmp_path / "run"
    args = [*SMOKE_RUN, "--output-dir", str(out), "--wandb"]
    killed = subprocess.run(
        [sys.executable, "-m", "avalanche_cliphinge", *args],
        # its own wandb service (not this process's, named in WANDB_SERVICE once wandb ran
        # here): a killed run would stay in use in a shared one
        env={
            **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
            "CLIPHINGE_KILL_AT": "checkpoint:0",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first_id = last_run_id(out)
    assert first_id is not None and (out / "checkpoints" / "exp_000.pt").exists()
    assert cliphinge([*args, "--resume"]) == 0, capsys.readouterr()

    runs = sorted((out / "wandb").glob("offline-run-*"), key=lambda run: run.stat().st_mtime)
    assert len(runs) == 2
    assert [run.name.rsplit("-", 1)[1] for run in runs] == [first_id, first_id]
    assert last_run_id(out) == first_id
    _run_dir, config, history = read_run_file(runs[1] / f"run-{first_id}.wandb")
    assert config == json.loads((out / "config.json").read_text())
    rows = [row for row in history.values() if "results/task" in row]
    assert [row["results/task"] for row in rows] == [1]
    results = json.loads((out / "results.json").read_text())
    assert rows[0]["results/accuracy_seen_classes"] == results["per_task"][1]["all"]
    assert rows[0]["results/AIA"] == results["metrics"]["AIA"]


def test_without_a_wandb_folder_there_is_no_run_to_continue(tmp_path):
    assert last_run_id(tmp_path) is None
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "latest-run").symlink_to("somewhere-else")
    assert last_run_id(tmp_path) is None
    (tmp_path / "wandb" / "latest-run").unlink()
    (tmp_path / "wandb" / "latest-run").symlink_to("run-20261207_101500-ab12cd34")
    assert last_run_id(tmp_path) == "ab12cd34"


class RaisingFinder:
    """A ``sys.meta_path`` finder under which ``import wandb`` raises ``error``."""

    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise self.error
        return None


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("missing", "--wandb needs the wandb package: pip install wandb"),
        ("import fails", "the wandb package fails to import (TypeError: Descriptors cannot"),
        ("no init", "W&B could not start the run (AttributeError:"),
    ],
)
def test_missing_or_broken_wandb_is_one_error_line(
    breakage, expected, offline_wandb, tmp_path, capsys, monkeypatch
):
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    if breakage == "missing":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    elif breakage == "import fails":  # protobuf's error for a wandb built against another one
        finder = RaisingFinder(TypeError("Descriptors cannot be created directly."))
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    out = tmp_path / "run"
    code = cliphinge([*SMOKE_RUN, "--output-dir", str(out), "--wandb"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    if breakage != "no init":  # refused before the run claims the folder
        assert not (out / "config.json").exists()
