"""LoRA runs keep the feature cache for stage 1 (issue 15): same numbers, fewer encoder passes.

Every LoRA adapter is off in stage 1 (an adapter is on only in its task's stage 2 and for its
head's features at inference), so stage 1 of a LoRA run trains on the cached frozen-encoder
features like any other run; stage 2 and the evaluation of adapted heads encode the images.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

TRAIN_IMAGES = 60  # per experience: 2 classes of 30
TEST_IMAGES = 60  # the whole test stream: 6 classes of 10
EPOCHS = 2
STAGE2_EPOCHS = 1


def count_encodes(strategy, log, state):
    """Record ``(experience, phase, active adapter, images)`` for every image-encoder call."""
    model = strategy.model
    encode = model.run_image_encoder

    def counted(images):
        training = strategy.is_training
        phase = "eval" if not training else ("stage 2" if model.lora.active else "stage 1")
        exp = state["next"] if training else state["next"] - 1
        log.append((exp, phase, model.lora.active, images.shape[0]))
        return encode(images)

    model.run_image_encoder = counted


@pytest.fixture(scope="module")
def lora_runs(tiny_config, run_stream):
    """The same 3-experience LoRA run with the feature cache on (True) and off (False)."""
    runs = {}
    for cache in (True, False):
        config = tiny_config(
            use_lora_in_second_stage=True,
            lora_layers=[1],
            lora_rank=2,
            lora_alpha=4.0,
            init_epochs=EPOCHS,
            epochs=EPOCHS,
            second_stage_epochs=STAGE2_EPOCHS,
            second_stage_lr=0.05,
            second_stage_fusion_weight=0.5,
            samples_per_old_class=5,
            cache_features=cache,
        )
        log, state = [], {"next": 0}
        strategy, results = run_stream(
            config,
            on_start=lambda s, log=log, state=state: count_encodes(s, log, state),
            after_exp=lambda s, i, state=state: state.update(next=i + 1),
        )
        runs[cache] = SimpleNamespace(
            strategy=strategy, model=strategy.model, results=results, log=log
        )
    return runs


def accuracy_matrix(results):
    return [
        [r[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(3)]
        for r in results
    ]


def images_encoded(log):
    """``{(experience, phase, adapter): images}`` summed over the calls."""
    counts = Counter()
    for exp, phase, adapter, n in log:
        counts[exp, phase, adapter] += n
    return dict(counts)


def test_lora_run_with_the_cache_equals_the_run_without(lora_runs):
    """Prompts, Gaussians, heads, LoRA weights and accuracies agree to the bit.

    Bitwise, not within a tolerance: the two runs do the same arithmetic in the same order
    except for how stage 1 batches its frozen encoder passes (the whole experience in
    ``eval_batch_size`` chunks for the cache, shuffled minibatches without it), and each
    image's feature does not depend on the other images of its batch.
    """
    cached, uncached = lora_runs[True], lora_runs[False]
    assert cached.model.lora.adapters == uncached.model.lora.adapters == ["task1", "task2"]
    a, b = cached.model.state_dict(), uncached.model.state_dict()
    assert list(a) == list(b)
    assert any("lora_B.task2" in k for k in a) and any(k.startswith("gaussians.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"cached and uncached LoRA runs differ in {different}"
    assert accuracy_matrix(cached.results) == accuracy_matrix(uncached.results)
    second_stage = [type(p).__name__ for p in cached.strategy.plugins].index("SecondStagePlugin")
    assert (
        cached.strategy.plugins[second_stage].losses
        == uncached.strategy.plugins[second_stage].losses
    )


def test_lora_stage1_encodes_each_training_image_once_per_experience(lora_runs):
    """With the cache, stage 1 encodes the experience once (the Gaussians' pass, which fills
    the cache) instead of once more every epoch; stage 2 and evaluation encode the same
    images in both runs, through the same adapters."""
    cached, uncached = (images_encoded(lora_runs[c].log) for c in (True, False))
    for exp in range(3):
        assert cached[exp, "stage 1", None] == TRAIN_IMAGES  # 60
        assert uncached[exp, "stage 1", None] == TRAIN_IMAGES * (1 + EPOCHS)  # 180
    assert sorted(k for k in cached if k[1] == "stage 1") == [
        (e, "stage 1", None) for e in range(3)
    ]
    rest = {k: v for k, v in uncached.items() if k[1] != "stage 1"}
    assert {k: v for k, v in cached.items() if k[1] != "stage 1"} == rest
    for task in (1, 2):  # stage 2: every epoch, through the task's own adapter
        assert rest[task, "stage 2", f"task{task}"] == TRAIN_IMAGES * STAGE2_EPOCHS
    # evaluation: the frozen pass, plus one pass per adapted head once adapters exist
    assert rest[0, "eval", None] == rest[1, "eval", None] == rest[2, "eval", None] == TEST_IMAGES
    assert rest[1, "eval", "task1"] == rest[2, "eval", "task1"] == TEST_IMAGES
    assert rest[2, "eval", "task2"] == TEST_IMAGES
    assert (0, "stage 2", "task0") not in rest  # second_stage_start_task = 1
    # cache entries: 3 training experiences + the test stream while no adapter existed
    assert lora_runs[True].strategy.feature_cache.misses == 3 + 3
    assert lora_runs[False].strategy.feature_cache.misses == 0


def test_lora_runs_cache_stage1_and_evaluate_adapted_heads_on_images(
    lora_runs, tiny_config, class_names
):
    """``features_cacheable``: stage 1 always; evaluation until the first adapter exists."""
    from avalanche_cliphinge import CLIPHingeStrategy

    strategy = lora_runs[True].strategy
    training = strategy.is_training
    try:
        strategy.is_training = False
        assert not strategy.features_cacheable  # evaluation: adapters exist
        strategy.is_training = True
        assert strategy.features_cacheable  # stage 1
    finally:
        strategy.is_training = training
    torch.manual_seed(0)
    fresh = CLIPHingeStrategy(
        config=tiny_config(use_lora_in_second_stage=True, lora_layers=[1]),
        class_names=class_names,
        evaluator=None,
        progress=False,
    )
    assert fresh.model.lora is not None and fresh.features_cacheable  # no adapter yet


def test_extracted_features_are_the_frozen_encoders_inside_an_adapter(lora_runs, synthetic_data):
    """What the cache stores never goes through an adapter, whatever adapter is on."""
    strategy, model = lora_runs[True].strategy, lora_runs[True].model
    x, y = synthetic_data["test_x"], synthetic_data["test_y"]
    frozen = strategy.extract_features(TensorDataset(x, y))
    with torch.no_grad():
        assert torch.equal(frozen[0], model.clip.encode_image(x).float())
        with model.lora.using("task2"):
            inside = strategy.extract_features(TensorDataset(x, y))
            assert model.lora.active == "task2"  # restored after the pass
            adapted = model.clip.encode_image(x).float()
    assert model.lora.active is None
    assert torch.equal(inside[0], frozen[0]) and torch.equal(inside[1], y)
    assert (adapted - frozen[0]).abs().max() > 1e-3  # the adapter does matter


def test_seeded_lora_init_ignores_the_global_rng(tiny_config, class_names):
    """An adapter's initial ``lora_A`` comes from the generator it is given, not from the
    global RNG (which the uncached stage-1 loader draws from)."""
    from avalanche_cliphinge.seeding import Draw, generator
    from avalanche_cliphinge.strategy import build_model

    first = {}
    for global_seed in (0, 1):
        torch.manual_seed(0)
        model = build_model(
            tiny_config(use_lora_in_second_stage=True, lora_layers=[1]), class_names
        )
        torch.manual_seed(global_seed)
        model.lora.add("task1", generator(3, Draw.STAGE2, 1))
        weights = {
            n: p.detach().clone()
            for n, p in model.clip.visual.named_parameters()
            if "lora_A.task1" in n
        }
        assert weights
        for name, value in weights.items():
            assert torch.equal(first.setdefault(name, value), value), name
