"""Fidelity to the published protocols: fp32 scores, RAPF's replay volume, hard-pair rule and
covariance shrinkage as config keys, and the shipped presets found by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin

from avalanche_cliphinge import (
    CLIPHingeConfig,
    ClassGaussians,
    ConfigError,
    GaussianReplayPlugin,
    HardPairHingePlugin,
    build_model,
    rapf_shrink_cov,
    select_hard_pairs,
)
from avalanche_cliphinge.config import config_reproduces, list_presets
from avalanche_cliphinge.model.heads import TaskHead

REPO = Path(__file__).resolve().parents[1]


# ---- scores in fp32 ---------------------------------------------------------------------------
def near_tie_features(text: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, dim]`` features whose cosines with classes 0 and 1 differ by about 1e-4."""
    t0, t1 = text[0], text[1]
    noise = 0.05 * torch.randn(n, text.shape[1], generator=generator)
    steps = torch.linspace(-4e-4, 4e-4, n)[:, None]
    return t0 + t1 + noise + steps * (t1 - t0)


def test_scores_are_fp32_under_bf16_autocast(tiny_config, class_names):
    torch.manual_seed(0)
    model = build_model(tiny_config(), class_names)
    model.add_task(list(range(len(class_names))))
    model.set_trainable_prompts([])  # the text features are encoded once, in fp32, and cached
    model.eval()
    with torch.no_grad():
        text = model.text_features()
        feats = near_tie_features(text, 64, torch.Generator().manual_seed(0))
        exact = model(feats)
        fp32_winner = (feats @ text.T).argmax(1)  # ground truth without any autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_scores = model(feats)
            bf16 = model.logit_scale * F.normalize(feats, dim=-1) @ text.T
    assert bf16.dtype == torch.bfloat16
    flipped = (bf16.float().argmax(1) != fp32_winner).sum()
    assert flipped > 0, "the case must be one where a bf16 matmul flips the argmax"
    assert autocast_scores.dtype == torch.float32
    assert torch.equal(autocast_scores, exact)
    assert torch.equal(autocast_scores.argmax(1), fp32_winner)

    model.heads["0"] = TaskHead(text, 20.0)  # stage 2: clip + 0.3 * head
    with torch.no_grad():
        fused = model(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_autocast = model(feats)
    assert fused_autocast.dtype == torch.float32 and torch.equal(fused_autocast, fused)


# ---- RAPF's hard-pair rule and no cap -----------------------------------------------------------
def test_euclidean_hard_pairs_match_numpy_distances():
    rng = np.random.default_rng(0)
    new, old = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    new[0] = old[2] + 0.05 * rng.normal(size=8)  # a close pair, so some pass 0.55
    unit_new = new / np.linalg.norm(new, axis=1, keepdims=True)
    unit_old = old / np.linalg.norm(old, axis=1, keepdims=True)
    dist = np.linalg.norm(unit_new[:, None] - unit_old[None], axis=-1)
    new_ids, old_ids = [20, 21, 22], [0, 1, 2, 3, 4]
    for threshold in (0.55, 1.2, 1.4):
        expected = sorted(
            (
                (old_ids[c], new_ids[r], float(unit_new[r] @ unit_old[c]))
                for r, c in zip(*np.nonzero(dist < threshold))
            ),
            key=lambda p: (-p[2], p[0], p[1]),
        )
        got = select_hard_pairs(
            torch.tensor(new, dtype=torch.float32),
            torch.tensor(old, dtype=torch.float32),
            new_ids,
            old_ids,
            threshold,
            top_k=None,
            metric="euclidean",
        )
        assert [(o, n) for o, n, _ in got] == [(o, n) for o, n, _ in expected]
        assert [s for _, _, s in got] == pytest.approx([s for _, _, s in expected], abs=1e-6)
    assert (
        1
        <= len(
            select_hard_pairs(
                torch.tensor(new, dtype=torch.float32),
                torch.tensor(old, dtype=torch.float32),
                new_ids,
                old_ids,
                0.55,
                None,
                "euclidean",
            )
        )
        < 15
    )
    everything = select_hard_pairs(
        torch.tensor(new, dtype=torch.float32),
        torch.tensor(old, dtype=torch.float32),
        new_ids,
        old_ids,
        2.0,
        None,
        "euclidean",
    )
    assert len(everything) == 15  # no cap: every pair within distance 2
    assert (
        len(
            select_hard_pairs(
                torch.tensor(new, dtype=torch.float32),
                torch.tensor(old, dtype=torch.float32),
                new_ids,
                old_ids,
                2.0,
                10,
                "euclidean",
            )
        )
        == 10
    )


def test_hinge_plugin_takes_metric_and_cap_from_config():
    plugin = HardPairHingePlugin.from_config(CLIPHingeConfig.from_json("rapf_cifar100_b0_inc10"))
    assert plugin.text_metric == "euclidean" and plugin.text_top_k is None
    assert plugin.text_threshold == 0.55 and plugin.samples_per_pair == 40
    default = HardPairHingePlugin.from_config(CLIPHingeConfig())
    assert default.text_metric == "cosine" and default.text_top_k == 10


def test_pair_keys_are_validated():
    with pytest.raises(ConfigError, match="text_hard_pair_metric"):
        CLIPHingeConfig(text_hard_pair_metric="manhattan")
    with pytest.raises(ConfigError, match=r"distance between unit vectors in \[0, 2\]"):
        CLIPHingeConfig(text_hard_pair_metric="euclidean", text_hard_pair_threshold=2.5)
    with pytest.raises(ConfigError, match=r"cosine similarity in \[-1, 1\]"):
        CLIPHingeConfig(text_hard_pair_threshold=1.5)
    with pytest.raises(ConfigError, match="or null for no cap"):
        CLIPHingeConfig(text_top_hard_pairs=-1)
    assert CLIPHingeConfig.from_dict({"text_top_hard_pairs": None}).text_top_hard_pairs is None


# ---- RAPF's covariance shrinkage ----------------------------------------------------------------
def numpy_rapf_shrink(cov: np.ndarray) -> np.ndarray:
    off = cov - np.diag(np.diag(cov))
    off_mean = off[off != 0].mean()
    eye = np.eye(cov.shape[0])
    return cov + np.diag(cov).mean() * eye + off_mean * (1 - eye)


def test_rapf_shrink_cov_matches_numpy_and_fit_uses_it():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6))
    cov = np.cov(feats, rowvar=False)
    got = rapf_shrink_cov(torch.tensor(cov))
    assert np.allclose(got.numpy(), numpy_rapf_shrink(cov), atol=1e-12)
    stacked = rapf_shrink_cov(torch.tensor(np.stack([cov, 2 * cov])))
    assert np.allclose(stacked[1].numpy(), numpy_rapf_shrink(2 * cov), atol=1e-12)

    labels = torch.zeros(30, dtype=torch.long)
    plain, shrunk = ClassGaussians(6), ClassGaussians(6)
    plain.fit(torch.tensor(feats, dtype=torch.float32), labels, jitter=1e-4)
    shrunk.fit(torch.tensor(feats, dtype=torch.float32), labels, jitter=1e-4, rapf_shrink=True)
    ridge = cov + 1e-4 * np.eye(6)  # RAPF: torch.cov + 1e-4 I, then shrink_cov
    assert np.allclose(plain.covariance_of([0])[0].numpy(), ridge, rtol=1e-4, atol=1e-5)
    assert np.allclose(
        shrunk.covariance_of([0])[0].numpy(), numpy_rapf_shrink(ridge), rtol=1e-4, atol=1e-5
    )


