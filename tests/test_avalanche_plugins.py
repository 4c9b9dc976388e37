"""Avalanche's own plugins on ``CLIPHingeStrategy``, each run beside the same plugin on ``Naive``.

A plugin either works, its effect checked against values worked out here (the replay memory's
rows in the minibatches and in the loss, EWC/MAS importances from gradients taken here, the
AGEM/GEM projections, LwF's distillation term from a teacher kept here, the state early
stopping restores, the learning rate an update uses), or it is refused when the strategy is
built, in one line saying why and what to do instead.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils.data_loader import ReplayDataLoader
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import (
    AGEMPlugin,
    EarlyStoppingPlugin,
    EvaluationPlugin,
    EWCPlugin,
    GDumbPlugin,
    GEMPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    MASPlugin,
    ReplayPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.storage_policy import (
    ClassBalancedBuffer,
    ExperienceBalancedBuffer,
    HerdingSelectionStrategy,
    ParametricBuffer,
    ReservoirSamplingBuffer,
)
from avalanche.training.supervised import Naive
from torchvision.transforms.functional import to_pil_image

from avalanche_cliphinge import CLIPHingeStrategy, ConfigError
from avalanche_cliphinge.streams import CLIP_MEAN, CLIP_STD

#: One epoch per experience; only cross-entropy in the stage-1 loss (no Gaussian replay, no
#: hinge), so what a plugin adds to the loss is read off directly.
BASE = dict(
    init_epochs=1,
    epochs=1,
    second_stage_epochs=0,
    samples_per_old_class=0,
    text_use_hinge_loss=False,
)
MEM = 12  # replay memory size


def quiet_evaluator():
    return EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])


class Probe(SupervisedPlugin):
    """Keeps ``read(strategy)`` at every call of one callback; placed in ``plugins`` where it
    must look (before or after the plugin under test)."""

    def __init__(self, callback: str, read):
        super().__init__()
        self.records = []
        setattr(self, callback, lambda strategy, **kwargs: self.records.append(read(strategy)))


@pytest.fixture(scope="module")
def clip(tiny_config, class_names):
    """Factory: a ``CLIPHingeStrategy`` with ``BASE`` plus config overrides."""

    def make(plugins=(), eval_every=-1, **overrides):
        torch.manual_seed(0)
        return CLIPHingeStrategy(
            config=tiny_config(**{**BASE, **overrides}),
            class_names=class_names,
            plugins=list(plugins),
            evaluator=quiet_evaluator(),
            eval_every=eval_every,
            progress=False,
        )

    return make


@pytest.fixture(scope="module")
def naive():
    """Factory: ``Naive`` on a linear model over the same images, one epoch per experience."""

    def make(plugins=(), epochs=1, **kwargs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 6))
        return Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=16,
            train_epochs=epochs,
            eval_mb_size=64,
            plugins=list(plugins),
            evaluator=quiet_evaluator(),
            **kwargs,
        )

    return make


# ---- streams that serve PIL images, tensors, or both -------------------------------------
def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised ``[n, 3, 32, 32]`` -> the uint8 pixels they were made of."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


class Served(torch.utils.data.Dataset):
    """The synthetic images as a stream serves them: ``pil`` (PIL images), ``tensor``
    (``ToTensor``'s ``[0, 1]`` floats) or ``mixed`` (PIL at even indices, tensors at odd)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, kind: str):
        self.pixels, self.kind = pixels, kind
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        pil = self.kind == "pil" or (self.kind == "mixed" and index % 2 == 0)
        pixels = self.pixels[index]
        return (to_pil_image(pixels) if pil else pixels.float() / 255), self.targets[index]


@pytest.fixture(scope="module")
def served(synthetic_data):
    """Factory: a 3-experience stream (classes 0-1, 2-3, 4-5; 16 training images a class)
    serving ``kind`` items."""
    keep = {
        split: torch.arange(len(synthetic_data[f"{split}_y"])) % per_class < 16
        for split, per_class in (("train", 30), ("test", 10))
    }
    pixels = {s: to_pixels(synthetic_data[f"{s}_x"][keep[s]]) for s in ("train", "test")}
    labels = {s: synthetic_data[f"{s}_y"][keep[s]] for s in ("train", "test")}

    def make(kind: str):
        return nc_benchmark(
            Served(pixels["train"], labels["train"], kind),
            Served(pixels["test"], labels["test"], kind),
            n_experiences=3,
            task_labels=False,
            fixed_class_order=list(range(6)),
        )

    return make


def clip_features(strategy, stream, experience: int):
    """``(features [n, dim], labels [n])`` of an experience's training images, encoded here:
    CLIP's own eval transform of each image as PIL, then the frozen image encoder."""
    backbone = strategy.model.backbone
    images, labels = [], []
    for x, y, *_ in stream.train_stream[experience].dataset:
        image = x if not isinstance(x, torch.Tensor) else to_pil_image((x * 255).round().byte())
        images.append(backbone.eval_transform(image))
        labels.append(int(y))
    with torch.no_grad():
        return strategy.model.clip.encode_image(torch.stack(images)).float(), torch.tensor(labels)


def drift(strategy, stream, parameter, after_first=None):
    """How far ``parameter(strategy)`` moves while the strategy trains experience 1
    (``after_first(strategy)`` runs between the two experiences)."""
    strategy.train(stream.train_stream[0])
    if after_first is not None:
        after_first(strategy)
    before = parameter(strategy).detach().clone()
    strategy.train(stream.train_stream[1])
    return float((parameter(strategy).detach() - before).norm())


def old_prompts(strategy):
    return strategy.model.prompts[0].ctx


def old_rows(strategy):  # Naive's output rows of the classes of experience 0
    return strategy.model[1].weight[:2]


# ---- ReplayPlugin ---------------------------------------------------------------------------
POLICIES = {
    "experience_balanced": lambda model, layer: ExperienceBalancedBuffer(MEM),
    "class_balanced": lambda model, layer: ClassBalancedBuffer(MEM),
    "reservoir": lambda model, layer: ReservoirSamplingBuffer(MEM),
    "parametric_by_class": lambda model, layer: ParametricBuffer(MEM, groupby="class"),
    "parametric_herding": lambda model, layer: ParametricBuffer(
        MEM, groupby="experience", selection_strategy=HerdingSelectionStrategy(model, layer)
    ),
}


def minibatch(strategy):
    return (
        strategy.mb_x.detach().clone(),
        strategy.mb_y.clone(),
        strategy.mb_output.detach().clone(),
        strategy.loss.detach().clone(),
    )


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_replay_memory_rows_train_with_their_labels(policy, clip, naive, served):
    """Every storage policy, on a stream mixing PIL images and tensors: the memory holds
    experience-0 images as CLIP's input, and they reach the minibatches of experience 1 (as
    frozen features) with their own labels, inside the cross-entropy."""
    mixed, tensors = served("mixed"), served("tensor")
    for name, strategy, stream in (
        ("clip", clip(), mixed),
        ("naive", naive(), tensors),
    ):
        layer = "clip.visual" if name == "clip" else "1"
        replay = ReplayPlugin(MEM, storage_policy=POLICIES[policy](strategy.model, layer))
        probe = Probe("before_backward", minibatch)  # first: the loss before any other term
        strategy.plugins[:0] = [probe, replay]
        strategy.train(stream.train_stream[0])
        memory = replay.storage_policy.buffer
        assert len(memory) == MEM
        assert {int(memory[i][1]) for i in range(MEM)} == {0, 1}
        probe.records.clear()
        strategy.train(stream.train_stream[1])
        if name == "clip":
            assert all(memory[i][0].shape == (3, 32, 32) for i in range(MEM))  # CLIP's input
            known, known_labels = clip_features(strategy, stream, 0)
        else:
            known = torch.stack([x for x, *_ in stream.train_stream[0].dataset]).flatten(1)
            known_labels = torch.tensor([int(y) for _, y, *_ in stream.train_stream[0].dataset])
        replayed = set()
        for x, y, scores, loss in probe.records:
            old = y < 2
            assert old.any() and (~old).any()  # current and memory rows in every minibatch
            for row, label in zip(x[old].flatten(1), y[old]):
                same = known_labels == label
                gap = (known[same] - row).abs().amax(1).min()
                assert gap < 1e-4, f"{name}: a memory row is no experience-0 image of its class"
                replayed.add(int(label))
            logits = scores[:, :4] if name == "clip" else scores
            assert loss == pytest.approx(float(F.cross_entropy(logits.float(), y)), rel=1e-5)
        assert replayed == {0, 1}
        if name == "clip":  # the cache serves the memory too: minibatches of features
            assert all(x.ndim == 2 for x, *_ in probe.records)


def test_replay_on_pil_tensor_and_mixed_streams_learns_the_same_prompts(clip, naive, served):
    """The three ways of serving the same pixels give one memory (CLIP's input) and one
    learned result; without the feature cache the replay minibatches are images. ``Naive``
    on the tensor stream keeps as many exemplars a class, as raw items."""
    results = {}
    for kind, cached in (("pil", True), ("tensor", True), ("mixed", True), ("pil", False)):
        strategy = clip(cache_features=cached)
        replay = ReplayPlugin(MEM, storage_policy=ClassBalancedBuffer(MEM))
        dims = Probe("before_forward", lambda s: s.mb_x.ndim)
        strategy.plugins[:0] = [replay, dims]
        for experience in served(kind).train_stream[:2]:
            strategy.train(experience)
        memory = replay.storage_policy.buffer
        items = torch.stack([memory[i][0] for i in range(len(memory))])
        assert items.shape == (MEM, 3, 32, 32)  # CLIP's input, from PIL images or tensors
        assert set(dims.records) == ({2} if cached else {4})  # features, or images
        if cached:
            results[kind] = (items, torch.cat([p.ctx.detach() for p in strategy.model.prompts]))
    items, prompts = results["pil"]
    for kind_items, kind_prompts in results.values():
        assert torch.equal(kind_items, items)
        torch.testing.assert_close(kind_prompts, prompts, atol=1e-5, rtol=0)
    strategy = naive()
    replay = ReplayPlugin(MEM, storage_policy=ClassBalancedBuffer(MEM))
    strategy.plugins.insert(0, replay)
    strategy.train(served("tensor").train_stream[0])
    counts = torch.bincount(torch.tensor(list(replay.storage_policy.buffer.targets)))
    assert counts.tolist() == [MEM // 2, MEM // 2]


def test_compile_step_names_the_replay_loader_it_cannot_capture(clip, served):
    strategy = clip(compile_step=True)
    data = served("tensor").train_stream[0].dataset
    strategy.dataloader = ReplayDataLoader(data, data, batch_size=4, batch_size_mem=4)
    assert strategy._compiled_step.unsupported() == "stage 1 reads a plugin's ReplayDataLoader"


# ---- regularisers: EWC, SI, MAS ---------------------------------------------------------------
def gradients(strategy, stream, loss_of, mode):
    """Per-minibatch gradients of ``loss_of(scores, labels)`` on experience 0's items in order
    (minibatches of the training size), taken here on a copy of the trained model in ``mode``,
    with respect to what experience 0 trained: task 0's prompts (scores over the seen classes)
    or ``Naive``'s weights (all its scores)."""
    model = copy.deepcopy(strategy.model)
    model.train(mode == "train")
    clip = isinstance(strategy, CLIPHingeStrategy)
    weight = model.prompts[0].ctx.requires_grad_(True) if clip else model[1].weight
    data = [(x, int(y)) for x, y, *_ in stream.train_stream[0].dataset]
    grads, size = [], strategy.train_mb_size
    for start in range(0, len(data), size):
        x = torch.stack([d[0] for d in data[start : start + size]])
        y = torch.tensor([d[1] for d in data[start : start + size]])
        scores = model(x)[:, :2] if clip else model(x)
        (grad,) = torch.autograd.grad(loss_of(scores, y), weight)
        grads.append(grad)
    return torch.stack(grads)


def weight_name(strategy):
    return "prompts.0.ctx" if isinstance(strategy, CLIPHingeStrategy) else "1.weight"


@pytest.fixture(scope="module")
def free_drift(clip, synthetic_stream):
    """How far task 0's prompts move in experience 1 without a regulariser (the strategy
    draws from its own seeded generators: a plugin's data loaders do not change its run)."""
    return drift(clip(update_old_text_prompts=True), synthetic_stream, old_prompts)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_importances_are_squared_gradients_and_hold_old_prompts(
    mode, clip, naive, synthetic_stream, free_drift
):
    """Importances: the mean squared gradient of the cross-entropy, taken here, nothing on the
    frozen CLIP. Effect: task 0's prompts (trained again with update_old_text_prompts) move
    less. ``Naive``'s linear model is so sure of itself after one epoch that its importances
    are about 1e-8 a weight: checked, its drift not."""

    def ewc(lam):
        return EWCPlugin(lam, mode=mode, decay_factor=0.5 if mode == "online" else None)

    def importances_after_experience_0(strategy):
        grads = gradients(strategy, synthetic_stream, F.cross_entropy, "eval")
        importance = strategy.plugins[0].importances[0]
        name = weight_name(strategy)
        torch.testing.assert_close(
            importance[name].data, grads.pow(2).mean(0), rtol=1e-4, atol=1e-12
        )
        assert float(importance[name].data.sum()) > 0
        frozen = [v for k, v in importance.items() if k.startswith("clip.")]
        assert all(float(v.data.abs().sum()) == 0 for v in frozen)

    strategy = clip([ewc(1e4)], update_old_text_prompts=True)
    held = drift(strategy, synthetic_stream, old_prompts, importances_after_experience_0)
    assert held < 0.75 * free_drift
    naive_run = naive([ewc(1e4)])
    naive_run.train(synthetic_stream.train_stream[0])
    importances_after_experience_0(naive_run)


def test_mas_importances_are_output_norm_gradients_and_hold_old_weights(
    clip, naive, synthetic_stream, free_drift
):
    """Importances: the mean absolute gradient of the squared output norm, taken here (the
    unseen classes' constant scores add nothing to it). Effect: old prompts, and ``Naive``'s
    weights (against the same plugin at lambda 0), move less."""

    def squared_norm(scores, labels):
        return scores.pow(2).sum(1).mean()

    def importances_after_experience_0(strategy):
        grads = gradients(strategy, synthetic_stream, squared_norm, "train")
        torch.testing.assert_close(
            strategy.plugins[0].importance[weight_name(strategy)].data,
            grads.abs().mean(0),
            rtol=1e-4,
            atol=1e-10,
        )

    strategy = clip([MASPlugin(1e2)], update_old_text_prompts=True)
    held = drift(strategy, synthetic_stream, old_prompts, importances_after_experience_0)
    assert held < 0.5 * free_drift
    naive_held = drift(
        naive([MASPlugin(3.0)]), synthetic_stream, old_rows, importances_after_experience_0
    )
    assert naive_held < 0.75 * drift(naive([MASPlugin(0.0)]), synthetic_stream, old_rows)


def test_synaptic_intelligence_holds_old_weights(
    clip, naive, synthetic_stream, free_drift, monkeypatch
):
    # Avalanche 0.6's SI keeps ``param.detach().cpu().flatten()``: on the CPU a view of the
    # live weights, so the path integral it sums is 0 for every strategy (Naive too). A copy,
    # as it gets on a GPU, makes it the published method.
    def extract_weights(model, target, excluded):
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded):
            target[name].data = param.detach().cpu().flatten().clone()

    monkeypatch.setattr(
        SynapticIntelligencePlugin, "extract_weights", staticmethod(extract_weights)
    )

    def importance_after_experience_0(strategy):
        assert float(strategy.plugins[0].ewc_data[1][weight_name(strategy)].data.sum()) > 0

    strategy = clip([SynapticIntelligencePlugin(1e5)], update_old_text_prompts=True)
    held = drift(strategy, synthetic_stream, old_prompts, importance_after_experience_0)
    assert held < 0.5 * free_drift
    naive_held = drift(
        naive([SynapticIntelligencePlugin(1e5)]),
        synthetic_stream,
        old_rows,
        importance_after_experience_0,
    )
    unheld = drift(naive([SynapticIntelligencePlugin(0.0)]), synthetic_stream, old_rows)
    assert naive_held < 0.5 * unheld


# ---- LwF: the teacher is a copy of the model, the method's state included --------------------
def test_lwf_adds_the_distillation_from_a_copy_carrying_prompts_gaussians_heads(
    clip, naive, synthetic_stream
):
    """Each step of experience 1 adds alpha * KL(teacher || model) over the classes of
    experience 0, the teacher being a copy of the model kept here after experience 0; the
    copy LwF keeps carries the prompts, the Gaussians and the earlier experiences' heads."""
    alpha, temperature = 2.0, 2.0

    def check(name):
        lwf = LwFPlugin(alpha=alpha, temperature=temperature)
        before = Probe("before_backward", lambda s: float(s.loss))
        after = Probe("before_backward", minibatch)
        plugins = [before, lwf, after]
        strategy = (
            clip(
                plugins,
                update_old_text_prompts=True,
                second_stage_epochs=1,
                second_stage_start_task=0,
            )
            if name == "clip"
            else naive(plugins)
        )
        strategy.train(synthetic_stream.train_stream[0])
        teacher = copy.deepcopy(strategy.model).train()  # kept here, the model after exp 0
        before.records.clear()
        after.records.clear()
        strategy.train(synthetic_stream.train_stream[1])
        terms = []
        for plain, (x, _, scores, loss) in zip(before.records, after.records):
            with torch.no_grad():
                taught = teacher(x)[:, :2]
            expected = F.kl_div(
                torch.log_softmax(scores[:, :2] / temperature, 1),
                torch.softmax(taught / temperature, 1),
                reduction="batchmean",
            )
            terms.append(float(expected))
            assert float(loss) - plain == pytest.approx(alpha * float(expected), abs=1e-5)
        assert max(terms) > 1e-4, name  # the old prompts (weights) moved: a real term
        if name == "clip":
            model, copied = strategy.model, lwf.lwf.prev_model
            assert copied is not model
            for mine, theirs in zip(model.prompts, copied.prompts):
                assert torch.equal(mine.ctx, theirs.ctx)
            for key, value in model.gaussians.state_dict().items():
                assert torch.equal(value, copied.gaussians.state_dict()[key]), key
            # the copy is taken in after_training_exp before the method's stage 2 of this
            # experience: it holds the heads of the earlier experiences
            assert sorted(model.heads) == ["0", "1"] and sorted(copied.heads) == ["0"]
            assert torch.equal(model.heads["0"].linear.weight, copied.heads["0"].linear.weight)

    for name in ("clip", "naive"):
        check(name)


# ---- AGEM, GEM: gradients on the memory, projections ------------------------------------------
def flat_gradient(strategy):
    return torch.cat(
        [
            p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
            for p in strategy.model.parameters()
        ]
    ).clone()


def test_agem_reference_gradient_and_projection(clip, naive, served, synthetic_stream):
    """On a PIL stream: AGEM's memory holds CLIP's input; its reference gradient is the
    memory minibatch's cross-entropy gradient (taken here) on the prompts that train, zero on
    everything else; every update is AGEM's projection of the minibatch's gradient."""

    def check(name):
        stream = served("pil") if name == "clip" else synthetic_stream
        random.seed(0)  # AGEM picks its memory with Python's random
        agem = AGEMPlugin(patterns_per_experience=20, sample_size=10)
        sampled = []
        draw = agem.sample_from_memory
        agem.sample_from_memory = lambda: sampled.append(draw()) or sampled[-1]
        g_in = Probe("after_backward", flat_gradient)
        g_out = Probe("after_backward", lambda s: (flat_gradient(s), agem.reference_gradients))
        reference = Probe("before_training_iteration", lambda s: reference_check(s, sampled))
        plugins = [g_in, agem, g_out, reference]
        strategy = clip(plugins) if name == "clip" else naive(plugins)
        strategy.train(stream.train_stream[0])
        g_in.records.clear()
        g_out.records.clear()
        strategy.train(stream.train_stream[1])
        memory = agem.buffers[0]
        assert {int(memory[i][1]) for i in range(20)} == {0, 1}
        assert all(memory[i][0].shape == (3, 32, 32) for i in range(20))
        projected = 0
        for g, (g_new, r) in zip(g_in.records, g_out.records):
            dot = torch.dot(g, r)
            expected = g - r * dot / torch.dot(r, r) if dot < 0 else g
            torch.testing.assert_close(g_new, expected, rtol=1e-4, atol=1e-6)
            projected += int(dot < 0)
            assert float(torch.dot(g_new, r)) >= -1e-5 * float(g.norm() * r.norm())
        assert len(g_in.records) == math.ceil(len(stream.train_stream[1].dataset) / 16)
        assert projected >= 1, (name, projected)
        if name == "clip":
            assert all(gap < 1e-5 for gap in reference.records if gap is not None)
            assert any(gap is not None for gap in reference.records)

    for name in ("clip", "naive"):
        check(name)


def reference_check(strategy, sampled):
    """AGEM's reference gradient on the prompts that train, against one taken here from the
    same memory minibatch (``None`` before AGEM has a memory)."""
    if not sampled or not isinstance(strategy, CLIPHingeStrategy):
        return None
    x, y = sampled[-1][0], sampled[-1][1]
    model = strategy.model
    ctx = model.prompts[1].ctx
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x)[:, :4], y), ctx)
    start = 0
    for param in model.parameters():
        if param is ctx:
            break
        start += param.numel()
    reference = strategy.plugins[1].reference_gradients
    trained = reference[start : start + ctx.numel()]
    others = torch.cat([reference[:start], reference[start + ctx.numel() :]])
    assert float(others.abs().sum()) == 0  # nothing else trains: the frozen CLIP, task 0
    sampled.clear()
    return float((trained - grad.flatten()).abs().max())


