"""The speed machinery: feature cache, batch order, truncated prompts, device resize, speed.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avalanche_cliphinge import TINY_MODEL, load_clip
from avalanche_cliphinge.feature_cache import FeatureCache, dataset_fingerprint
from avalanche_cliphinge.loaders import EpochBatchSampler, TensorBatchLoader
from avalanche_cliphinge.model.cliphinge_model import DevicePreprocess
from avalanche_cliphinge.model.prompts import TaskPrompts

from cli_helpers import ONE_EPOCH, ROOT

#: subprocess runs of the application: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, None)


def test_epoch_batch_sampler_covers_every_index_once_with_sizes_of_the_batch_size():
    sampler = EpochBatchSampler(10, 4, shuffle=True, generator=torch.Generator().manual_seed(3))
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] and len(sampler) == 3
    assert sorted(i for b in batches for i in b) == list(range(10))
    # same seed, same order; the order is torch.randperm's
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert [i for b in batches for i in b] == expected
    assert list(EpochBatchSampler(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]


def test_tensor_batch_loader_slices_the_sampled_rows():
    feats = torch.arange(20.0).view(10, 2)
    labels = torch.arange(10)
    loader = TensorBatchLoader(feats, labels, EpochBatchSampler(10, 3, shuffle=False))
    batches = list(loader)
    assert len(loader) == 4 and [len(b[1]) for b in batches] == [3, 3, 3, 1]
    x, y, t = batches[1]
    assert torch.equal(x, feats[3:6]) and torch.equal(y, labels[3:6]) and not t.any()


def test_feature_cache_memory_budget_evicts_least_recently_used():
    entry = (torch.zeros(10, 4), torch.zeros(10, dtype=torch.long))  # 160 + 80 bytes
    cache = FeatureCache(max_bytes=500)
    calls = []
    for key in ["a", "b", "a", "c"]:
        cache.get_or_compute(key, lambda key=key: calls.append(key) or entry)
    assert calls == ["a", "b", "c"]  # "a" came from memory the second time
    assert cache.hits == 1 and cache.misses == 3
    assert cache.bytes_used <= 500
    cache.get_or_compute("b", lambda: calls.append("b2") or entry)
    assert calls[-1] == "b2"  # "b" was the least recently used: evicted


def test_feature_cache_on_disk_is_reused_by_a_new_cache_and_ignores_corrupt_files(tmp_path):
    entry = (torch.randn(5, 3), torch.arange(5))
    FeatureCache(directory=tmp_path).get_or_compute("k", lambda: entry)
    assert (tmp_path / "k.pt").is_file()
    fresh = FeatureCache(directory=tmp_path)
    got = fresh.get_or_compute("k", lambda: pytest.fail("recomputed despite the file"))
    assert torch.equal(got[0], entry[0]) and fresh.hits == 1
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    again = fresh.get_or_compute("bad", lambda: entry)
    assert torch.equal(again[1], entry[1]) and fresh.misses == 1


def test_dataset_fingerprint_changes_with_content_labels_and_backbone():
    class Items(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.targets = x, y

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.x[i], self.targets[i]

    x = torch.randn(6, 3, 4, 4)
    base = dataset_fingerprint(Items(x, [0, 0, 1, 1, 2, 2]), "ViT-B-16", "openai")
    assert base == dataset_fingerprint(Items(x.clone(), [0, 0, 1, 1, 2, 2]), "ViT-B-16", "openai")
    assert base != dataset_fingerprint(Items(x * 2, [0, 0, 1, 1, 2, 2]), "ViT-B-16", "openai")
    assert base != dataset_fingerprint(Items(x, [0, 0, 1, 1, 2, 1]), "ViT-B-16", "openai")
    assert base != dataset_fingerprint(Items(x, [0, 0, 1, 1, 2, 2]), "ViT-B-16", "file-sha")


def test_strategy_reuses_the_disk_cache_with_the_same_results(tiny_config, run_stream, tmp_path):
    config = tiny_config(feature_cache_dir=str(tmp_path / "cache"), init_epochs=2, epochs=2)
    first, results_a = run_stream(config)
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 6  # 3 train + 3 test experiences
    second, results_b = run_stream(config)
    assert second.feature_cache.misses == 0 and second.feature_cache.hits >= 6
    assert results_a[-1] == results_b[-1]


def test_truncated_prompts_give_the_full_length_text_features(backbone):
    clip = backbone.model
    prompts = TaskPrompts(
        clip,
        backbone.tokenizer,
        ["red horizontal stripes", "cat"],
        n_ctx=4,
        ctx_init="a photo of a",
    )
    assert prompts.tokens.shape[1] < 77
    with torch.no_grad():
        ours = prompts(clip)
        full_tokens = backbone.tokenizer(
            ["a photo of a red horizontal stripes.", "a photo of a cat."]
        )
        reference = F.normalize(clip.encode_text(full_tokens), dim=-1)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-5)


def test_a_common_prompt_length_gives_every_task_one_shape_and_the_same_features(backbone):
    from avalanche_cliphinge import CLIPHingeModel
    from avalanche_cliphinge.model.prompts import prompt_length

    names = ["cat", "dog", "red horizontal stripes", "blue"]
    tokenizer = backbone.tokenizer
    # "X X X X red horizontal stripes." : SOT, 4 X, 3 words, ".", EOT -> 10 tokens
    assert prompt_length(tokenizer, names, 4) == 10
    assert prompt_length(tokenizer, ["cat"], 4) == 8
    model = CLIPHingeModel(backbone, names, n_ctx=4)
    model.add_task([0, 1])
    model.add_task([2, 3])
    assert [p.tokens.shape for p in model.prompts] == [(2, 10), (2, 10)]
    own = TaskPrompts(backbone.model, tokenizer, ["cat", "dog"], n_ctx=4, ctx_init="a photo of a")
    assert own.tokens.shape == (2, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            model.task_text_features(0), own(backbone.model), atol=1e-6, rtol=0
        )
    with pytest.raises(
        ValueError,
        match="length 7 cannot hold these prompts: it must be between 8 and the context length 77",
    ):
        TaskPrompts(backbone.model, tokenizer, ["cat"], n_ctx=4, length=7)


def test_device_preprocess_resizes_and_normalises_like_the_formula(backbone):
    preprocess = DevicePreprocess(backbone)
    images = torch.rand(2, 3, 16, 16)
    out = preprocess(images)
    size = backbone.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected = (
        F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        - mean
    ) / std
    assert out.shape == (2, 3, size, size)
    torch.testing.assert_close(out, expected)
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(preprocess(as_uint8), preprocess(as_uint8.float() / 255))


def test_device_resize_transforms_give_exactly_to_tensors_model_input(backbone):
    from PIL import Image
    from torchvision import transforms

    from avalanche_cliphinge.benchmarks import device_resize_transforms

    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    train_tf, eval_tf = device_resize_transforms()
    assert train_tf is eval_tf
    images = [Image.fromarray(p) for p in pixels]
    as_uint8 = torch.stack([eval_tf(i) for i in images])
    assert as_uint8.dtype == torch.uint8
    assert torch.equal(as_uint8, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    as_float = torch.stack([transforms.ToTensor()(i) for i in images])
    preprocess = DevicePreprocess(backbone)
    assert torch.equal(preprocess(as_uint8), preprocess(as_float))  # bit for bit
    augment, _ = device_resize_transforms(augment=True)
    torch.manual_seed(0)
    cropped = augment(images[0])
    assert cropped.dtype == torch.uint8 and cropped.shape == (3, 32, 32)


def test_resize_on_device_feeds_the_encoder_the_preprocessed_images(tiny_config, backbone):
    from avalanche_cliphinge import build_model

    images = torch.rand(3, 3, 32, 32)
    on = build_model(
        tiny_config(resize_on_device=True), ["a", "b", "c", "d", "e", "f"], backbone=backbone
    )
    off = build_model(tiny_config(), ["a", "b", "c", "d", "e", "f"], backbone=backbone)
    with torch.no_grad():
        torch.testing.assert_close(
            on.run_image_encoder(images), off.run_image_encoder(on.preprocess(images))
        )
        assert not torch.allclose(on.run_image_encoder(images), off.run_image_encoder(images))


def test_hinge_grad_to_old_text_lets_the_hinge_move_old_prompts(tiny_config, run_stream):
    from avalanche_cliphinge.plugins import HardPairHingePlugin

    grads = {}
    for flag in (False, True):
        config = tiny_config(
            update_old_text_prompts=True,
            hinge_grad_to_old_text=flag,
            text_hard_pair_threshold=-1.0,
            samples_per_old_class=0,
            init_epochs=1,
            epochs=1,
            second_stage_epochs=0,
        )
        strategy, _ = run_stream(config, n_experiences=2)
        model = strategy.model
        model.train()
        model.set_trainable_prompts([0, 1])
        for prompts in model.prompts:
            prompts.ctx.grad = None  # drop what the last training step left
        plugin = next(p for p in strategy.plugins if isinstance(p, HardPairHingePlugin))
        strategy.step.text_features = None
        loss = plugin.pair_loss(strategy, plugin.text_pairs, 10.0)
        loss.backward()
        grads[flag] = float(model.prompts[0].ctx.grad.abs().sum())
    assert grads[False] == 0.0 and grads[True] > 0.0


def test_seed_changes_the_prompt_initialisation_and_the_shuffling(tiny_config, run_stream):
    a, _ = run_stream(tiny_config(seed=1, ctx_init=""), n_experiences=1)
    b, _ = run_stream(tiny_config(seed=2, ctx_init=""), n_experiences=1)
    assert not torch.equal(a.model.prompts[0].ctx, b.model.prompts[0].ctx)
    assert a.generator(0, 1).initial_seed() != b.generator(0, 1).initial_seed()


def test_speed_benchmark_tiny_cpu_mode_prints_every_phase(cifar10_jpegs):
    """The benchmark script itself (figures are printed, never asserted)."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--preset",
            "tiny",
            "--data-root",
            str(cifar10_jpegs),
            "--compare-uncached",
            *ONE_EPOCH,
            "--bare-batch",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = {
        r["phase"]: r
        for r in map(
            json.loads, (line for line in done.stdout.splitlines() if line.startswith("{"))
        )
    }
    for phase in (
        "setup",
        "bare_image_encoder",
        "feature_extraction",
        "stage1",
        "hinge",
        "stage2",
        "evaluation",
        "total",
        "extraction_efficiency",
        "compare_uncached",
    ):
        assert phase in records, phase
    assert records["feature_extraction"]["images"] == 500  # 400 train + 100 test JPEGs
    assert records["compare_uncached"]["same_metrics"] is True
    assert records["total"]["seconds"] > 0


