"""CoOp and the joint upper bounds (issue 28) on the synthetic stream, through Avalanche's
``EvaluationPlugin``: CoOp's context is one tensor shared by every class and changes every
task; joint training and the joint linear probe learn every class as one task; each
strategy's stream accuracy is that of the model's own predictions (worked out in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from avalanche_cliphinge import CLIPHingeModel, CLIPHingeStrategy
from avalanche_cliphinge.baselines import CoOp, JointLinearProbe, JointTraining, joint_experience
from avalanche_cliphinge.baselines.coop import METHOD_PLUGINS
from avalanche_cliphinge.config import ConfigError
from avalanche_cliphinge.model.cliphinge_model import UNSEEN_SCORE, build_model
from avalanche_cliphinge.plugins import GaussianReplayPlugin

STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


class TrainingData(SupervisedPlugin):
    """Records each training experience's classes and its adapted dataset's class ids."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.minibatches = []

    def after_training_iteration(self, strategy, **kwargs):
        self.minibatches.append(strategy.mb_y.tolist())

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        self.seen.append(
            (
                list(strategy.experience.classes_in_this_experience),
                [int(t) for t in strategy.adapted_dataset.targets],
            )
        )


def exp_acc(k: int) -> str:
    return f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{k:03d}"


def numpy_accuracies(scores: torch.Tensor, labels: torch.Tensor, per_exp: int):
    """``(stream accuracy, [accuracy of each test experience])`` of argmax predictions; the
    test items are grouped by class in id order, ``per_exp`` items an experience."""
    predicted = np.argmax(scores.detach().cpu().numpy(), axis=1)
    right = predicted == labels.numpy()
    return right.mean(), [right[i : i + per_exp].mean() for i in range(0, len(right), per_exp)]


def assert_metrics_match_model(results, scores, labels, per_exp):
    stream, per_experience = numpy_accuracies(scores, labels, per_exp)
    assert results[STREAM_ACC] == pytest.approx(stream, abs=1e-9)
    for k, value in enumerate(per_experience):
        assert results[exp_acc(k)] == pytest.approx(value, abs=1e-9)


@pytest.fixture
def test_items(synthetic_data):
    """The test images (CLIP's input already) and their class ids, 20 per experience."""
    return synthetic_data["test_x"], synthetic_data["test_y"]


# ---- CoOp -----------------------------------------------------------------------------------
def test_coop_learns_one_shared_context_that_changes_every_task(
    tiny_config, synthetic_stream, class_names, evaluator_factory, test_items
):
    torch.manual_seed(0)
    # replay, text hinge, stage 2 and the captured step on: CoOp switches them off
    config = tiny_config(compile_step=True)
    strategy = CoOp(
        config=config, class_names=class_names, evaluator=evaluator_factory(), progress=False
    )
    model = strategy.model
    assert not any(isinstance(p, METHOD_PLUGINS) for p in strategy.plugins)
    off = ("samples_per_old_class", "text_use_hinge_loss", "second_stage_epochs", "compile_step")
    assert [getattr(strategy.config, key) for key in off] == [0, False, 0, False]
    ctx = model.shared_ctx
    width = model.clip.token_embedding.weight.shape[1]
    assert tuple(ctx.shape) == (config.n_ctx, width)
    clip_before = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    images, labels = test_items
    snapshots = [ctx.detach().clone()]
    for i, experience in enumerate(synthetic_stream.train_stream):
        strategy.train(experience)
        # one Parameter, the same storage, read by every class of every task
        assert len(model.prompts) == i + 1
        assert all(p.ctx is ctx for p in model.prompts)
        assert {p.ctx.data_ptr() for p in model.prompts} == {ctx.data_ptr()}
        learned = [p for p in model.parameters() if p.requires_grad or p is ctx]
        assert learned == [ctx]
        assert [p for g in strategy.optimizer.param_groups for p in g["params"]] == [ctx]
        for prompts in model.prompts:
            rows = prompts.embeddings()[:, 1 : 1 + config.n_ctx].detach().numpy()
            expected = np.broadcast_to(ctx.detach().numpy(), rows.shape)
            np.testing.assert_array_equal(rows, expected)
        # it changed in this task, and nothing of the frozen CLIP did
        assert not torch.equal(ctx, snapshots[-1])
        snapshots.append(ctx.detach().clone())
        assert all(torch.equal(p, clip_before[n]) for n, p in model.clip.named_parameters())
        assert strategy.trainable_parameters() == config.n_ctx * width
        results = strategy.eval(synthetic_stream.test_stream)
        model.eval()
        with torch.no_grad():
            scores = model(images)
        # the text features the evaluation cached are those of the context as it is now
        cached = model.text_features().clone()
        model.invalidate_text_cache()
        torch.testing.assert_close(model.text_features(), cached, rtol=0, atol=0)
        # classes not learned yet score UNSEEN_SCORE
        unseen = [c for c in range(6) if c not in model.seen_classes]
        assert (scores[:, unseen] == UNSEEN_SCORE).all()
        assert_metrics_match_model(results, scores, labels, per_exp=20)
    assert model.task_classes == [[0, 1], [2, 3], [4, 5]]


