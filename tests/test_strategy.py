"""CLIPHingeStrategy end to end: the tiny offline CLIP on a learnable 3-experience stream.

Runs are shared between tests through module-scoped fixtures; recorder plugins placed
around the method's plugins capture what happens inside training, and the expected values
are recomputed here (numpy or open_clip directly) rather than read back from the package.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin

from avalanche_cliphinge import (
    TINY_MODEL,
    CLIPHingeStrategy,
    ConfigError,
    GaussianReplayPlugin,
    HardPairHingePlugin,
    SecondStagePlugin,
    build_model,
    class_gaussian_stats,
    default_plugins,
    load_clip,
    select_hard_pairs,
)
from avalanche_cliphinge.strategy import ExperienceClasses

ACC_STREAM = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
FORGETTING_STREAM = "StreamForgetting/eval_phase/test_stream"
TASK_CLASSES = [[0, 1], [2, 3], [4, 5]]
CHANCE = 1 / 6


def acc_exp(j: int) -> str:
    return f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"


def old_classes(task: int):
    return [c for t in range(task) for c in TASK_CLASSES[t]]


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def numpy_hinge(feats, old_text, new_text, margin) -> float:
    pos = numpy_cosine(feats, old_text[None])[:, 0]
    neg = numpy_cosine(feats, new_text[None])[:, 0]
    return float(np.maximum(0.0, neg - pos + margin).mean())


def frozen_features(model, images: torch.Tensor) -> torch.Tensor:
    """Image features straight from open_clip (no adapter; LoRA adapters disabled)."""
    with torch.no_grad():
        return model.clip.encode_image(images).float()


def hand_scores(model, feats: torch.Tensor, head_scale: float):
    """``(clip_logits, head_logits)`` over the seen classes, float64, from the parameters."""
    with torch.no_grad():
        f = F.normalize(feats.double(), dim=-1)
        if model.adapter is not None:
            f = F.normalize(model.adapter(feats.float()).double(), dim=-1)
        text = model.text_features().double()
        clip = model.clip.logit_scale.exp().double() * f @ text.T
        head = torch.zeros_like(clip)
        plain = F.normalize(feats.double(), dim=-1)
        start = 0
        for task, classes in enumerate(model.task_classes):
            cols = slice(start, start + len(classes))
            if str(task) in model.heads:
                linear = model.heads[str(task)].linear
                head[:, cols] = head_scale * (
                    plain @ linear.weight.double().T + linear.bias.double()
                )
            else:  # no head yet: the untrained head, i.e. the scaled prompted-text cosine
                head[:, cols] = head_scale * plain @ text[cols].T
            start += len(classes)
    return clip, head


def snapshot_ctx(model):
    return [p.ctx.detach().clone() for p in model.prompts]


def find_plugin(strategy, kind):
    found = [p for p in strategy.plugins if isinstance(p, kind)]
    return found[0] if found else None


# ---- recorder plugins -------------------------------------------------------------------
class HingeNoiseState(SupervisedPlugin):
    """The hinge's RNG state at each epoch's start, before the strategy draws the epoch's
    noise from it (step by step, text pairs then image pairs)."""

    def __init__(self, hinge):
        super().__init__()
        self.hinge = hinge
        self.epoch_start = None

    def before_training_epoch(self, strategy, **kwargs):
        self.epoch_start = self.hinge._generator.get_state()


class Recorder(SupervisedPlugin):
    """Placed after the replay and hinge plugins and before stage 2."""

    def __init__(self, config, hinge, noise_state):
        super().__init__()
        self.config, self.hinge, self.noise_state = config, hinge, noise_state
        self.batches = []  # (task, epoch, minibatch size, replay size, replay labels)
        self.lrs = defaultdict(list)
        self.pairs = {}  # task -> (text pairs, image pairs)
        self.hinge_checks = []  # (task, loss the hinge terms added, numpy recomputation)
        self.pre_stage2 = {}  # task -> (prompt ctx, head keys) before stage 2 runs

    def before_training_epoch(self, strategy, **kwargs):
        task = strategy.current_task
        self.lrs[task].append([g["lr"] for g in strategy.optimizer.param_groups])
        self.pairs[task] = (list(self.hinge.text_pairs), list(self.hinge.image_pairs))

    def before_forward(self, strategy, **kwargs):
        feats = strategy.replay_features
        self.batches.append(
            (
                strategy.current_task,
                strategy.clock.train_exp_epochs,
                len(strategy.mb_y),
                None if feats is None else feats.shape[0],
                None if feats is None else strategy.replay_labels.tolist(),
            )
        )

    def before_backward(self, strategy, **kwargs):
        # the loss is the cross-entropy plus the hinge terms (no other plugin adds to it)
        added = float(strategy.loss.detach()) - float(strategy.loss_terms["cross_entropy"])
        step = strategy.clock.train_epoch_iterations
        expected = self.expected_hinge(strategy, self.noise_state.epoch_start, step)
        self.hinge_checks.append((strategy.current_task, added, expected))

    def expected_hinge(self, strategy, state, step: int) -> float:
        """The hinge terms of ``step`` recomputed in numpy from the same Gaussian draws
        (those of the epoch's earlier steps drawn first, from the epoch's start state)."""
        model, cfg = strategy.model, self.config
        generator = torch.Generator()
        generator.set_state(state)
        text = strategy.step.text_features.detach().double().numpy()
        seen = model.seen_classes
        sides = [
            (pairs, margin, weight)
            for pairs, margin, weight in (
                (self.hinge.text_pairs, cfg.text_hinge_margin, cfg.text_hinge_weight),
                (self.hinge.image_pairs, cfg.image_hinge_margin, cfg.image_hinge_weight),
            )
            if pairs
        ]
        n = cfg.hinge_samples_per_pair
        for _ in range(step):
            for pairs, _, _ in sides:
                model.gaussians.sample([p[0] for p in pairs], n, generator)
        total = 0.0
        for pairs, margin, weight in sides:
            feats, _ = model.gaussians.sample([p[0] for p in pairs], n, generator)
            feats = feats.double().numpy().reshape(len(pairs), n, -1)
            total += weight * np.mean(
                [
                    numpy_hinge(feats[k], text[seen.index(old)], text[seen.index(new)], margin)
                    for k, (old, new, _) in enumerate(pairs)
                ]
            )
        return total

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        self.pre_stage2[strategy.current_task] = (snapshot_ctx(model), sorted(model.heads.keys()))


# ---- the main run -----------------------------------------------------------------------
MAIN = dict(
    init_epochs=10,
    epochs=8,
    init_lr=0.02,
    lr=0.01,
    lr_decay_epochs=[3, 6],
    lr_decay_factor=0.5,
    weight_decay=1e-6,
    samples_per_old_class=5,
    text_hard_pair_threshold=0.0,
    text_top_hard_pairs=3,
    text_hinge_weight=2.0,
    text_hinge_margin=0.1,
    use_image_hinge_loss=True,
    image_hard_pair_threshold=-1.0,
    image_top_hard_pairs=2,
    image_hinge_weight=0.5,
    image_hinge_margin=0.2,
    hinge_samples_per_pair=6,
    second_stage_epochs=2,
    second_stage_logit_scale=15.0,
)


@pytest.fixture(scope="module")
def main_run(tiny_config, run_stream):
    config = tiny_config(**MAIN)
    replay = GaussianReplayPlugin(
        samples_per_old_class=config.samples_per_old_class, seed=config.seed
    )
    hinge = HardPairHingePlugin.from_config(config)
    noise_state = HingeNoiseState(hinge)
    recorder = Recorder(config, hinge, noise_state)
    stage2 = SecondStagePlugin.from_config(config)
    snaps = {"ctx": [], "heads": [], "optimizer": []}

    def on_start(strategy):
        snaps["clip"] = {k: v.clone() for k, v in strategy.model.clip.state_dict().items()}

    def after_exp(strategy, i):
        model = strategy.model
        snaps["ctx"].append(snapshot_ctx(model))
        snaps["heads"].append(sorted(model.heads.keys()))
        snaps["optimizer"].append(
            [(p, g["weight_decay"]) for g in strategy.optimizer.param_groups for p in g["params"]]
        )

    strategy, results = run_stream(
        config,
        plugins=[replay, noise_state, hinge, recorder, stage2],
        use_default_plugins=False,
        on_start=on_start,
        after_exp=after_exp,
    )
    return SimpleNamespace(
        config=config,
        strategy=strategy,
        model=strategy.model,
        results=results,
        recorder=recorder,
        hinge=hinge,
        snaps=snaps,
    )


def test_three_experiences_learn_well_above_chance_with_avalanche_metrics(main_run):
    final = main_run.results[-1]
    assert ACC_STREAM in final and FORGETTING_STREAM in final
    assert final[ACC_STREAM] > 0.6, f"stream accuracy {final[ACC_STREAM]:.3f} (chance {CHANCE:.3f})"
    for i, result in enumerate(main_run.results):
        # classes of later experiences are never predicted before they are learned
        for j in range(i + 1, 3):
            assert result[acc_exp(j)] == 0.0
        assert result[ACC_STREAM] <= (2 * (i + 1)) / 6 + 1e-9
    assert all(main_run.results[i][acc_exp(i)] > 0.8 for i in range(3))


def test_eval_scores_are_clip_plus_alpha_times_head(main_run, synthetic_data):
    model = main_run.model
    x, y = synthetic_data["test_x"], synthetic_data["test_y"]
    model.eval()
    feats = frozen_features(model, x)
    clip, head = hand_scores(model, feats, head_scale=15.0)
    expected = clip + 0.3 * head
    seen = model.seen_classes
    assert seen == [0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        full = model(x)
        np.testing.assert_allclose(
            full[:, seen].double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-3
        )
        fused = model.clip_logits(feats) + 0.3 * model.head_logits(x, feats)
        np.testing.assert_allclose(model.seen_scores(x).numpy(), fused.numpy(), atol=1e-4)
    assert "0" not in model.heads and {"1", "2"} <= set(model.heads)
    text0 = model.task_text_features(0).double()  # task 0: the untrained-head logit
    np.testing.assert_allclose(
        head[:, :2].numpy(),
        (15.0 * F.normalize(feats.double(), dim=-1) @ text0.T).numpy(),
        rtol=1e-6,
    )
    # Avalanche's per-experience accuracy is the argmax of exactly these scores
    prediction = torch.tensor(seen)[expected.argmax(1)]
    for j, classes in enumerate(TASK_CLASSES):
        mask = torch.isin(y, torch.tensor(classes))
        accuracy = float((prediction[mask] == y[mask]).double().mean())
        assert main_run.results[-1][acc_exp(j)] == pytest.approx(accuracy, abs=1e-9)
    # in training mode the heads are not used
    model.train()
    try:
        with torch.no_grad():
            np.testing.assert_allclose(
                model.seen_scores(feats).double().numpy(), clip.numpy(), rtol=1e-4, atol=1e-3
            )
    finally:
        model.eval()


def test_frozen_clip_weights_are_bit_identical_after_training(main_run):
    before, after = main_run.snaps["clip"], main_run.model.clip.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert all(not p.requires_grad for p in main_run.model.clip.parameters())


def test_optimizer_never_holds_a_clip_parameter(main_run):
    model = main_run.model
    clip_ids = {id(p) for p in model.clip.parameters()}
    for task, snapshot in enumerate(main_run.snaps["optimizer"]):
        params = [p for p, _ in snapshot]
        assert not {id(p) for p in params} & clip_ids
        assert len(params) == 1 and params[0] is model.prompts[task].ctx
        assert all(wd == pytest.approx(1e-6) for _, wd in snapshot)


def test_old_prompts_stay_frozen_by_default(main_run):
    ctx = main_run.snaps["ctx"]
    assert torch.equal(ctx[1][0], ctx[0][0]) and torch.equal(ctx[2][0], ctx[0][0])
    assert torch.equal(ctx[2][1], ctx[1][1])
    model = main_run.model
    with torch.no_grad():
        phrase = model.clip.token_embedding(model.tokenizer(["a photo of a"]))[0, 1:5]
    for task in range(3):  # the current task's prompts did learn
        assert (ctx[task][task] - phrase).abs().max() > 1e-3
    assert all(not p.ctx.requires_grad for p in model.prompts)


def test_stage2_leaves_every_prompt_unchanged(main_run):
    recorder, snaps = main_run.recorder, main_run.snaps
    for task in (1, 2):
        ctx_before, heads_before = recorder.pre_stage2[task]
        # the snapshot was taken before this task's stage 2, which then added its head
        assert heads_before == [str(t) for t in range(1, task)]
        assert snaps["heads"][task] == [str(t) for t in range(1, task + 1)]
        assert len(ctx_before) == task + 1
        for a, b in zip(ctx_before, snaps["ctx"][task]):
            assert torch.equal(a, b)


def test_heads_exist_from_second_stage_start_task_on(main_run):
    assert main_run.snaps["heads"] == [[], ["1"], ["1", "2"]]
    for key in ("1", "2"):
        head = main_run.model.heads[key]
        assert head.logit_scale == 15.0
        assert head.linear.weight.shape == (2, 64)
        assert all(not p.requires_grad for p in head.parameters())


def test_learning_rate_schedule_and_epoch_counts(main_run):
    lrs = {task: [group[0] for group in epochs] for task, epochs in main_run.recorder.lrs.items()}
    decays = lambda e: sum(e >= d for d in (3, 6))  # noqa: E731
    assert lrs[0] == pytest.approx([0.02 * 0.5 ** decays(e) for e in range(10)])
    for task in (1, 2):
        assert lrs[task] == pytest.approx([0.01 * 0.5 ** decays(e) for e in range(8)])


def test_gaussian_replay_is_spread_evenly_over_each_epoch(main_run):
    per_epoch = defaultdict(list)
    for task, epoch, mb_size, size, labels in main_run.recorder.batches:
        per_epoch[(task, epoch)].append((mb_size, size, labels))
    assert sorted({e for t, e in per_epoch if t == 0}) == list(range(10))
    assert sorted({e for t, e in per_epoch if t == 2}) == list(range(8))
    for (task, _epoch), rows in per_epoch.items():
        assert sorted(mb for mb, _, _ in rows) == [12, 16, 16, 16]  # 60 samples, batch 16
        sizes = [size for _, size, _ in rows]
        if task == 0:
            assert sizes == [None] * 4  # nothing to replay yet
            continue
        old = old_classes(task)
        assert sum(sizes) == 5 * len(old)
        assert max(sizes) - min(sizes) <= 1
        counts = Counter(label for _, _, labels in rows for label in labels)
        assert counts == {c: 5 for c in old}  # only old classes


def test_hard_pairs_are_select_hard_pairs_on_raw_text_features(
    main_run, synthetic_data, class_names
):
    model, config = main_run.model, main_run.config
    text_pairs, image_pairs = main_run.recorder.pairs[0]
    assert text_pairs == [] and image_pairs == []
    x, y = synthetic_data["train_x"], synthetic_data["train_y"]
    means = {c: frozen_features(model, x[y == c]).double().mean(0).numpy() for c in range(6)}
    for task in (1, 2):
        new, old = TASK_CLASSES[task], old_classes(task)
        text_pairs, image_pairs = main_run.recorder.pairs[task]
        expected = select_hard_pairs(
            model.raw_text_features(new),
            model.raw_text_features(old),
            new,
            old,
            config.text_hard_pair_threshold,
            config.text_top_hard_pairs,
        )
        assert [(o, n) for o, n, _ in text_pairs] == [(o, n) for o, n, _ in expected]
        # and from scratch: open_clip text features of the template, cosine in numpy
        with torch.no_grad():
            tokens = model.tokenizer(
                [config.prompt_template.format(class_names[c]) for c in new + old]
            )
            encoded = model.clip.encode_text(tokens).double().numpy()
        sim = numpy_cosine(encoded[: len(new)], encoded[len(new) :])
        ranked = sorted(
            (
                (old[c], new[r], sim[r, c])
                for r in range(len(new))
                for c in range(len(old))
                if sim[r, c] > 0.0
            ),
            key=lambda p: (-p[2], p[0], p[1]),
        )[:3]
        assert len(text_pairs) == min(3, len(ranked))
        assert [(o, n) for o, n, _ in text_pairs] == [(o, n) for o, n, _ in ranked]
        np.testing.assert_allclose(
            [s for _, _, s in text_pairs], [s for _, _, s in ranked], atol=1e-5
        )
        # image side: cosine of the class means of the frozen features
        mean_sim = numpy_cosine(
            np.stack([means[c] for c in new]), np.stack([means[c] for c in old])
        )
        ranked = sorted(
            ((old[c], new[r], mean_sim[r, c]) for r in range(len(new)) for c in range(len(old))),
            key=lambda p: (-p[2], p[0], p[1]),
        )[:2]
        assert [(o, n) for o, n, _ in image_pairs] == [(o, n) for o, n, _ in ranked]
        np.testing.assert_allclose(
            [s for _, _, s in image_pairs], [s for _, _, s in ranked], atol=1e-5
        )


def test_hinge_plugin_adds_the_recomputed_hinge_to_the_loss(main_run):
    checks = main_run.recorder.hinge_checks
    first = [(added, expected) for task, added, expected in checks if task == 0]
    assert len(first) == 10 * 4 and all(a == 0.0 and e == 0.0 for a, e in first)
    later = [(task, added, expected) for task, added, expected in checks if task > 0]
    assert len(later) == 2 * 8 * 4
    for task, added, expected in later:
        assert added == pytest.approx(expected, abs=1e-4), f"task {task}"
    # the hinge becomes active in task 1 (new prompts start as "a photo of a <name>") and 2
    for task in (1, 2):
        assert max(added for t, added, _ in later if t == task) > 0.01
    assert main_run.hinge.last_losses["text"] >= 0.0


# ---- variations -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def update_old_run(tiny_config, run_stream):
    config = tiny_config(
        update_old_text_prompts=True,
        text_hard_pair_threshold=1.0,
        init_epochs=3,
        epochs=3,
        second_stage_epochs=0,
        samples_per_old_class=0,
    )
    snaps = {"ctx": [], "optimizer": []}

    def after_exp(strategy, i):
        snaps["ctx"].append(snapshot_ctx(strategy.model))
        snaps["optimizer"].append([p for g in strategy.optimizer.param_groups for p in g["params"]])

    strategy, results = run_stream(config, n_experiences=2, after_exp=after_exp)
    return SimpleNamespace(strategy=strategy, snaps=snaps, results=results)


def test_old_prompts_change_when_update_old_text_prompts_is_true(update_old_run):
    ctx, optimizer = update_old_run.snaps["ctx"], update_old_run.snaps["optimizer"]
    model = update_old_run.strategy.model
    assert (ctx[1][0] - ctx[0][0]).abs().max() > 1e-4
    assert len(optimizer[1]) == 2
    assert optimizer[1][0] is model.prompts[0].ctx and optimizer[1][1] is model.prompts[1].ctx


def test_threshold_one_selects_no_hard_pairs(update_old_run):
    strategy = update_old_run.strategy
    hinge = find_plugin(strategy, HardPairHingePlugin)
    assert hinge is not None
    assert hinge.text_pairs == [] and hinge.last_losses["text"] == 0.0
    # default plugins follow the config: no replay (0 samples) and no stage 2 (0 epochs)
    assert find_plugin(strategy, GaussianReplayPlugin) is None
    assert find_plugin(strategy, SecondStagePlugin) is None


@pytest.fixture(scope="module")
def no_stage2_run(tiny_config, run_stream):
    config = tiny_config(
        second_stage_epochs=0,
        init_epochs=3,
        epochs=3,
        text_hard_pair_threshold=0.0,
        samples_per_old_class=5,
    )
    heads = []
    strategy, results = run_stream(config, after_exp=lambda s, i: heads.append(len(s.model.heads)))
    return SimpleNamespace(strategy=strategy, heads=heads, results=results)


def test_second_stage_epochs_zero_gives_clip_logits_only(no_stage2_run, synthetic_data):
    strategy = no_stage2_run.strategy
    model = strategy.model
    assert no_stage2_run.heads == [0, 0, 0]
    assert find_plugin(strategy, SecondStagePlugin) is None
    assert find_plugin(strategy, GaussianReplayPlugin) is not None
    model.eval()
    x = synthetic_data["test_x"]
    clip, _ = hand_scores(model, frozen_features(model, x), head_scale=1.0)
    assert len(model.heads) == 0  # no head at all: scores are not fused
    with torch.no_grad():
        np.testing.assert_allclose(model(x).double().numpy(), clip.numpy(), rtol=1e-4, atol=1e-3)


def test_stage2_head_follows_sgd_with_the_configured_hyperparameters(no_stage2_run):
    """Two full-batch epochs of SecondStagePlugin equal two SGD steps worked out here."""
    source = no_stage2_run.strategy
    model = copy.deepcopy(source.model)
    feats, labels = (t.cpu() for t in source.current_features)  # task 2: classes 4, 5
    assert sorted(set(labels.tolist())) == [4, 5] and len(labels) == 60
    lr, momentum, decay, scale = 0.5, 0.9, 0.01, 15.0
    plugin = SecondStagePlugin(
        start_task=0,
        epochs=2,
        lr=lr,
        momentum=momentum,
        weight_decay=decay,
        logit_scale=scale,
        batch_size=64,
        seed=0,
    )
    # the strategy side the plugin declares (STRATEGY_NEEDS), by hand: task 2 was just created
    created = ExperienceClasses(present=model.task_classes[2], new=model.task_classes[2], task=2)
    fake = SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        autocast=nullcontext,
        current_features=(feats, labels),
        experience=None,
        config=source.config,
        experience_classes=created,
        adapted_dataset=None,
    )
    with torch.no_grad():
        weight = model.task_text_features(2).double().clone()
    bias = torch.zeros(2, dtype=torch.float64)
    f, target = F.normalize(feats.double(), dim=-1), labels - 4
    buffers, losses = None, []
    for _ in range(2):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        loss = F.cross_entropy(scale * (f @ w.T + b), target)
        grads = torch.autograd.grad(loss, [w, b])
        steps = [g + decay * p for g, p in zip(grads, (weight, bias))]
        buffers = steps if buffers is None else [momentum * v + d for v, d in zip(buffers, steps)]
        weight, bias = weight - lr * buffers[0], bias - lr * buffers[1]
        losses.append(float(loss))
    plugin.after_training_exp(fake)
    head = model.heads["2"]
    assert head.logit_scale == scale
    np.testing.assert_allclose(plugin.losses, losses, rtol=1e-5)
    np.testing.assert_allclose(
        head.linear.weight.detach().double().numpy(), weight.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(head.linear.bias.detach().double().numpy(), bias.numpy(), atol=1e-5)
    assert "2" not in source.model.heads


def test_default_plugins_follow_the_config(tiny_config):
    kinds = lambda **kw: [type(p) for p in default_plugins(tiny_config(**kw))]  # noqa: E731
    assert kinds() == [GaussianReplayPlugin, HardPairHingePlugin, SecondStagePlugin]
    assert kinds(samples_per_old_class=0) == [HardPairHingePlugin, SecondStagePlugin]
    assert kinds(text_use_hinge_loss=False) == [GaussianReplayPlugin, SecondStagePlugin]
    assert kinds(text_use_hinge_loss=False, use_image_hinge_loss=True) == [
        GaussianReplayPlugin,
        HardPairHingePlugin,
        SecondStagePlugin,
    ]
    assert kinds(second_stage_epochs=0) == [GaussianReplayPlugin, HardPairHingePlugin]
    hinge = default_plugins(tiny_config(text_use_hinge_loss=False, use_image_hinge_loss=True))[1]
    assert hinge.text_hinge is False and hinge.image_hinge is True


@pytest.fixture(scope="module")
def lora_run(tiny_config, run_stream):
    config = tiny_config(
        use_lora_in_second_stage=True,
        lora_layers=[1],
        lora_rank=2,
        lora_alpha=4.0,
        init_epochs=1,
        epochs=1,
        second_stage_epochs=2,
        second_stage_lr=0.05,
        second_stage_fusion_weight=0.5,
        samples_per_old_class=5,
    )
    snaps = {"lora": []}

    def on_start(strategy):
        snaps["visual"] = {k: v.clone() for k, v in strategy.model.clip.visual.state_dict().items()}

    def after_exp(strategy, i):
        snaps["lora"].append(
            {
                n: p.detach().clone()
                for n, p in strategy.model.clip.visual.named_parameters()
                if "lora_" in n
            }
        )

    strategy, results = run_stream(config, on_start=on_start, after_exp=after_exp)
    return SimpleNamespace(
        config=config, strategy=strategy, model=strategy.model, results=results, snaps=snaps
    )


def test_lora_run_adds_one_adapter_per_stage2_task(lora_run):
    model = lora_run.model
    assert model.lora is not None and model.lora.adapters == ["task1", "task2"]
    assert ACC_STREAM in lora_run.results[-1]
    names = list(lora_run.snaps["lora"][-1])
    assert names and all(".resblocks.1." in n for n in names)  # only the chosen block
    for adapter in ("task1", "task2"):
        assert any(f".{adapter}." in n for n in names)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.clip.visual.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.r["task1"] == 2 and m.r["task2"] == 2 for m in layers)
    assert all(m.scaling["task1"] == pytest.approx(4.0 / 2) for m in layers)


def test_lora_leaves_the_base_weights_of_the_visual_blocks_unchanged(lora_run):
    before = lora_run.snaps["visual"]
    after = lora_run.model.clip.visual.state_dict()
    base = {k.replace("base_layer.", ""): v for k, v in after.items() if "lora_" not in k}
    assert set(base) == set(before)
    assert any("base_layer" in k for k in after)
    changed = [k for k in before if not torch.equal(before[k], base[k])]
    assert changed == [], f"frozen image-encoder weights moved: {changed}"


def test_lora_adapters_train_and_later_tasks_leave_earlier_ones_alone(lora_run):
    after_task1, after_task2 = lora_run.snaps["lora"][1], lora_run.snaps["lora"][2]
    for adapter in ("task1", "task2"):
        b_weights = [v for n, v in after_task2.items() if f"lora_B.{adapter}." in n]
        assert b_weights
        assert any(v.abs().max() > 0 for v in b_weights), (
            f"LoRA adapter {adapter} never trained: every lora_B is still 0"
        )
    for name, value in after_task1.items():
        if ".task1." in name:
            assert torch.equal(value, after_task2[name]), name


def test_lora_head_logits_use_the_adapted_features(lora_run, synthetic_data):
    model = lora_run.model
    model.eval()
    x = synthetic_data["test_x"]
    feats = frozen_features(model, x)
    clip, plain_head = hand_scores(
        model, feats, head_scale=lora_run.config.second_stage_logit_scale
    )
    with torch.no_grad():
        lora_head = model.head_logits(x, feats).double()
        # by hand: each task's head on the features of its own adapter
        expected = torch.zeros_like(lora_head)
        for task in (1, 2):
            with model.lora.using(f"task{task}"):
                adapted = model.clip.encode_image(x).float()
            cols = slice(2 * task, 2 * task + 2)
            expected[:, cols] = model.heads[str(task)](adapted).double()
        expected[:, :2] = plain_head[:, :2]  # task 0: no head, no adapter
        np.testing.assert_allclose(lora_head.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
        gap = float((lora_head[:, 2:] - plain_head[:, 2:]).abs().max())
        assert gap > 1e-3, f"LoRA heads score like plain heads (max gap {gap:.2e})"
        # the CLIP logits come from the frozen encoder; scores fuse with alpha = 0.5
        np.testing.assert_allclose(
            model.seen_scores(x).double().numpy(),
            (clip + 0.5 * lora_head).numpy(),
            rtol=1e-4,
            atol=1e-3,
        )
    fresh = load_clip(TINY_MODEL, None).model
    fresh.visual.load_state_dict(lora_run.snaps["visual"])
    np.testing.assert_allclose(
        feats.numpy(), frozen_features(SimpleNamespace(clip=fresh), x).numpy(), atol=1e-5
    )


@pytest.fixture(scope="module")
def adapter_run(tiny_config, run_stream):
    config = tiny_config(
        use_image_adapter=True,
        second_stage_start_task=0,
        covariance_shrinkage=0.5,
        covariance_jitter=1e-3,
        init_epochs=3,
        epochs=3,
        second_stage_epochs=1,
        samples_per_old_class=5,
    )
    snaps = {"adapter": [], "heads": [], "optimizer": []}

    def on_start(strategy):
        snaps["initial"] = strategy.model.adapter.linear.weight.detach().clone()

    def after_exp(strategy, i):
        snaps["adapter"].append(strategy.model.adapter.linear.weight.detach().clone())
        snaps["heads"].append(sorted(strategy.model.heads.keys()))
        snaps["optimizer"].append([p for g in strategy.optimizer.param_groups for p in g["params"]])

    strategy, results = run_stream(config, n_experiences=2, on_start=on_start, after_exp=after_exp)
    return SimpleNamespace(
        config=config, strategy=strategy, model=strategy.model, results=results, snaps=snaps
    )


def test_image_adapter_trains_in_stage1(adapter_run):
    snaps, model = adapter_run.snaps, adapter_run.model
    assert torch.count_nonzero(snaps["initial"]) == 0  # starts as the identity
    assert snaps["adapter"][0].abs().max() > 1e-5
    assert (snaps["adapter"][1] - snaps["adapter"][0]).abs().max() > 1e-5
    for params in snaps["optimizer"]:
        assert any(p is model.adapter.linear.weight for p in params)
    assert snaps["heads"] == [["0"], ["0", "1"]]  # second_stage_start_task=0


def test_gaussians_are_fitted_on_frozen_features_before_the_adapter(adapter_run, synthetic_data):
    model, strategy = adapter_run.model, adapter_run.strategy
    x, y = synthetic_data["train_x"], synthetic_data["train_y"]
    for c in range(4):
        feats = frozen_features(model, x[y == c]).double().numpy()
        cov = np.cov(feats, rowvar=False)
        dim = cov.shape[0]
        expected_cov = 0.5 * cov + (0.5 * np.trace(cov) / dim + 1e-3) * np.eye(dim)
        scale = np.abs(feats).max()
        np.testing.assert_allclose(
            model.gaussians.mean_of([c])[0].numpy(), feats.mean(0), atol=1e-5 * scale
        )
        np.testing.assert_allclose(
            model.gaussians.covariance_of([c])[0].numpy(), expected_cov, atol=1e-5 * scale**2
        )
        with torch.no_grad():
            adapted = model.adapter(torch.tensor(feats, dtype=torch.float32)).double().numpy()
        assert np.abs(adapted.mean(0) - feats.mean(0)).max() > 1e-4  # the adapter matters
    feats, labels = strategy.current_features
    classes, means, _ = class_gaussian_stats(feats.cpu(), labels.cpu())
    assert classes.tolist() == [2, 3]
    np.testing.assert_allclose(
        means.numpy(), model.gaussians.mean_of([2, 3]).cpu().numpy(), atol=1e-6
    )


@pytest.fixture(scope="module")
def cache_pair(tiny_config, run_stream):
    runs = {}
    for cache in (True, False):
        config = tiny_config(
            cache_features=cache,
            init_epochs=4,
            epochs=4,
            samples_per_old_class=5,
            text_hard_pair_threshold=0.0,
            second_stage_epochs=1,
        )
        strategy, results = run_stream(config, torch_seed=7)
        runs[cache] = SimpleNamespace(strategy=strategy, results=results)
    return runs


def test_feature_cache_does_not_change_the_results(cache_pair):
    cached, uncached = cache_pair[True], cache_pair[False]
    assert cached.strategy.features_cacheable and not uncached.strategy.features_cacheable

    def matrix(run):
        return np.array([[r[acc_exp(j)] for j in range(3)] for r in run.results])

    np.testing.assert_allclose(matrix(cached), matrix(uncached), atol=1e-5)
    assert matrix(cached)[-1].mean() > CHANCE
    for a, b in zip(cached.strategy.model.prompts, uncached.strategy.model.prompts):
        np.testing.assert_allclose(a.ctx.detach().numpy(), b.ctx.detach().numpy(), atol=1e-4)


# ---- errors -----------------------------------------------------------------------------
def test_wrong_number_of_class_names_raises_config_error(tiny_config, class_names):
    with pytest.raises(ConfigError, match="class_names has 5 names but .* = 6 classes"):
        CLIPHingeStrategy(config=tiny_config(), class_names=class_names[:5])


def test_experience_with_the_wrong_class_count_raises_config_error(
    tiny_config, class_names, evaluator_factory, synthetic_stream
):
    config = tiny_config(init_class=3, increment=3, total_tasks=2)
    torch.manual_seed(0)
    strategy = CLIPHingeStrategy(
        config=config, class_names=class_names, evaluator=evaluator_factory()
    )
    with pytest.raises(
        ConfigError,
        match=r"experience 0 has 2 classes but the config expects 3"
        r".*init_class=3, increment=3",
    ):
        strategy.train(synthetic_stream.train_stream[0])


# ---- model pieces the strategy relies on ------------------------------------------------
def test_prompt_context_starts_from_ctx_init(tiny_config, class_names):
    torch.manual_seed(0)
    model = build_model(tiny_config(n_ctx=3, ctx_init="a photo"), class_names)
    model.add_task([0, 1])
    ctx = model.prompts[0].ctx
    assert ctx.shape == (2, 3, 64) and ctx.requires_grad
    with torch.no_grad():
        phrase = model.clip.token_embedding(model.tokenizer(["a photo"]))[0, 1:3]
    assert torch.equal(ctx[0, :2], phrase) and torch.equal(ctx[1, :2], phrase)
    rest = ctx[:, 2].detach()  # no third word: N(0, 0.02^2)
    assert not torch.equal(rest[0], rest[1])
    assert 0.01 < float(rest.std()) < 0.04


def test_prompted_text_of_the_init_phrase_equals_clip_text_features(tiny_config, class_names):
    """With ctx = the words of ctx_init, the prompt is the sentence "a photo of a <name>."."""
    torch.manual_seed(0)
    model = build_model(tiny_config(n_ctx=4, ctx_init="a photo of a"), class_names)
    model.add_task([3, 4])
    with torch.no_grad():
        prompted = model.task_text_features(0)
        tokens = model.tokenizer([f"a photo of a {class_names[c]}." for c in (3, 4)])
        direct = F.normalize(model.clip.encode_text(tokens).float(), dim=-1)
    np.testing.assert_allclose(prompted.numpy(), direct.numpy(), atol=1e-5)


def test_raw_text_features_follow_the_prompt_template(tiny_config, class_names):
    torch.manual_seed(0)
    model = build_model(tiny_config(prompt_template="a drawing of a {}, in colour."), class_names)
    with torch.no_grad():
        raw = model.raw_text_features([0, 3])
        tokens = model.tokenizer([f"a drawing of a {class_names[c]}, in colour." for c in (0, 3)])
        direct = F.normalize(model.clip.encode_text(tokens).float(), dim=-1)
        other = F.normalize(
            model.clip.encode_text(
                model.tokenizer([f"a good photo of a {class_names[c]}." for c in (0, 3)])
            ).float(),
            dim=-1,
        )
    np.testing.assert_allclose(raw.numpy(), direct.numpy(), atol=1e-5)
    assert (raw - other).abs().max() > 1e-3
