"""SimpleCIL and RAPF (``avalanche_cliphinge.baselines``) on the tiny offline CLIP.

Every expected value is recomputed here with numpy from what the strategies read (the frozen
CLIP's own features, the step's inputs captured by recorder plugins), never read back from
the package's results: SimpleCIL's predictions against a numpy nearest-prototype classifier,
RAPF's adapter, loss (replayed rows, hinge on Euclidean hard pairs) and fusion against their
formulas, and both runs' Avalanche stream accuracy against the strategies' own predictions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

from avalanche_cliphinge import CLIPHingeConfig, ConfigError, load_clip
from avalanche_cliphinge.baselines import RAPF, ClassMeans, SimpleCIL, rapf_config, rapf_fusion
from avalanche_cliphinge.model.cliphinge_model import UNSEEN_SCORE

ACC_STREAM = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
TEMPLATE = "a good photo of a {}."


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def numpy_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def numpy_fusion(old: np.ndarray, new: np.ndarray, beta: float) -> np.ndarray:
    u, s, vh = np.linalg.svd(old)
    p_old, p_new = np.diag(s) @ vh, u.T @ new
    moved = np.abs(p_new - p_old)
    mask = np.minimum(moved / moved.max() + beta, 1.0)
    return u @ (mask * p_new + (1 - mask) * p_old)


class Recorder(SupervisedPlugin):
    """Keeps every evaluation minibatch's predicted class ids and labels."""

    def __init__(self):
        super().__init__()
        self.preds, self.labels = [], []

    def before_eval(self, strategy, **kwargs):
        self.preds, self.labels = [], []

    def after_eval_iteration(self, strategy, **kwargs):
        self.preds.append(strategy.mb_output.argmax(1).cpu())
        self.labels.append(strategy.mb_y.cpu())


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_clip("cliphinge-tiny", None)


@pytest.fixture(scope="module")
def clip_features(backbone, synthetic_data):
    """The frozen encoder's features of the synthetic images, computed here directly."""
    with torch.no_grad():
        encode = backbone.model.encode_image
        return {
            side: encode(synthetic_data[f"{side}_x"]).double().numpy() for side in ("train", "test")
        }


@pytest.fixture(scope="module")
def text_features(backbone, class_names):
    """``[6, dim]`` unit features of RAPF's template for every class, computed here."""
    tokens = backbone.tokenizer([TEMPLATE.format(name) for name in class_names])
    with torch.no_grad():
        return unit(backbone.model.encode_text(tokens).double().numpy())


def evaluator():
    return EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])


# ---- SimpleCIL ------------------------------------------------------------------------------
def test_class_means_fit_and_merge_a_returning_class():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(12, 4)), np.array([3, 1, 3, 1, 3, 7, 7, 1, 3, 1, 7, 3])
    means = ClassMeans(4)
    means.fit(torch.tensor(feats[:7]).float(), torch.tensor(labels[:7]))
    assert means.class_ids.tolist() == [1, 3, 7]
    means.fit(torch.tensor(feats[7:]).float(), torch.tensor(labels[7:]))  # 1, 3, 7 come back
    for c in (1, 3, 7):
        np.testing.assert_allclose(means.mean_of([c])[0], feats[labels == c].mean(0), atol=1e-6)
    assert means.counts.tolist() == [4, 5, 3]
    with pytest.raises(KeyError, match=r"\[2\]"):
        means.mean_of([2])


