"""Stream builders, offline: a tiny CIFAR-100 in torchvision's on-disk format, a generated
ImageNet-R tree, the shared real CIFAR-10 JPEG subset (a generated tree of its layout where
the checkout has no ``../shared``), and the synthetic stream."""

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

import avalanche_cliphinge.benchmarks as benchmarks
from avalanche_cliphinge.benchmarks import (
    CIFAR100_ORDERS,
    IMAGENET_R_CLASS_NAMES,
    IMAGENET_R_WNIDS,
    NamedBenchmark,
    check_task_split,
    split_cifar100,
    split_image_folder,
    split_imagenet_r,
    synthetic,
)

CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def experience_classes(named_benchmark: NamedBenchmark) -> list[list[int]]:
    """Classes of each experience in task order; Avalanche's own lists come from sets."""
    ordered = [
        named_benchmark.classes_in_experience(k) for k in range(named_benchmark.n_experiences)
    ]
    from_avalanche = [
        list(e.classes_in_this_experience) for e in named_benchmark.benchmark.train_stream
    ]
    assert [set(c) for c in ordered] == [set(c) for c in from_avalanche]
    return ordered


def items(dataset):
    return [dataset[i] for i in range(len(dataset))]


# ---------------------------------------------------------------- CIFAR-100 (real code path)
CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 2, 1


def _cifar_batch(per_class: int) -> dict:
    # Every pixel of an image of class k holds the value k, so a test can read the class back
    # from the image and check that the target was not remapped.
    labels = [k for k in range(100) for _ in range(per_class)]
    data = np.repeat(np.asarray(labels, dtype=np.uint8)[:, None], 3072, axis=1)
    # torchvision unpickles with encoding="latin1" and reads str keys ("data", "fine_labels"):
    # the official Python-2 pickles store str keys, so a Python-3 writer must too.
    return {
        "batch_label": "tiny batch",
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
        "data": data,
        "fine_labels": labels,
        "coarse_labels": [k // 5 for k in labels],
    }


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    files = {
        "train": _cifar_batch(CIFAR_TRAIN_PER_CLASS),
        "test": _cifar_batch(CIFAR_TEST_PER_CLASS),
        "meta": {
            "fine_label_names": [f"fine_label_{k:02d}" for k in range(100)],
            "coarse_label_names": [f"coarse_{k}" for k in range(20)],
        },
    }
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)
    return root


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", refuse)


@pytest.fixture
def offline_cifar(cifar_root, monkeypatch, no_download):
    # The tiny files cannot match torchvision's md5 sums of the real release.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    return cifar_root


def test_cifar_b50_inc10_uses_per_exp_classes(offline_cifar):
    named_benchmark = split_cifar100(
        offline_cifar, init_class=50, increment=10, class_order="icarl"
    )
    order = CIFAR100_ORDERS["icarl"]
    assert named_benchmark.n_experiences == 6
    assert [len(c) for c in experience_classes(named_benchmark)] == [50, 10, 10, 10, 10, 10]
    assert experience_classes(named_benchmark)[0] == order[:50]
    assert experience_classes(named_benchmark)[1] == order[50:60]
    train_sizes = [len(exp.dataset) for exp in named_benchmark.benchmark.train_stream]
    test_sizes = [len(exp.dataset) for exp in named_benchmark.benchmark.test_stream]
    assert train_sizes == [100, 20, 20, 20, 20, 20]
    assert test_sizes == [50, 10, 10, 10, 10, 10]
    assert named_benchmark.protocol["classes_per_experience"] == [50, 10, 10, 10, 10, 10]
    assert named_benchmark.protocol["train_sizes"] == train_sizes
    assert named_benchmark.protocol["test_size"] == 100
    assert list(named_benchmark.benchmark.classes_order) == order
    json.dumps(named_benchmark.protocol)


def test_cifar_equal_tasks_go_through_avalanche_split_cifar100(offline_cifar, monkeypatch):
    import avalanche_cliphinge.benchmarks.cifar100 as module

    calls = []
    real = module.SplitCIFAR100

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "SplitCIFAR100", spy)
    named_benchmark = split_cifar100(offline_cifar, init_class=10, increment=10, class_order="rapf")
    assert len(calls) == 1 and calls[0]["n_experiences"] == 10
    assert calls[0]["fixed_class_order"] == CIFAR100_ORDERS["rapf"]
    assert [len(c) for c in experience_classes(named_benchmark)] == [10] * 10
    assert [len(e.dataset) for e in named_benchmark.benchmark.train_stream] == [20] * 10
    assert [len(e.dataset) for e in named_benchmark.benchmark.test_stream] == [10] * 10