def test_speed_benchmark_synthetic_mode_runs_the_cifar_path_on_the_cpu():
    """--synthetic (the GPU benchmark's data) with the tiny CLIP: per-item PIL data, 2 workers."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--synthetic",
            "--device",
            "cpu",
            "--set",
            f"model_name={TINY_MODEL}",
            *ONE_EPOCH,
            "--set",
            "num_workers=2",
            "--set",
            "total_tasks=2",
            "--train-per-class",
            "3",
            "--test-per-class",
            "2",
            "--bare-batch",
            "16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = {
        r["phase"]: r
        for r in map(
            json.loads, (line for line in done.stdout.splitlines() if line.startswith("{"))
        )
    }
    # 2 tasks of 10 classes: 3 training and 2 test images per class
    assert records["setup"]["train_images"] == 60 and records["setup"]["test_images"] == 40
    assert records["setup"]["data"] == "synthetic, pil items"
    assert records["setup"]["num_workers"] == 2 and records["setup"]["tasks"] == 2
    assert records["feature_extraction"]["images"] == 100
    assert len(records["final_accuracy"]["top1_exp_percent"]) == 2
    assert "stage1_host_syncs" not in records  # CUDA only


def test_speed_loader_only_times_every_transform_and_worker_count(capsys):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--synthetic",
            "--loader-only",
            "--loader-workers",
            "0",
            "2",
            "--train-per-class",
            "2",
            "--repeats",
            "2",
            "--set",
            "eval_batch_size=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["transform"], r["num_workers"]) for r in records] == [
        ("PILToTensor", 0),
        ("PILToTensor", 2),
        ("ToTensor", 0),
        ("ToTensor", 2),
    ]
    for r in records:
        assert r["phase"] == "loader" and r["images"] == 20 and r["batch"] == 4  # 10 classes x 2
        assert len(r["runs"]) == 2 and r["images_per_s"] == pytest.approx(
            sorted(r["runs"])[0] / 2 + sorted(r["runs"])[1] / 2, abs=0.1
        )
    speed = speed_module()
    for argv, message in (
        (["--preset", "tiny", "--loader-only"], "--loader-only times the synthetic CIFAR items"),
        (["--synthetic", "--loader-only", "--loader-workers", "-1"], "must be 0 or more, got -1"),
        (["--preset", "tiny", "--set", "n_classes=20"], "unknown config key 'n_classes'"),
    ):
        with pytest.raises(SystemExit) as refused:
            speed.main(argv)
        assert refused.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1]


def speed_module():
    """benchmarks/speed.py as a module: the repository's benchmarks are scripts, not installed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return speed