def test_simplecil_predicts_as_numpy_nearest_prototype(
    tiny_config, class_names, synthetic_stream, synthetic_data, backbone, clip_features
):
    recorder = Recorder()
    strategy = SimpleCIL(
        config=tiny_config(),
        class_names=class_names,
        plugins=[recorder],
        evaluator=evaluator(),
        backbone=backbone,
        progress=False,
    )
    assert strategy.trainable_parameters() == 0
    train_y, test_y = synthetic_data["train_y"].numpy(), synthetic_data["test_y"].numpy()
    for task, experience in enumerate(synthetic_stream.train_stream):
        strategy.train(experience)
        results = strategy.eval(synthetic_stream.test_stream)
        seen = np.arange(2 * task + 2)
        prototypes = np.stack([clip_features["train"][train_y == c].mean(0) for c in seen])
        expected = seen[np.argmax(unit(clip_features["test"]) @ unit(prototypes).T, axis=1)]
        predicted = torch.cat(recorder.preds).numpy()
        assert torch.cat(recorder.labels).tolist() == test_y.tolist()  # the test stream's order
        np.testing.assert_array_equal(predicted, expected)
        assert results[ACC_STREAM] == pytest.approx(float((expected == test_y).mean()), abs=1e-12)
    assert strategy.train_epochs == 0 and strategy.trainable_parameters() == 0


def test_simplecil_reads_a_uint8_stream_as_clip_input(
    tiny_config, class_names, synthetic_data, backbone
):
    from avalanche.benchmarks import nc_benchmark

    from avalanche_cliphinge.streams import ClipInput

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x, y = synthetic_data["train_x"][:60], synthetic_data["train_y"][:60]  # classes 0, 1
    pixels = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    dataset = torch.utils.data.TensorDataset(pixels, y)
    dataset.targets = y.tolist()
    stream = nc_benchmark(dataset, dataset, 1, task_labels=False, fixed_class_order=[0, 1])
    strategy = SimpleCIL(
        config=tiny_config(init_class=None, increment=None, total_tasks=None),
        class_names=class_names,
        backbone=backbone,
        evaluator=evaluator(),
        progress=False,
    )
    strategy.train(stream.train_stream[0])
    to_input = ClipInput.for_backbone(backbone)
    with torch.no_grad():
        feats = backbone.model.encode_image(torch.stack([to_input(p) for p in pixels])).double()
    for c in (0, 1):
        np.testing.assert_allclose(
            strategy.model.gaussians.mean_of([c])[0], feats[y == c].mean(0), atol=1e-5
        )


# ---- RAPF: components -----------------------------------------------------------------------
def test_fusion_by_hand_and_against_numpy():
    old = torch.diag(torch.tensor([2.0, 1.0]))
    new = old + torch.tensor([[0.4, 0.1], [0.2, 0.0]])
    # U = V = I: the change [[.4, .1], [.2, 0]] keeps the shares [[1, .85], [1, .6]]
    fused = rapf_fusion(old, new, 0.6)
    torch.testing.assert_close(fused, torch.tensor([[2.4, 0.085], [0.2, 1.0]]))
    rng = np.random.default_rng(1)
    q1, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    q2, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    old = q1 @ np.diag([5.0, 4.0, 3.0, 2.0, 1.0]) @ q2.T  # distinct singular values
    new = old + 0.3 * rng.normal(size=(5, 5))
    for beta in (0.0, 0.6, 0.7):
        got = rapf_fusion(torch.tensor(old), torch.tensor(new), beta).numpy()
        np.testing.assert_allclose(got, numpy_fusion(old, new, beta), atol=1e-10)
    np.testing.assert_allclose(rapf_fusion(torch.tensor(old), torch.tensor(new), 1.0), new)
    same = torch.tensor(old)
    torch.testing.assert_close(rapf_fusion(same, same.clone(), 0.6), same)


def test_adapter_scores_against_numpy(tiny_config, class_names, backbone, text_features):
    strategy = RAPF(
        config=tiny_config(), class_names=class_names, backbone=backbone, progress=False
    )
    model = strategy.model
    assert strategy.trainable_parameters() == model.adapter.weight.numel() == 64 * 64
    model.add_classes([4, 1])
    model.add_classes([2])
    feats = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    scores = model(feats).detach().double().numpy()
    weight, scale = model.adapter.weight.detach().double().numpy(), float(model.logit_scale)
    emb = unit(feats.double().numpy() @ weight.T)
    expected = scale * emb @ text_features[[4, 1, 2]].T
    np.testing.assert_allclose(scores[:, [4, 1, 2]], expected, rtol=1e-5, atol=1e-5)
    assert (scores[:, [0, 3, 5]] == UNSEEN_SCORE).all()