def test_cifar_targets_are_original_ids_and_names_follow_meta(offline_cifar):
    named_benchmark = split_cifar100(
        offline_cifar, init_class=50, increment=10, class_order="pycil"
    )
    assert named_benchmark.class_names[7] == "fine label 07"
    assert len(named_benchmark.class_names) == 100
    for stream in (named_benchmark.benchmark.train_stream, named_benchmark.benchmark.test_stream):
        for exp in (stream[0], stream[3]):
            for image, target, task in items(exp.dataset):
                assert target in exp.classes_in_this_experience
                # The pixel value written for class k comes back as k / 255 after ToTensor().
                assert round(image[0, 0, 0].item() * 255) == target
                assert task == 0


def test_cifar_with_device_resize_transforms_serves_uint8_images(offline_cifar):
    from avalanche_cliphinge.benchmarks import device_resize_transforms

    train_tf, eval_tf = device_resize_transforms()
    named_benchmark = split_cifar100(
        offline_cifar,
        init_class=10,
        increment=10,
        class_order="icarl",
        train_transform=train_tf,
        eval_transform=eval_tf,
    )
    for stream in (named_benchmark.benchmark.train_stream, named_benchmark.benchmark.test_stream):
        for image, target, _ in items(stream[2].dataset):
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
            assert (image == target).all()  # every pixel of a class-k image holds k


@pytest.mark.parametrize(
    "name, first",
    # RAPF's current class_orders/cifar100_order.yaml is iCaRL's order
    [("icarl", [87, 0, 52, 58, 44]), ("rapf", [87, 0, 52, 58, 44]), ("pycil", None)],
)
def test_cifar_named_orders(offline_cifar, name, first):
    expected = np.random.RandomState(1993).permutation(100).tolist() if first is None else None
    named_benchmark = split_cifar100(offline_cifar, init_class=20, increment=20, class_order=name)
    if first is not None:
        assert named_benchmark.class_order[:5] == first
    else:
        assert named_benchmark.class_order == expected
    assert sorted(named_benchmark.class_order) == list(range(100))
    assert experience_classes(named_benchmark)[0] == named_benchmark.class_order[:20]
    assert named_benchmark.protocol["class_order_name"] == name


def test_cifar_explicit_order_and_bad_orders(offline_cifar):
    order = list(range(99, -1, -1))
    named_benchmark = split_cifar100(offline_cifar, init_class=50, increment=50, class_order=order)
    assert experience_classes(named_benchmark)[0] == order[:50]
    assert named_benchmark.protocol["class_order_name"] == "explicit"
    with pytest.raises(ValueError, match=r"permutation of 0\.\.99.*repeated \[1\]"):
        split_cifar100(offline_cifar, class_order=[1] + list(range(1, 100)))
    with pytest.raises(ValueError, match="permutation of 0..99"):
        split_cifar100(offline_cifar, class_order=list(range(50)))
    with pytest.raises(ValueError, match="Unknown CIFAR-100 class_order 'der'"):
        split_cifar100(offline_cifar, class_order="der")


def test_cifar_missing_root_is_a_one_line_error_without_download(tmp_path, no_download):
    with pytest.raises(FileNotFoundError) as error:
        split_cifar100(tmp_path / "nowhere")
    message = str(error.value)
    assert "cifar-100-python" in message and "--download" in message
    assert "\n" not in message


def test_cifar_corrupt_files_are_an_error_not_a_download(cifar_root, no_download):
    # Without the md5 patch the tiny files fail torchvision's check, as corrupt files would.
    with pytest.raises(ValueError, match="md5"):
        split_cifar100(cifar_root)


def test_cifar_class_count_mismatch(offline_cifar):
    with pytest.raises(ValueError) as error:
        split_cifar100(offline_cifar, init_class=50, increment=15)
    message = str(error.value)
    assert "100 classes" in message and "init_class=50, increment=15" in message
    assert "[1, 2, 5, 10, 25, 50]" in message


# ---------------------------------------------------------------- ImageNet-R
IMAGENET_R_SUBSET = [IMAGENET_R_WNIDS[i] for i in (0, 7, 120, 199)]
IMAGES_PER_WNID = 10