# ---- RAPF's replay volume ----------------------------------------------------------------------
class ChunkRecorder(SupervisedPlugin):
    """Reads the replayed labels of every step of each epoch's plan, which the strategy
    draws from the replay plugin at the epoch's start."""

    def __init__(self, replay: GaussianReplayPlugin):
        super().__init__()
        self.replay, self.epochs = replay, []

    def after_training_epoch(self, strategy, **kwargs):
        plan = strategy.epoch_plan
        if plan.replay_features is not None:
            self.epochs.append(
                (
                    list(strategy.experience_classes.old),
                    [plan.row(i).replay_labels.tolist() for i in range(plan.n_steps)],
                )
            )


def test_replay_per_step_gives_k_classes_per_batch_cycling_the_old_classes(run_stream, tiny_config):
    config = tiny_config(
        replay_classes_per_step=3,
        samples_per_old_class=4,
        init_epochs=1,
        epochs=2,
        second_stage_epochs=0,
    )
    replay = GaussianReplayPlugin(samples_per_old_class=4, classes_per_step=3, seed=0)
    recorder = ChunkRecorder(replay)
    run_stream(config, plugins=[replay, recorder])
    assert len(recorder.epochs) == 4  # 2 epochs of experiences 1 and 2
    for old, chunks in recorder.epochs:
        assert len(chunks) == 4  # 60 samples in batches of 16
        picks = []
        for labels in chunks:
            assert len(labels) == 3 * 4
            classes = labels[::4]
            assert all(labels[4 * j : 4 * j + 4] == [c] * 4 for j, c in enumerate(classes))
            picks += classes
        cycle = picks[: len(old)]
        assert sorted(cycle) == sorted(old)  # each epoch visits every old class
        assert picks == [cycle[i % len(old)] for i in range(len(picks))]
    first, second = recorder.epochs[2][1], recorder.epochs[3][1]
    assert first != second  # a new shuffle every epoch