def test_released_values_are_the_presets(tiny_config):
    keys = [
        "batch_size",
        "samples_per_old_class",
        "replay_classes_per_step",
        "text_hard_pair_metric",
        "text_hard_pair_threshold",
        "text_top_hard_pairs",
        "hinge_samples_per_pair",
        "rapf_shrink_cov",
        "epochs",
        "lr",
        "lr_decay_epochs",
        "prompt_template",
    ]
    for preset in ("rapf_cifar100_b0_inc10", "rapf_imagenet_r_b0_inc20"):
        recorded = CLIPHingeConfig.from_json(preset)
        released = rapf_config(CLIPHingeConfig.from_json(preset.removeprefix("rapf_")))
        assert {k: getattr(released, k) for k in keys} == {k: getattr(recorded, k) for k in keys}
    inc5 = rapf_config(CLIPHingeConfig.from_json("cifar100_b0_inc5"))
    assert inc5.replay_classes_per_step == 4  # main.py: CIFAR-100 with increment 5
    assert rapf_config(tiny_config()).text_hard_pair_threshold == 0.55  # CIFAR-100 10-10's


def test_bad_inputs_are_one_line(tiny_config, class_names, backbone):
    with pytest.raises(ConfigError, match="mix_bias must be in \\[0, 1\\], got 1.5$"):
        RAPF(config=tiny_config(), class_names=class_names, backbone=backbone, mix_bias=1.5)
    for strategy in (SimpleCIL, RAPF):
        with pytest.raises(ConfigError, match=r"^\w+: config must be a CLIPHingeConfig, got dict"):
            strategy(config={}, class_names=class_names, backbone=backbone)
    with pytest.raises(ConfigError, match="class_names has 3 names but the layout has 6"):
        SimpleCIL(config=tiny_config(), class_names=class_names[:3], backbone=backbone)
    with pytest.raises(ValueError, match="square"):
        rapf_fusion(torch.zeros(2, 3), torch.zeros(2, 3), 0.5)


# ---- RAPF: the step, the fusion and a run ---------------------------------------------------
class StepCapture(SupervisedPlugin):
    """The first training step of experience 1: its inputs and loss; the adapter before and
    after experience 1's training (before the fusion)."""

    def __init__(self):
        super().__init__()
        self.step = None
        self.weights = {}

    def before_training_exp(self, strategy, **kwargs):
        self.weights["before"] = strategy.model.adapter.weight.detach().clone()

    def before_backward(self, strategy, **kwargs):
        if strategy.clock.train_exp_counter == 1 and self.step is None:
            self.step = dict(
                x=strategy.mb_x.detach().clone(),
                y=strategy.mb_y.clone(),
                replay=tuple(t.clone() for t in strategy.replay_rows),
                hinge=strategy.hinge_samples.clone(),
                weight=strategy.model.adapter.weight.detach().clone(),
                loss=float(strategy.loss.detach()),
                terms={k: float(v) for k, v in strategy.loss_terms.items()},
                pairs=list(strategy.hard_pairs),
            )

    def after_training_epoch(self, strategy, **kwargs):
        self.weights["trained"] = strategy.model.adapter.weight.detach().clone()