def test_gem_memory_and_projection(clip, naive, served, synthetic_stream):
    """On a PIL stream: GEM's memory holds CLIP's input; an update that would raise the
    memory's loss is GEM's solution of its dual problem (one constraint: in closed form)."""

    def check(name):
        stream = served("pil") if name == "clip" else synthetic_stream
        gem = GEMPlugin(patterns_per_experience=20, memory_strength=0.5)
        g_in = Probe("after_backward", flat_gradient)
        g_out = Probe("after_backward", lambda s: (flat_gradient(s), gem.G.clone()))
        plugins = [g_in, gem, g_out]
        strategy = clip(plugins) if name == "clip" else naive(plugins)
        strategy.train(stream.train_stream[0])
        g_in.records.clear()
        g_out.records.clear()
        strategy.train(stream.train_stream[1])
        assert gem.memory_x[0].shape == (20, 3, 32, 32)
        assert set(gem.memory_y[0].tolist()) <= {0, 1}
        projected = 0
        for g, (g_new, memory_gradient) in zip(g_in.records, g_out.records):
            (reference,) = memory_gradient  # one earlier experience: one constraint
            dot = torch.dot(reference, g)
            if dot < 0:  # GEM's dual for one constraint, with its 1e-3 ridge
                projected += 1
                weight = torch.clamp(-dot / (reference.dot(reference) + 1e-3), min=0.5)
                torch.testing.assert_close(g_new, g + weight * reference, rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(g_new, g)
        assert projected >= 1, (name, projected)

    for name in ("clip", "naive"):
        check(name)


# ---- EarlyStopping, LRScheduler -----------------------------------------------------------------
def test_early_stopping_stops_and_restores_the_best_state(clip, naive, synthetic_stream):
    """Watching an accuracy that cannot improve (classes never trained), training stops after
    one epoch of four and the state kept at the start (the initial prompts) comes back."""

    def check(name):
        stopper = EarlyStoppingPlugin(
            patience=1, val_stream_name="test_stream", metric_name="Top1_Acc_Stream"
        )
        epochs = Probe("after_training_epoch", lambda s: s.clock.train_exp_epochs)
        if name == "clip":
            strategy = clip([stopper, epochs], init_epochs=4, eval_every=1)
        else:
            strategy = naive([stopper, epochs], epochs=4, eval_every=1)
        state = (lambda s: s.model.prompts[0].ctx) if name == "clip" else old_rows
        start = Probe("before_training_epoch", lambda s: state(s).detach().clone())
        strategy.plugins.append(start)
        strategy.train(
            synthetic_stream.train_stream[0], eval_streams=[synthetic_stream.test_stream[2:]]
        )
        assert len(epochs.records) == 1, name
        assert torch.equal(state(strategy).detach(), start.records[0]), name

    for name in ("clip", "naive"):
        check(name)


def test_a_scheduler_sets_the_lr_of_the_update(clip, naive, synthetic_stream, tiny_config):
    """``LambdaLR`` at 0.3x: the first update of an experience moves each prompt coordinate by
    0.3 * lr (Adam's first step is lr * sign(gradient)); ``Naive``'s SGD by -0.3 * lr * grad."""

    def check(name):
        strategy = clip() if name == "clip" else naive()
        scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lambda epoch: 0.3)
        params = (
            (lambda s: [p.ctx for p in s.model.prompts])
            if name == "clip"
            else (lambda s: list(s.model.parameters()))
        )
        kept = Probe(
            "before_update",
            lambda s: [(p.detach().clone(), p.grad.clone()) for p in params(s)],
        )
        moved = Probe("after_update", lambda s: [p.detach().clone() for p in params(s)])
        strategy.plugins[:0] = [LRSchedulerPlugin(scheduler), kept, moved]
        strategy.train(synthetic_stream.train_stream[0])
        (old, grad), new = kept.records[0][-1], moved.records[0][-1]
        lr = 0.3 * (tiny_config().init_lr if name == "clip" else 0.01)
        # Adam's first step: -lr * m / (sqrt(v) + eps) with m = g, v = g^2 (bias-corrected)
        step = -lr * grad / (grad.abs() + 1e-8) if name == "clip" else -lr * grad
        torch.testing.assert_close(new - old, step, rtol=1e-4, atol=1e-9)

    for name in ("clip", "naive"):
        check(name)