def _identity(image: torch.Tensor) -> tuple[int, int]:
    """(class position, file index) painted into a generated ImageNet-R image."""
    red, green = (image[:2].mean(dim=(1, 2)) * 255).tolist()
    return round(red / 50), round(green / 20)


@pytest.fixture(scope="module")
def imagenet_r_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("inr")
    for position, wnid in enumerate(IMAGENET_R_SUBSET):
        folder = root / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_WNID):
            colour = (50 * position, 20 * i, 128)
            Image.new("RGB", (12, 10), colour).save(folder / f"art_{i}.jpg", quality=95)
    return root


def _imagenet_r(root, **kwargs):
    with pytest.warns(UserWarning, match="4 of the 200 class folders"):
        return split_imagenet_r(root, init_class=2, increment=2, **kwargs)


def _split_identities(named_benchmark):
    return [
        sorted(
            _identity(x)
            for stream in [named_benchmark.benchmark.train_stream]
            for exp in stream
            for x, _, _ in items(exp.dataset)
        ),
        sorted(
            _identity(x)
            for exp in named_benchmark.benchmark.test_stream
            for x, _, _ in items(exp.dataset)
        ),
    ]


def test_imagenet_r_seeded_split_is_deterministic(imagenet_r_root):
    named_benchmark = _imagenet_r(imagenet_r_root)
    assert named_benchmark.class_names == [
        IMAGENET_R_CLASS_NAMES[IMAGENET_R_WNIDS.index(w)] for w in IMAGENET_R_SUBSET
    ]
    assert named_benchmark.class_names[0] == "goldfish"
    assert experience_classes(named_benchmark) == [[0, 1], [2, 3]]
    assert named_benchmark.protocol["train_sizes"] == [16, 16]
    assert named_benchmark.protocol["test_sizes"] == [4, 4]
    train, test = _split_identities(named_benchmark)
    for c in range(4):
        assert sum(1 for cls, _ in train if cls == c) == 8
        assert sum(1 for cls, _ in test if cls == c) == 2
    assert not set(train) & set(test)
    for exp in named_benchmark.benchmark.train_stream:
        for image, target, _ in items(exp.dataset):
            assert _identity(image)[0] == target

    # Also accepted: root pointing inside imagenet-r/.
    again = _imagenet_r(imagenet_r_root / "imagenet-r")
    assert _split_identities(again) == [train, test]
    other_seed = _imagenet_r(imagenet_r_root, seed=0)
    assert _split_identities(other_seed)[0] != train
    assert named_benchmark.protocol["seed"] == 1993 and other_seed.protocol["seed"] == 0


def test_imagenet_r_full_table_is_200_sorted_classes():
    assert len(IMAGENET_R_WNIDS) == len(set(IMAGENET_R_WNIDS)) == 200
    assert IMAGENET_R_WNIDS == sorted(IMAGENET_R_WNIDS)
    assert len(set(IMAGENET_R_CLASS_NAMES)) == 200
    assert IMAGENET_R_CLASS_NAMES[IMAGENET_R_WNIDS.index("n01443537")] == "goldfish"
    assert IMAGENET_R_CLASS_NAMES[-1] == "acorn"


def test_imagenet_r_split_lists_are_honoured_exactly(imagenet_r_root, tmp_path):
    train_lines, test_lines, expected_train = [], [], []
    for position, wnid in enumerate(IMAGENET_R_SUBSET):
        for i in range(IMAGES_PER_WNID):
            line = f"imagenet-r/{wnid}/art_{i}.jpg {position}"
            if i % 3 == 0:
                test_lines.append(line)
            else:
                train_lines.append(line)
                expected_train.append((position, i))
    (tmp_path / "train.txt").write_text("\n".join(train_lines) + "\n\n")
    (tmp_path / "test.txt").write_text("\n".join(test_lines))
    named_benchmark = _imagenet_r(imagenet_r_root, split=tmp_path)
    train, test = _split_identities(named_benchmark)
    assert train == sorted(expected_train)
    assert test == sorted((p, i) for p in range(4) for i in (0, 3, 6, 9))
    assert named_benchmark.protocol["seed"] is None
    assert set(named_benchmark.protocol["split_md5"]) == {"train.txt", "test.txt"}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("imagenet-r/{w}/art_1.jpg", "expected `relative/path label`"),
        ("imagenet-r/{w}/art_1.jpg one", "label 'one' is not an integer"),
        ("imagenet-r/{w}/art_1.jpg 4", r"label 4 outside 0\.\.3"),
        ("imagenet-r/{w}/art_99.jpg 0", "does not exist"),
        ("imagenet-r/{w}/art_1.jpg 2", "label 2 but n01443537 is class 0"),
    ],
)
def test_imagenet_r_bad_list_line_names_file_and_line(imagenet_r_root, tmp_path, bad_line, message):
    wnid = IMAGENET_R_SUBSET[0]
    lines = [f"{wnid}/art_0.jpg 0", "", bad_line.format(w=wnid)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "test.txt").write_text(f"{wnid}/art_2.jpg 0\n")
    with pytest.raises(ValueError, match=message) as error:
        _imagenet_r(imagenet_r_root, split=tmp_path)
    assert f"{tmp_path / 'train.txt'}, line 3" in str(error.value)