def test_replay_per_epoch_volume_is_the_default(run_stream, tiny_config):
    config = tiny_config(samples_per_old_class=5, init_epochs=1, epochs=1, second_stage_epochs=0)
    assert config.replay_classes_per_step == 0
    replay = GaussianReplayPlugin(samples_per_old_class=5, seed=0)
    recorder = ChunkRecorder(replay)
    run_stream(config, plugins=[replay, recorder], n_experiences=2)
    ((old, chunks),) = recorder.epochs
    labels = [c for chunk in chunks for c in chunk]
    assert sorted(labels) == sorted(old * 5)  # 5 per old class over the epoch
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


# ---- presets -------------------------------------------------------------------------------------
def test_presets_state_what_they_reproduce_and_hold_only_differences():
    presets = list_presets()
    assert len(presets) == 10
    for name, note in presets.items():
        assert note and ":" in note, name
        assert "QuickGELU" in note
        raw = json.loads((REPO / "avalanche_cliphinge/configs" / f"{name}.json").read_text())
        defaults = CLIPHingeConfig().to_dict()
        # "dataset" is always named: the run scripts check it
        assert "dataset" in raw, name
        assert all(raw[k] != defaults[k] for k in raw if k not in ("reproduces", "dataset")), name
    assert "86.19" in config_reproduces("rapf_cifar100_b0_inc10")
    rapf = CLIPHingeConfig.from_json("rapf_imagenet_r_b0_inc20")
    assert (
        rapf.seed,
        rapf.batch_size,
        rapf.replay_classes_per_step,
        rapf.samples_per_old_class,
        rapf.hinge_samples_per_pair,
        rapf.rapf_shrink_cov,
        rapf.class_order,
    ) == (2, 64, 5, 10, 20, True, "rapf")
    assert rapf.text_hard_pair_threshold == 0.65 and rapf.text_hard_pair_metric == "euclidean"


def test_unknown_preset_names_the_closest_and_lists_all():
    with pytest.raises(ConfigError, match="did you mean 'cifar100_b0_inc10'.*presets: "):
        CLIPHingeConfig.from_json("cifar100_b0_inc1O")


def test_run_script_takes_a_preset_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from avalanche_cliphinge.app.cli import main
    from avalanche_cliphinge.app.run_options import build_parser

    monkeypatch.chdir(tmp_path)
    shown = build_parser("run", "cifar100_b0_inc10").format_help()
    for name in list_presets():
        assert name in shown
    code = main(
        ["--config", "imagenet_r_b0_inc20", "--output-dir", str(tmp_path / "run")],
        dataset="cifar100",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "this script runs dataset 'cifar100', but the request's dataset is 'imagenet_r'" in err
    assert "cliphinge run --config imagenet_r_b0_inc20" in err