# ---- refused, in one line -------------------------------------------------------------------
REGULARISERS = {
    "EWCPlugin": lambda: EWCPlugin(1.0),
    "SynapticIntelligencePlugin": lambda: SynapticIntelligencePlugin(1.0),
    "MASPlugin": lambda: MASPlugin(),
    "LwFPlugin": lambda: LwFPlugin(),
}


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_a_regulariser_with_nothing_to_hold_is_refused(name, clip, naive, synthetic_stream):
    message = (
        rf"^{name} would do nothing on CLIPHingeStrategy: with update_old_text_prompts=false "
        r"and use_image_adapter=false .* set update_old_text_prompts=true"
    )
    with pytest.raises(ConfigError, match=message):
        clip([REGULARISERS[name]()])
    strategy = clip()
    strategy.plugins.append(REGULARISERS[name]())  # added after construction
    with pytest.raises(ConfigError, match=message):
        strategy.train(synthetic_stream.train_stream[0])
    # something an earlier experience trained trains again: accepted
    clip([REGULARISERS[name]()], use_image_adapter=True)
    clip([REGULARISERS[name]()], update_old_text_prompts=True)
    naive([REGULARISERS[name]()])


def test_gdumb_is_refused(clip, naive, synthetic_stream):
    with pytest.raises(
        ConfigError,
        match=r"^GDumbPlugin cannot apply to CLIPHingeStrategy: .*"
        r"ReplayPlugin\(mem_size, storage_policy=ClassBalancedBuffer",
    ):
        clip([GDumbPlugin(MEM)])
    strategy = naive([GDumbPlugin(MEM)])  # Naive retrains its copy from its memory
    for experience in synthetic_stream.train_stream[:2]:
        strategy.train(experience)
    assert len(strategy.plugins[0].storage_policy.buffer) == MEM