def test_rapf_step_and_fusion_against_numpy(
    tiny_config, class_names, synthetic_stream, backbone, text_features
):
    # experience 1 (classes 2, 3 against old 0, 1): a threshold between the 2nd and 3rd
    # smallest Euclidean distances of the unit text features gives two hard pairs
    distance = np.linalg.norm(text_features[[2, 3]][:, None] - text_features[[0, 1]][None], axis=2)
    ranked = np.sort(distance.ravel())
    threshold = float(ranked[1] + ranked[2]) / 2
    expected_pairs = {(o, n) for i, n in enumerate((2, 3)) for j, o in enumerate((0, 1))
                      if distance[i, j] < threshold}  # fmt: skip
    config = tiny_config(
        text_hard_pair_metric="euclidean",
        text_hard_pair_threshold=threshold,
        text_top_hard_pairs=None,
        text_hinge_margin=1.5,  # large, so the hinge is not 0
        text_hinge_weight=0.7,
        samples_per_old_class=5,
        replay_classes_per_step=1,
        hinge_samples_per_pair=4,
        init_epochs=3,
        epochs=3,
    )
    capture = StepCapture()
    strategy = RAPF(
        config=config,
        released=False,
        mix_bias=0.6,
        class_names=class_names,
        plugins=[capture],
        backbone=backbone,
        evaluator=evaluator(),
        progress=False,
    )
    for experience in synthetic_stream.train_stream[:2]:
        strategy.train(experience)
    step = capture.step
    assert {(o, n) for o, n, _ in step["pairs"]} == expected_pairs and len(expected_pairs) == 2
    replay_x, replay_y = (t.double().numpy() for t in step["replay"])
    assert len(replay_y) == 5 and len(set(replay_y.tolist())) == 1 and replay_y[0] in (0, 1)
    weight, scale = step["weight"].double().numpy(), float(strategy.model.logit_scale)
    text = text_features[[0, 1, 2, 3]]  # columns: the classes in the order learned
    rows = np.concatenate([step["x"].double().numpy(), replay_x])
    targets = np.concatenate([step["y"].numpy(), replay_y]).astype(int)
    cross_entropy = numpy_cross_entropy(scale * unit(rows @ weight.T) @ text.T, targets)
    hinge_emb = unit(step["hinge"].double().numpy() @ weight.T)  # [pairs, 4, dim]
    old_text = text[[o for o, _, _ in step["pairs"]]][:, None]
    new_text = text[[n for _, n, _ in step["pairs"]]][:, None]
    gaps = (hinge_emb * new_text).sum(-1) - (hinge_emb * old_text).sum(-1) + 1.5
    hinge = float(np.maximum(gaps, 0).mean())
    assert hinge > 0
    assert step["terms"]["cross_entropy"] == pytest.approx(cross_entropy, rel=1e-4)
    assert step["terms"]["text_hinge"] == pytest.approx(hinge, rel=1e-4)
    assert step["loss"] == pytest.approx(cross_entropy + 0.7 * hinge, rel=1e-4)
    # the fusion after experience 1: the adapter before it and after its training
    old, trained = (capture.weights[k].double().numpy() for k in ("before", "trained"))
    assert not np.allclose(old, trained)
    fused = strategy.model.adapter.weight.detach().double().numpy()
    np.testing.assert_allclose(fused, numpy_fusion(old, trained, 0.6), atol=1e-5)


def test_rapf_run_accuracy_is_its_own_predictions(
    tiny_config, class_names, synthetic_stream, synthetic_data, backbone, clip_features
):
    strategy = RAPF(
        config=tiny_config(),
        class_names=class_names,
        train_mb_size=16,
        train_epochs=5,
        backbone=backbone,
        evaluator=evaluator(),
        progress=False,
    )
    assert strategy.config.replay_classes_per_step == 2 and strategy.mix_bias == 0.6
    test_x = torch.tensor(clip_features["test"]).float()
    test_y = synthetic_data["test_y"]
    for experience in synthetic_stream.train_stream:
        strategy.train(experience)
        results = strategy.eval(synthetic_stream.test_stream)
        with torch.no_grad():
            predicted = strategy.model.eval()(test_x).argmax(1)
        assert results[ACC_STREAM] == pytest.approx(float((predicted == test_y).float().mean()))
    assert results[ACC_STREAM] > 0.8  # it learned the stream (chance: 1/6)
