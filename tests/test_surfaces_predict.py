"""``cliphinge predict`` and the stream's image input on bad or unusual inputs (issue 25).

Each case gets the right answer, or one ``error:`` line and exit code 2: 16-bit, 32-bit
and float images (scaled like their 8-bit twin, by ``predict`` and by the stream), a
decompression bomb, a saved model with classes that have no name, non-finite float pixels,
and no false "initialized randomly" notice when a saved model is loaded. The images are made
here with numpy and PIL; the model is the tiny random CLIP with three tasks and no training.
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import open_clip
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from PIL import Image
from torchvision import transforms

from avalanche_cliphinge import CLIPHingeModel, CLIPHingeStrategy, StreamInputError, build_model
from avalanche_cliphinge.app.command import main
from avalanche_cliphinge.benchmarks.common import ImageFileDataset
from avalanche_cliphinge.model.backbone import load_clip
from avalanche_cliphinge.model.saving import SavedModelError
from avalanche_cliphinge.streams import ClipInput, to_rgb8

FIX = "save the image with 8 or 16 bits per channel"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_config, class_names):
    """A saved three-task model (classes 0-1, 2-3, 4-5) of the tiny random CLIP."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), class_names)
    for classes in ([0, 1], [2, 3], [4, 5]):
        model.add_task(classes)
    return model.save(tmp_path_factory.mktemp("saved") / "final_model.pt")


@pytest.fixture(scope="module")
def grey():
    """An 8-bit grey image ``[40, 36]`` with every level from dark to light."""
    return np.random.default_rng(5).integers(0, 256, size=(40, 36), dtype=np.uint8)