def test_imagenet_r_missing_data_and_lists(tmp_path, imagenet_r_root):
    (tmp_path / "imagenet-r" / "not_a_wnid").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        split_imagenet_r(tmp_path)
    message = str(error.value)
    assert "<root>/imagenet-r/<wnid>/*.jpg" in message and "imagenet-r.tar" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="train.txt"):
        _imagenet_r(imagenet_r_root, split=tmp_path / "no_lists")


# ---------------------------------------------------------------- image folders (real JPEGs)
def test_image_folder_on_real_cifar10_jpegs(cifar10_jpegs):
    named_benchmark = split_image_folder(cifar10_jpegs, init_class=4, increment=2)
    assert named_benchmark.class_names == CIFAR10_CLASSES
    assert named_benchmark.class_order == list(range(10))
    assert experience_classes(named_benchmark) == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert named_benchmark.protocol["train_sizes"] == [160, 80, 80, 80]
    assert named_benchmark.protocol["test_sizes"] == [40, 20, 20, 20]
    image, target, _ = named_benchmark.benchmark.train_stream[1].dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target in (4, 5)
    raw = Image.open(cifar10_jpegs / "train/deer/0000.jpg")
    assert raw.size == (32, 32) and raw.mode == "RGB"


def test_image_folder_explicit_order_and_transform(cifar10_jpegs):
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    seen = []

    def transform(image):
        seen.append(image.size)
        return torch.zeros(1)

    named_benchmark = split_image_folder(
        cifar10_jpegs, init_class=2, increment=2, class_order=order, eval_transform=transform
    )
    assert experience_classes(named_benchmark)[0] == [9, 8]
    image, target, _ = named_benchmark.benchmark.test_stream[0].dataset[0]
    assert target in (8, 9) and seen == [(32, 32)] and image.shape == (1,)


def test_image_folder_layout_errors(tmp_path):
    for side, classes in (("train", ["a_b", "c"]), ("test", ["a_b"])):
        for name in classes:
            (tmp_path / side / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / side / name / "0.png")
    with pytest.raises(ValueError, match=r"only in train: \['c'\], only in test: \[\]"):
        split_image_folder(tmp_path, init_class=1, increment=1)
    with pytest.raises(FileNotFoundError, match="No class folders"):
        split_image_folder(tmp_path / "missing", init_class=1, increment=1)
    (tmp_path / "test" / "c").mkdir()
    with pytest.raises(ValueError, match=r"Class\(es\) 1 \(c\) have no test image"):
        split_image_folder(tmp_path, init_class=1, increment=1)
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "c" / "0.jpg")
    named_benchmark = split_image_folder(tmp_path, init_class=1, increment=1)
    assert named_benchmark.class_names == ["a b", "c"]


def test_class_count_mismatch_error(cifar10_jpegs):
    with pytest.raises(ValueError) as error:
        split_image_folder(cifar10_jpegs, init_class=4, increment=4)
    message = str(error.value)
    assert "10 classes" in message and "init_class=4, increment=4" in message
    assert "(one of [1, 2, 3, 6])" in message
    with pytest.raises(ValueError, match="init_class must be at most 10"):
        synthetic(n_classes=10, init_class=12, increment=2)
    assert check_task_split(100, 50, 10) == 6
    with pytest.raises(ValueError, match=r"total_tasks=10 does not fit.*give 6 tasks"):
        check_task_split(100, 50, 10, total_tasks=10)