def test_a_saved_coop_model_loads_with_the_same_scores(
    tiny_config, synthetic_stream, class_names, test_items, tmp_path
):
    torch.manual_seed(0)
    strategy = CoOp(
        config=tiny_config(init_epochs=2, epochs=2),
        class_names=class_names,
        evaluator=None,
        progress=False,
    )
    for experience in synthetic_stream.train_stream[:2]:
        strategy.train(experience)
    images, _ = test_items
    strategy.model.eval()
    with torch.no_grad():
        expected = strategy.model(images)
    loaded = CLIPHingeModel.load(strategy.model.save(tmp_path / "coop.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected)


def test_coop_refuses_what_it_does_not_have(tiny_config, class_names):
    torch.manual_seed(0)
    config = tiny_config()
    with pytest.raises(ConfigError, match="CoOp runs without replay.*GaussianReplayPlugin"):
        CoOp(config=config, class_names=class_names, plugins=[GaussianReplayPlugin()])
    with pytest.raises(ConfigError, match="one shared context"):
        CoOp(config=config, class_names=class_names, model=build_model(config, class_names))
    with pytest.raises(ConfigError, match="CLIPHingeConfig"):
        CoOp(config={"lr": 0.1}, class_names=class_names)


# ---- joint training of the method -----------------------------------------------------------
@pytest.mark.parametrize("layout", ["set", "left to the stream"])
def test_joint_training_learns_every_class_as_one_task(
    layout, tiny_config, synthetic_stream, class_names, evaluator_factory, test_items
):
    torch.manual_seed(0)
    config = tiny_config(init_epochs=4)
    if layout != "set":
        config = config.replace(init_class=None, increment=None, total_tasks=None)
    data = TrainingData()
    strategy = JointTraining(
        config=config,
        class_names=class_names,
        evaluator=evaluator_factory(),
        plugins=[data],
        progress=False,
    )
    strategy.train(synthetic_stream.train_stream)
    model = strategy.model
    assert model.task_classes == [[0, 1, 2, 3, 4, 5]]
    assert strategy.clock.train_exp_counter == 1
    # one experience of all 180 training items, every class in it
    expected = [t for e in synthetic_stream.train_stream for t in e.dataset.targets]
    assert data.seen == [([0, 1, 2, 3, 4, 5], expected)]
    assert strategy.trainable_parameters() == sum(p.ctx.numel() for p in model.prompts)
    results = strategy.eval(synthetic_stream.test_stream)
    images, labels = test_items
    model.eval()
    with torch.no_grad():
        scores = model(images)
    assert_metrics_match_model(results, scores, labels, per_exp=20)
    with pytest.raises(ConfigError, match="trains once"):
        strategy.train(synthetic_stream.train_stream)


def test_joint_experience_merges_the_stream(synthetic_stream):
    merged = joint_experience(synthetic_stream.train_stream)
    assert merged.classes_in_this_experience == [0, 1, 2, 3, 4, 5]
    assert merged.current_experience == 0
    assert merged.origin_stream.name == "train"
    assert merged.origin_stream.benchmark is synthetic_stream
    expected = [t for e in synthetic_stream.train_stream for t in e.dataset.targets]
    assert list(merged.dataset.targets) == expected
    single = joint_experience(synthetic_stream.train_stream[1])
    assert single.classes_in_this_experience == [2, 3]
    with pytest.raises(ConfigError, match="training experiences"):
        joint_experience([])


# ---- joint linear probe ---------------------------------------------------------------------
def test_joint_linear_probe_trains_every_class_at_once(
    tiny_config, synthetic_stream, class_names, evaluator_factory, test_items
):
    torch.manual_seed(0)
    config = tiny_config(init_epochs=5)
    data = TrainingData()
    strategy = JointLinearProbe(
        config=config,
        class_names=class_names,
        evaluator=evaluator_factory(),
        plugins=[data],
        progress=False,
    )
    model = strategy.model
    images, labels = test_items
    with torch.no_grad():
        before = model(images)
    assert (before == UNSEEN_SCORE).all()  # nothing learned yet
    clip_before = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    strategy.train(synthetic_stream.train_stream)
    assert model.task_classes == [[0, 1, 2, 3, 4, 5]]
    assert strategy.clock.train_exp_counter == 1
    assert strategy.clock.train_exp_epochs == 5
    expected = [t for e in synthetic_stream.train_stream for t in e.dataset.targets]
    assert data.seen == [([0, 1, 2, 3, 4, 5], expected)]
    # minibatches drawn from the whole stream: 180 items, ceil(180 / 16) steps an epoch, and
    # most mix classes of different experiences of the stream
    assert strategy.clock.train_iterations == len(data.minibatches) == 5 * 12
    assert sorted(y for batch in data.minibatches[:12] for y in batch) == sorted(expected)
    mixed = [len({y // 2 for y in batch}) > 1 for batch in data.minibatches]
    assert sum(mixed) > len(mixed) // 2
    weight = model.head.weight.detach().numpy()
    assert (np.abs(weight).sum(axis=1) > 0).all()  # every class's row left zero
    assert all(torch.equal(p, clip_before[n]) for n, p in model.clip.named_parameters())
    dim = model.backbone.embed_dim
    assert strategy.trainable_parameters() == 6 * (dim + 1)
    results = strategy.eval(synthetic_stream.test_stream)
    # the probe's scores in numpy: normalised frozen features times W plus b
    model.eval()
    with torch.no_grad():
        features = model.frozen_features(images).numpy().astype(np.float64)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    scores = features @ weight.T.astype(np.float64) + model.head.bias.detach().numpy()
    assert_metrics_match_model(results, torch.from_numpy(scores), labels, per_exp=20)
    assert results[STREAM_ACC] > 0.5  # it learned something on the learnable stream
    with pytest.raises(ConfigError, match="trains once"):
        strategy.train(synthetic_stream.train_stream)


def test_upper_bound_flags():
    assert JointTraining.upper_bound is True and JointLinearProbe.upper_bound is True
    assert CoOp.upper_bound is False
    assert getattr(CLIPHingeStrategy, "upper_bound", False) is False