def predict(capsys, *args):
    """``cliphinge predict ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    code = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- item 5: 16-bit images
def test_16_bit_png_predicts_exactly_what_its_8_bit_twin_predicts(
    saved_model, grey, tmp_path, capsys
):
    eight, sixteen = tmp_path / "grey8.png", tmp_path / "grey16.png"
    Image.fromarray(grey).save(eight)
    Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen)  # 0..255 -> 0..65535
    with Image.open(sixteen) as image:
        assert image.mode == "I;16"  # what PIL makes of a 16-bit grey PNG
    code, out, _ = predict(capsys, "--model", saved_model, eight, sixteen)
    assert code == 0
    first, second = out.splitlines()
    assert second == first.replace(str(eight), str(sixteen), 1)
    # the library reads the files the same way: same top 5, same scores
    model = CLIPHingeModel.load(saved_model)
    with Image.open(eight) as a, Image.open(sixteen) as b:
        pred = model.predict([a, b], k=5)
    assert torch.equal(pred.class_ids[0], pred.class_ids[1])
    assert torch.allclose(pred.scores[0], pred.scores[1], rtol=0, atol=1e-5)
    # and so do the package's own image-file datasets (cliphinge run on a folder of PNGs)
    served, _ = ImageFileDataset([sixteen], [0])[0]
    assert served.mode == "RGB"
    assert np.array_equal(np.asarray(served), np.repeat(grey[:, :, None], 3, axis=2))


def test_deep_grey_levels_are_scaled_to_8_bits_not_clipped():
    levels = np.array([[0, 128, 129, 1000, 32896, 65535]], dtype=np.uint16)
    # v / 257 rounded: 0.498 -> 0, 0.502 -> 1, 3.89 -> 4, 128 -> 128, 255
    expected = [0, 0, 1, 4, 128, 255]
    for image in (Image.fromarray(levels), Image.fromarray(levels.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        assert np.asarray(to_rgb8(image))[0, :, 1].tolist() == expected
    floats = Image.fromarray(np.array([[0.0, 0.5, 0.999, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb8(floats))[0, :, 2].tolist() == [0, 128, 255, 255]


def test_the_stream_reads_16_bit_32_bit_and_float_images_like_their_8_bit_twin(grey):
    backbone = load_clip("cliphinge-tiny", None)
    twin = Image.fromarray(grey)
    deep = [
        Image.fromarray(grey.astype(np.uint16) * 257),  # I;16
        Image.fromarray(grey.astype(np.int32) * 257),  # I
        Image.fromarray(grey.astype(np.float32) / 255),  # F
    ]
    assert [image.mode for image in deep] == ["I;16", "I", "F"]
    for resize_on_device in (False, True):
        convert = ClipInput.for_backbone(backbone, resize_on_device=resize_on_device)
        expected = convert(twin)
        for image in deep:
            assert torch.equal(convert(image), expected), (image.mode, resize_on_device)
    assert torch.equal(
        ClipInput.for_backbone(backbone, resize_on_device=True)(deep[0]),
        transforms.PILToTensor()(twin.convert("RGB")),
    )


@pytest.mark.parametrize(
    "pixels, message",
    [
        (
            np.array([[0.2, np.nan], [0.5, 1.0]], dtype=np.float32),
            "a float image (PIL mode F) with non-finite pixel values (NaN or Inf); replace "
            f"them, or {FIX}",
        ),
        (
            np.array([[0.0, 255.0], [3.0, 7.0]], dtype=np.float32),
            "a float image (PIL mode F) with values in [0, 255]; float pixels must lie in "
            f"[0, 1]: rescale them, or {FIX}",
        ),
        (
            np.array([[0, 70000], [5, 6]], dtype=np.int32),
            "a 32-bit integer image (PIL mode I) with values in [0, 70000], beyond 16 bits "
            f"(0..65535), so its white level is unknown; {FIX}",
        ),
    ],
)
def test_images_whose_range_is_unknown_are_one_error_line(
    saved_model, tmp_path, capsys, pixels, message
):
    path = tmp_path / "deep.tif"
    Image.fromarray(pixels).save(path)
    code, out, err = predict(capsys, "--model", saved_model, path)
    assert (code, out) == (2, "")
    assert err == f"error: cannot use image {path}: {message}\n"


# ---------------------------------------------------------------- item 7: decompression bomb
def png_header_only(path, width: int, height: int) -> None:
    """A 1-bit grey PNG that says ``width x height`` and holds a few rows (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress((b"\x00" + bytes((width + 7) // 8)) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_one_line_with_its_size_and_the_limit(saved_model, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 60000, 60000)
    assert bomb.stat().st_size < 1000
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's own guard runs, not a test's
    code, out, err = predict(capsys, "--model", saved_model, bomb)
    assert (code, out) == (2, "")
    assert err == (
        f"error: image {bomb} is 60000 x 60000 = 3600000000 pixels, over the limit of "
        "178956970 pixels (PIL's guard against decompression bombs); pass a smaller image "
        "(scale it down first)\n"
    )
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the guard is back on


# ---------------------------------------------------------------- item 8: classes without names
def test_saving_refuses_a_model_whose_class_names_miss_classes(tiny_config, class_names, tmp_path):
    ten_classes = tiny_config(init_class=4, increment=2, total_tasks=4)
    model = build_model(ten_classes, class_names)  # 6 names
    model.add_task([0, 1, 2, 3])
    path = tmp_path / "m.pt"
    with pytest.raises(SavedModelError) as error:
        model.save(path)
    assert str(error.value) == (
        f"cannot save {path}: the model has 6 class names but its config has init_class + "
        "increment * (total_tasks - 1) = 10 classes; build it with a name for every class id "
        "of the stream"
    )
    six = build_model(tiny_config(), class_names)
    for classes in ([0, 1], [2, 3], [4, 5]):
        six.add_task(classes)
    del six.names[4], six.names[5]
    with pytest.raises(SavedModelError) as error:
        six.save(path)
    assert str(error.value) == (
        f"cannot save {path}: class ids [4, 5] were learned but have no name (the model has "
        "4 names); give the model a name for every class id"
    )
    assert not path.exists()


def test_saved_model_with_learned_classes_without_names_is_one_error_line(
    saved_model, class_names, grey, tmp_path, capsys
):
    payload = torch.load(saved_model, weights_only=True)
    payload["class_names"] = {c: class_names[c] for c in range(4)}  # an edited or older file
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    image = tmp_path / "grey.png"
    Image.fromarray(grey).save(image)
    code, out, err = predict(capsys, "--model", edited, image)
    assert (code, out) == (2, "")
    assert err == (
        f"error: {edited}: class ids [4, 5] were learned but the file has no name for them "
        "(4 names); it was written by an older version or edited: save the trained model "
        "again with a name for every class\n"
    )


# ---------------------------------------------------------------- item 13: NaN / Inf pixels
NON_FINITE = (
    "the stream serves a float image with non-finite pixel values (NaN or Inf); repair or drop "
    "such items (a transform dividing by zero?), then serve [0, 1] values"
)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_clip_input_names_non_finite_pixels(bad):
    backbone = load_clip("cliphinge-tiny", None)
    image = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    image[1, 4, 7] = bad
    for resize_on_device in (False, True):
        convert = ClipInput.for_backbone(backbone, resize_on_device=resize_on_device)
        with pytest.raises(StreamInputError) as error:
            convert(image)
        assert str(error.value) == NON_FINITE


class Items(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.targets = images, labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


@pytest.mark.parametrize("position", [7, 30])  # 30: an item the strategy's check reads
def test_strategy_names_the_experience_item_and_class_of_a_nan_image(
    tiny_config, class_names, evaluator_factory, synthetic_data, position
):
    images = (synthetic_data["train_x"] * 0.2 + 0.5).clamp(0, 1)  # [0, 1] floats
    labels = synthetic_data["train_y"]  # 30 per class, in class order
    images[position, 0, 3, 3] = float("nan")
    stream = nc_benchmark(
        Items(images, labels),
        Items(images, labels),
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(6)),
    )
    experience = stream.train_stream[0]
    assert experience.dataset.targets[position] == labels[position] == position // 30
    strategy = CLIPHingeStrategy(
        config=tiny_config(init_epochs=1, epochs=1, second_stage_epochs=0),
        class_names=class_names,
        evaluator=evaluator_factory(),
    )
    with pytest.raises(StreamInputError) as error:
        strategy.train(experience)
    where = "train features, task 0" if position == 7 else "train experience 0"
    assert str(error.value) == f"{where}: item {position} (class {position // 30}): {NON_FINITE}"


# ---------------------------------------------------------------- item 18: no false notice
def test_loading_a_saved_model_does_not_say_it_was_initialized_randomly(
    saved_model, grey, tmp_path, capsys, caplog, monkeypatch
):
    image = tmp_path / "grey.png"
    Image.fromarray(grey).save(image)
    real = open_clip.create_model_and_transforms

    def also_warns(*args, **kwargs):  # any other warning while loading still gets through
        logging.warning("another warning from open_clip")
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", also_warns)
    filters = list(logging.getLogger().filters)
    caplog.set_level(logging.WARNING)
    code, out, err = predict(capsys, "--model", saved_model, image)
    assert code == 0 and out.startswith(f"{image}: ")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["another warning from open_clip"]
    assert "initialized randomly" not in err
    assert logging.getLogger().filters == filters  # dropped only while loading
    caplog.clear()
    load_clip("cliphinge-tiny", None)  # building random weights on purpose: said, as before
    assert (
        "No pretrained weights loaded for model 'cliphinge-tiny'. Model initialized randomly."
        in [record.getMessage() for record in caplog.records]
    )