# ---------------------------------------------------------------- synthetic
def _stack(stream):
    pairs = [(x, y) for exp in stream for x, y, _ in items(exp.dataset)]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def test_synthetic_is_deterministic_with_shapes_and_counts():
    a = synthetic(n_classes=6, init_class=2, increment=2, train_per_class=5, test_per_class=3)
    b = synthetic(n_classes=6, init_class=2, increment=2, train_per_class=5, test_per_class=3)
    c = synthetic(
        n_classes=6, init_class=2, increment=2, train_per_class=5, test_per_class=3, seed=1
    )
    xa, ya = _stack(a.benchmark.train_stream)
    xb, yb = _stack(b.benchmark.train_stream)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, _stack(c.benchmark.train_stream)[0])
    # plain 8-bit RGB images, not one backbone's normalised input (any CLIP can read them)
    assert xa.shape == (30, 3, 32, 32) and xa.dtype == torch.uint8
    assert experience_classes(a) == [[0, 1], [2, 3], [4, 5]]
    assert a.protocol["train_sizes"] == [10, 10, 10]
    assert a.protocol["test_sizes"] == [6, 6, 6]
    assert xa.float().std() > 20  # patterns and noise fill the 0..255 range, not a flat grey
    assert a.class_names[:3] == [
        "red horizontal stripes",
        "green vertical stripes",
        "blue diagonal stripes",
    ]
    big = synthetic(
        n_classes=120,
        init_class=60,
        increment=60,
        train_per_class=1,
        test_per_class=1,
        image_size=16,
    )
    assert len(set(big.class_names)) == 120
    assert _stack(big.benchmark.test_stream)[0].shape == (120, 3, 16, 16)
    json.dumps(a.protocol)


def test_synthetic_pixels_are_the_class_colour_times_the_pattern():
    """Without noise, a pixel is round(255 * colour * intensity * brightness), clipped: for class
    0, red (0.90, 0.10, 0.10), green = blue = red / 9 up to rounding wherever red is not
    clipped at 255; the pattern's intensity times brightness lies in [0.24, 1.2]."""
    named_benchmark = synthetic(
        n_classes=2, init_class=2, increment=2, train_per_class=4, test_per_class=1, noise=0.0
    )
    x, y = _stack(named_benchmark.benchmark.train_stream)
    red = x[y == 0].double()
    r, g, b = red[:, 0], red[:, 1], red[:, 2]
    unclipped = r < 255
    assert unclipped.float().mean() > 0.5
    assert torch.equal(g, b)
    assert (g[unclipped] - r[unclipped] / 9).abs().max() <= 0.5 + 0.5 / 9
    assert r.min() >= round(255 * 0.9 * 0.24) and g.max() <= round(255 * 0.1 * 1.2)


def test_synthetic_classes_are_learnable_from_pixels():
    """Nearest class mean on raw pixels, default 10-class stream: the bar is 90 % test accuracy
    (measured 97 %); chance is 10 %."""
    named_benchmark = synthetic()
    x_train, y_train = _stack(named_benchmark.benchmark.train_stream)
    x_test, y_test = _stack(named_benchmark.benchmark.test_stream)
    assert len(y_train) == 400 and len(y_test) == 200
    x_train, x_test = x_train.float() / 255, x_test.float() / 255
    means = torch.stack([x_train[y_train == c].flatten(1).mean(0) for c in range(10)])
    predicted = torch.cdist(x_test.flatten(1), means).argmin(1)
    accuracy = (predicted == y_test).float().mean().item()
    assert accuracy > 0.9, accuracy


def test_public_api_is_exported():
    for name in (
        "NamedBenchmark",
        "split_cifar100",
        "split_imagenet_r",
        "split_image_folder",
        "synthetic",
        "CIFAR100_ORDERS",
        "IMAGENET_R_WNIDS",
        "IMAGENET_R_CLASS_NAMES",
    ):
        assert name in benchmarks.__all__
    assert set(CIFAR100_ORDERS) == {"icarl", "rapf", "pycil"}
    for order in CIFAR100_ORDERS.values():
        assert sorted(order) == list(range(100))


# ---------------------------------------------------------------- published protocols
def _rapf_list(tmp_path, sections, name="imgr_train_test_split.txt"):
    """A split file in RAPF's format: `train`, paths, `test`, paths."""
    path = tmp_path / name
    lines = []
    for section, paths in sections:
        lines += [section] + paths
    path.write_text("\n".join(lines) + "\n")
    return path


