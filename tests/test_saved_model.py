"""A trained model as a file: CLIPHingeModel.save / load / predict."""

from __future__ import annotations

import pytest
import torch

from avalanche_cliphinge import CLIPHingeModel
from avalanche_cliphinge.model.saving import SavedModelError


@pytest.fixture(scope="module")
def trained(run_stream, tiny_config):
    config = tiny_config(init_epochs=6, epochs=6, second_stage_epochs=2, use_image_adapter=True)
    strategy, results = run_stream(config)
    return strategy, results


def test_saved_model_scores_exactly_like_the_trained_one(trained, synthetic_data, tmp_path):
    strategy, _ = trained
    model = strategy.model.eval()
    path = model.save(tmp_path / "final_model.pt")
    torch.manual_seed(12345)  # another global RNG state: the file must decide everything
    loaded = CLIPHingeModel.load(path)
    assert not loaded.training and loaded.task_classes == model.task_classes
    assert set(loaded.heads) == set(model.heads) and loaded.adapter is not None
    images = synthetic_data["test_x"]
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # the file is plain tensors and values: weights_only loading reads it
    torch.load(path, weights_only=True)


def test_predict_names_the_classes(trained, synthetic_data, class_names, tmp_path):
    strategy, results = trained
    loaded = CLIPHingeModel.load(strategy.model.save(tmp_path / "m.pt"))
    images, labels = synthetic_data["test_x"], synthetic_data["test_y"]
    pred = loaded.predict(images, k=3)
    assert pred.class_ids.shape == (len(labels), 3) and pred.scores.shape == (len(labels), 3)
    assert (pred.scores[:, :-1] >= pred.scores[:, 1:]).all()
    accuracy = float((pred.class_ids[:, 0] == labels).float().mean())
    expected = results[-1]["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert accuracy == pytest.approx(expected, abs=1e-6)
    assert pred.names[0] == [class_names[int(c)] for c in pred.class_ids[0]]
    one = loaded.predict(images[0], k=1)  # a single image
    assert one.class_ids.shape == (1, 1) and one.names[0][0] == pred.names[0][0]


def test_loading_refuses_what_is_not_a_saved_model(tmp_path):
    with pytest.raises(SavedModelError, match="does not exist"):
        CLIPHingeModel.load(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(SavedModelError, match="not a saved CLIPHinge model"):
        CLIPHingeModel.load(other)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(SavedModelError, match="not a readable saved model"):
        CLIPHingeModel.load(broken)