def test_speed_synthetic_items_pil_and_tensor_hold_the_same_images():
    speed = speed_module()
    pil_train, pil_test = speed.synthetic_cifar(4, 3, 2, seed=5, items="pil")
    tensor_train, tensor_test = speed.synthetic_cifar(4, 3, 2, seed=5, items="tensor")
    assert isinstance(pil_train, speed.CIFARLikeImages)
    assert isinstance(tensor_train, speed.ImageTensors)
    for pil, tensor in ((pil_train, tensor_train), (pil_test, tensor_test)):
        assert len(pil) == len(tensor) and pil.targets == tensor.targets
        for i in range(len(pil)):
            image, label = pil[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
            assert torch.equal(image, tensor[i][0]) and label == int(tensor[i][1])
    assert pil_train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_loader_workers_and_eval_batch_size_change_no_feature(
    tiny_config, synthetic_stream, class_names
):
    """num_workers and eval_batch_size only shape data loading: the features stay the same."""
    from avalanche_cliphinge import CLIPHingeStrategy

    dataset = synthetic_stream.train_stream[0].dataset.eval()
    extracted = {}
    for workers, batch in ((0, 64), (2, 64), (0, 7)):
        torch.manual_seed(0)
        strategy = CLIPHingeStrategy(
            config=tiny_config(num_workers=workers, eval_batch_size=batch),
            class_names=class_names,
            progress=False,
        )
        extracted[workers, batch] = strategy.extract_features(dataset)
    feats, labels = extracted[0, 64]
    assert feats.shape == (60, 64) and labels.tolist() == [0] * 30 + [1] * 30
    for key in ((2, 64), (0, 7)):
        torch.testing.assert_close(extracted[key][0], feats, atol=1e-5, rtol=0)
        assert torch.equal(extracted[key][1], labels)


def test_text_cache_keeps_frozen_tasks_and_never_serves_a_trainable_one_stale(backbone):
    from avalanche_cliphinge import CLIPHingeModel

    model = CLIPHingeModel(backbone, ["cat", "dog", "red", "blue", "car", "bus"], n_ctx=4)
    for classes in ([0, 1], [2, 3], [4, 5]):
        model.add_task(classes)
    calls = []
    encode = model.encode_prompts
    model.encode_prompts = lambda emb, tok: calls.append(len(tok)) or encode(emb, tok)
    model.set_trainable_prompts([])
    with torch.no_grad():
        first = model.text_features()
        assert len(calls) == 3
        model.text_features()
        assert len(calls) == 3  # all three from the cache
        model.set_trainable_prompts([2])  # tasks 0 and 1 stay cached
        model.text_features()
        assert len(calls) == 4
        ctx = model.prompts[2].ctx  # an optimizer step on the trainable task
        ctx.add_(torch.randn(ctx.shape, generator=torch.Generator().manual_seed(0)))
        moved = model.text_features()
        assert len(calls) == 5
    torch.testing.assert_close(moved[:4], first[:4], atol=0, rtol=0)
    assert (moved[4:] - first[4:]).abs().max() > 1e-3
    raw = model.raw_text_features([5, 0])
    torch.testing.assert_close(raw, model.raw_text_features([0, 5]).flip(0), atol=0, rtol=0)
    assert raw.shape == (2, backbone.embed_dim)


def test_speed_step_sync_counter_counts_sync_warnings_inside_steps_only(monkeypatch):
    """The CUDA-only counter of speed.py, driven by hand (no GPU here)."""
    import warnings
    from types import SimpleNamespace

    StepSyncCounter = speed_module().StepSyncCounter

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = StepSyncCounter()
    # (epoch of the task, sync warnings in the step)
    for epoch, n_syncs in ((0, 2), (0, 1), (1, 0), (1, 3), (2, 1)):
        strategy = SimpleNamespace(clock=SimpleNamespace(train_exp_epochs=epoch))
        counter.before_training_iteration(strategy)
        for _ in range(n_syncs):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("an unrelated warning", stacklevel=1)
        counter.after_training_iteration(strategy)
    warnings.warn(
        "called a synchronizing CUDA operation", stacklevel=1
    )  # outside a step: not counted
    record = counter.record()
    assert record["steps"] == 5
    assert record["syncs_in_first_epochs"] == 2 + 1
    assert record["syncs_after_first_epoch"] == 0 + 3 + 1
    # every counted warning comes from one line of this file: one call site
    assert len(record["where"]) == 1 and record["where"][0].startswith("test_speed_paths.py:")
    assert modes == ["warn", "default"] * 5


def test_entry_speed_runs_the_main_entry_on_random_cifar100_files(tmp_path):
    """benchmarks/entry_speed.py: the real CIFAR path (SplitCIFAR100, PIL items), timed."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/entry_speed.py",
            "--train-per-class",
            "3",
            "--test-per-class",
            "2",
            "--work-dir",
            str(tmp_path),
            "--",
            "--device",
            "cpu",
            "--quiet",
            "--set",
            f"model_name={TINY_MODEL}",
            *ONE_EPOCH,
            "--set",
            "init_class=50",
            "--set",
            "increment=50",
            "--set",
            "total_tasks=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["phase"] == "entry" and record["exit_code"] == 0
    assert record["completed_tasks"] == 2  # SplitCIFAR100 in 2 tasks of 50 classes
    assert (record["train_images"], record["test_images"]) == (300, 200)
    assert 0 < record["train_seconds"] <= record["wall_seconds"] <= record["process_seconds"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["protocol"]["stream_builder"] == "avalanche SplitCIFAR100"
    assert results["protocol"]["pretrained"] is None
    assert results["test_sizes"] == [100] * 2
    bad = subprocess.run(
        [
            sys.executable,
            "benchmarks/entry_speed.py",
            "--train-per-class",
            "1",
            "--test-per-class",
            "1",
            "--work-dir",
            str(tmp_path / "bad"),
            "--",
            "--device",
            "cpu",
            "--set",
            "batch_size=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "error: config key 'batch_size' must be >= 1, got 0" in bad.stderr
    assert json.loads(bad.stdout.splitlines()[-1])["exit_code"] == 2