def test_imagenet_r_reads_rapf_single_file_list(imagenet_r_root, tmp_path):
    train, test, expected_train = [], [], []
    for position, wnid in enumerate(IMAGENET_R_SUBSET):
        for i in range(IMAGES_PER_WNID):
            (test if i % 4 == 1 else train).append(f"{wnid}/art_{i}.jpg")
            if i % 4 != 1:
                expected_train.append((position, i))
    path = _rapf_list(tmp_path, [("train", train), ("test", test)])
    named_benchmark = _imagenet_r(imagenet_r_root, split=path)
    got_train, got_test = _split_identities(named_benchmark)
    assert got_train == sorted(expected_train)
    assert got_test == sorted((p, i) for p in range(4) for i in (1, 5, 9))
    for exp in named_benchmark.benchmark.train_stream:  # labels come from the wnid folder
        for image, target, _ in items(exp.dataset):
            assert _identity(image)[0] == target
    assert "RAPF" in named_benchmark.protocol["split"]
    assert list(named_benchmark.protocol["split_md5"]) == [path.name]


@pytest.mark.parametrize(
    "lines, message",
    [
        (["n01443537/art_0.jpg"], r"line 1: expected the line `train`"),
        (
            ["train", "n01443537/art_0.jpg", "test", "n01443537"],
            r"line 4: expected `<wnid>/<file>`",
        ),
        (["train", "n99999999/art_0.jpg"], r"line 2: n99999999 not an ImageNet-R wnid"),
        (["train", f"{IMAGENET_R_WNIDS[1]}/art_0.jpg"], r"line 2: n\d+ has no class folder"),
        (["train", "n01443537/art_99.jpg"], r"line 2: .*art_99.jpg does not exist"),
        (["train", "n01443537/art_0.jpg", "train"], r"line 3: a second `train` section"),
    ],
)
def test_imagenet_r_rapf_list_errors_name_file_and_line(imagenet_r_root, tmp_path, lines, message):
    path = tmp_path / "split.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"split.txt, {message}"):
        _imagenet_r(imagenet_r_root, split=path)


def test_imagenet_r_split_list_checks(imagenet_r_root, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"train\n\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="binary.txt is not a UTF-8 text file"):
        _imagenet_r(imagenet_r_root, split=binary)
    train = [f"{w}/art_{i}.jpg" for w in IMAGENET_R_SUBSET for i in range(IMAGES_PER_WNID)]
    both = _rapf_list(tmp_path, [("train", train), ("test", train[:3])], name="both.txt")
    with pytest.raises(ValueError) as error:
        _imagenet_r(imagenet_r_root, split=both)
    # line 1 `train`, 40 paths (lines 2-41), line 42 `test`: the first test path is line 43
    assert str(error.value) == (
        f"{both}: {train[0]} is in both `train` (line 2) and `test` (line 43): a test image "
        "must not be trained on; keep it in one section."
    )


def _bom_copy(path, name):
    """``path``'s text behind a UTF-8 byte-order mark (what Windows Notepad saves)."""
    copy = path.parent / name
    copy.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return copy


def test_imagenet_r_split_lists_may_start_with_a_byte_order_mark(imagenet_r_root, tmp_path):
    # file 0 of every class is its test image, files 1-9 train
    train = [(c, f"{w}/art_{i}.jpg") for c, w in enumerate(IMAGENET_R_SUBSET) for i in range(1, 10)]
    test = [(c, f"{w}/art_0.jpg") for c, w in enumerate(IMAGENET_R_SUBSET)]
    expected = [
        sorted((c, i) for c in range(4) for i in range(1, 10)),
        [(c, 0) for c in range(4)],
    ]
    # RAPF's single file: the first line `train` behind the mark
    plain = _rapf_list(tmp_path, [("train", [p for _, p in train]), ("test", [p for _, p in test])])
    marked = _bom_copy(plain, "marked.txt")
    assert marked.read_bytes()[:8] == b"\xef\xbb\xbftrain"
    assert _split_identities(_imagenet_r(imagenet_r_root, split=marked)) == expected
    # train.txt / test.txt: the first path behind the mark, in both files
    folder = tmp_path / "lists"
    folder.mkdir()
    for name, pairs in (("train.txt", train), ("test.txt", test)):
        (folder / name).write_bytes(
            b"\xef\xbb\xbf" + "".join(f"{p} {c}\n" for c, p in pairs).encode()
        )
    assert _split_identities(_imagenet_r(imagenet_r_root, split=folder)) == expected


@pytest.mark.parametrize(
    "train_lines, test_lines, message",
    [
        (  # the same image twice in train.txt, once spelt with the imagenet-r/ prefix
            ["{w}/art_1.jpg 0", "{w}/art_2.jpg 0", "imagenet-r/{w}/art_1.jpg 0"],
            ["{w}/art_0.jpg 0"],
            "{train}: imagenet-r/{w}/art_1.jpg is listed twice (lines 1 and 3); it would count "
            "twice: list each image once.",
        ),
        (  # a test image trained on
            ["{w}/art_1.jpg 0", "{w}/art_2.jpg 0"],
            ["{w}/art_0.jpg 0", "", "{w}/art_2.jpg 0"],
            "{root}/imagenet-r/{w}/art_2.jpg is in both {train} (line 2) and {test} (line 3): "
            "a test image must not be trained on; keep it in one of the lists.",
        ),
    ],
)
def test_imagenet_r_list_folder_refuses_an_image_listed_twice(
    imagenet_r_root, tmp_path, train_lines, test_lines, message
):
    wnid = IMAGENET_R_SUBSET[0]
    others = [f"{w}/art_1.jpg {c}" for c, w in enumerate(IMAGENET_R_SUBSET) if c]
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("\n".join([line.format(w=wnid) for line in train_lines] + others) + "\n")
    test.write_text("\n".join(line.format(w=wnid) for line in test_lines) + "\n")
    with pytest.raises(ValueError) as error:
        _imagenet_r(imagenet_r_root, split=tmp_path)
    assert str(error.value) == message.format(w=wnid, train=train, test=test, root=imagenet_r_root)


def test_imagenet_r_rapf_list_refuses_an_image_listed_twice(imagenet_r_root, tmp_path):
    paths = [f"{w}/art_{i}.jpg" for w in IMAGENET_R_SUBSET for i in range(1, 3)]
    twice = _rapf_list(
        tmp_path, [("train", paths + ["./" + paths[3]]), ("test", [paths[0][:-5] + "0.jpg"])]
    )
    with pytest.raises(ValueError) as error:
        _imagenet_r(imagenet_r_root, split=twice)
    # `train` is line 1, paths[3] line 5, its repeat line 10
    assert str(error.value) == (
        f"{twice}: ./{paths[3]} is listed twice in `train` (lines 5 and 10); it would count "
        "twice: list each image once."
    )


def test_imagenet_r_stray_folders_are_named(imagenet_r_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(imagenet_r_root, root)
    (root / "imagenet-r" / "n0144353").mkdir()  # a misspelt wnid
    with pytest.warns(UserWarning, match=r"1 folder\(s\) are not ImageNet-R wnids.*n0144353"):
        _imagenet_r(root)


@pytest.fixture(scope="module")
def full_imagenet_r_root(tmp_path_factory):
    """All 200 wnid folders, two tiny images each (train and test of the seeded split)."""
    root = tmp_path_factory.mktemp("inr_full")
    for wnid in IMAGENET_R_WNIDS:
        folder = root / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"sketch_{i}.jpg")
    return root


def test_imagenet_r_rapf_order_by_name(full_imagenet_r_root, imagenet_r_root):
    from avalanche_cliphinge.benchmarks.imagenet_r import IMAGENET_R_ORDERS

    order = IMAGENET_R_ORDERS["rapf"]
    assert sorted(order) == list(range(200)) and order[:5] == [29, 75, 18, 9, 62]
    named_benchmark = split_imagenet_r(full_imagenet_r_root, class_order="rapf")
    assert experience_classes(named_benchmark)[0] == order[:20]
    assert experience_classes(named_benchmark)[-1] == order[180:]
    assert named_benchmark.protocol["class_order_name"] == "rapf"
    assert named_benchmark.protocol["class_order"] == order
    with pytest.raises(ValueError, match="orders the 200 ImageNet-R classes but only 4"):
        _imagenet_r(imagenet_r_root, class_order="rapf")
    with pytest.raises(ValueError, match="'icarl' is not an ImageNet-R order"):
        split_imagenet_r(full_imagenet_r_root, class_order="icarl")


CIFAR_PRESET_LAYOUTS = {
    "cifar100_b0_inc10": [10] * 10,
    "cifar100_b0_inc5": [5] * 20,
    "cifar100_b0_inc20": [20] * 5,
    "cifar100_b50_inc10": [50] + [10] * 5,
    "cifar100_b50_inc5": [50] + [5] * 10,
    "rapf_cifar100_b0_inc10": [10] * 10,
}
IMAGENET_R_PRESET_LAYOUTS = {
    "imagenet_r_b0_inc20": [20] * 10,
    "imagenet_r_b0_inc10": [10] * 20,
    "imagenet_r_b0_inc40": [40] * 5,
    "rapf_imagenet_r_b0_inc20": [20] * 10,
}


def test_every_preset_builds_its_stated_task_layout(offline_cifar, full_imagenet_r_root):
    from avalanche_cliphinge.config import CLIPHingeConfig, list_presets

    assert set(list_presets()) == set(CIFAR_PRESET_LAYOUTS) | set(IMAGENET_R_PRESET_LAYOUTS)
    for name, sizes in {**CIFAR_PRESET_LAYOUTS, **IMAGENET_R_PRESET_LAYOUTS}.items():
        config = CLIPHingeConfig.from_json(name)
        assert config.model_name == "ViT-B-16-quickgelu" and config.pretrained == "openai"
        layout = dict(init_class=config.init_class, increment=config.increment)
        if name in CIFAR_PRESET_LAYOUTS:
            assert config.dataset == "cifar100"
            named_benchmark = split_cifar100(
                offline_cifar, class_order=config.class_order, **layout
            )
            assert named_benchmark.class_order == CIFAR100_ORDERS["icarl"]
        else:
            assert config.dataset == "imagenet_r"
            order = None if config.class_order == "natural" else config.class_order
            named_benchmark = split_imagenet_r(full_imagenet_r_root, class_order=order, **layout)
        assert [len(c) for c in experience_classes(named_benchmark)] == sizes, name
        assert config.total_tasks == len(sizes)
        assert config.task_size(0) == sizes[0]


# ---- the comparison's streams are the run command's -------------------------------------
@pytest.mark.filterwarnings("ignore:4 of the 200 class folders")
@pytest.mark.parametrize("benchmark", ["split_cifar100", "imagenet_r"])
def test_comparison_streams_are_the_run_commands_without_augmentation(
    benchmark, offline_cifar, imagenet_r_root
):
    import argparse
    from types import SimpleNamespace

    import torchvision.transforms as T

    from avalanche_cliphinge.app.compare_cli import stream_factory_for
    from avalanche_cliphinge.app.datasets import DATASETS
    from avalanche_cliphinge.config import CLIPHingeConfig

    cifar = benchmark == "split_cifar100"
    root = offline_cifar if cifar else imagenet_r_root
    eval_tf = T.Compose([T.Resize((4, 4)), T.PILToTensor()])
    train_tf = T.Compose([eval_tf, T.Lambda(lambda x: 255 - x)])  # tells the two apart
    backbone = SimpleNamespace(train_transform=train_tf, eval_transform=eval_tf)
    args = argparse.Namespace(
        benchmark=benchmark, data_root=str(root), split_list=None, download=False
    )
    config = CLIPHingeConfig(
        dataset="cifar100" if cifar else "imagenet_r",
        init_class=50 if cifar else 2,
        increment=50 if cifar else 2,
        class_order="natural",
    )
    compared = stream_factory_for(args, backbone)(config)
    build = DATASETS[config.dataset][1]
    plain = build(argparse.Namespace(**vars(args), augment=False), config, backbone)
    augmented = build(argparse.Namespace(**vars(args), augment=True), config, backbone)

    def first_items(named, stream):
        return [getattr(named.benchmark, stream)[k].dataset[0] for k in range(2)]

    assert compared.class_order == plain.class_order and compared.protocol == plain.protocol
    for stream in ("train_stream", "test_stream"):
        for (x, y, _), (x_plain, y_plain, _), (x_aug, _, _) in zip(
            first_items(compared, stream),
            first_items(plain, stream),
            first_items(augmented, stream),
        ):
            assert y == y_plain and torch.equal(x, x_plain)
            # the run command's --augment changes training items only; the comparison never
            assert torch.equal(x, x_aug) == (stream == "test_stream")
