"""select_hard_pairs, hinge_loss and fuse_logits against values worked out by hand or numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avalanche_cliphinge import fuse_logits, hinge_loss, select_hard_pairs


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def numpy_hinge(
    feats: np.ndarray, old_text: np.ndarray, new_text: np.ndarray, margin: float
) -> float:
    """Mean over samples of max(0, cos(f, new) - cos(f, old) + margin); feats [n, dim]."""
    pos = numpy_cosine(feats, old_text[None])[:, 0]
    neg = numpy_cosine(feats, new_text[None])[:, 0]
    return float(np.maximum(0.0, neg - pos + margin).mean())


# ---- select_hard_pairs ------------------------------------------------------------------
# Unit-free example with cosines known exactly:
#   old 10 = [1, 0, 0], old 11 = [0, 1, 0], old 12 = [1, 1, 0]
#   new 20 = [1, 0, 0], new 21 = [0.8, 0.6, 0]
#   cos(20, 10) = 1, cos(20, 11) = 0, cos(20, 12) = 1/sqrt(2) = 0.70711
#   cos(21, 10) = 0.8, cos(21, 11) = 0.6, cos(21, 12) = 1.4/sqrt(2) = 0.98995
OLD = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
NEW = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]])
OLD_IDS, NEW_IDS = [10, 11, 12], [20, 21]
ALL_PAIRS_BY_HAND = [
    (10, 20, 1.0),
    (12, 21, 1.4 / 2**0.5),
    (10, 21, 0.8),
    (12, 20, 1 / 2**0.5),
    (11, 21, 0.6),
    (11, 20, 0.0),
]


def assert_pairs_equal(got, expected, tol=1e-6):
    assert [(o, n) for o, n, _ in got] == [(o, n) for o, n, _ in expected]
    for (_, _, s_got), (_, _, s_exp) in zip(got, expected):
        assert s_got == pytest.approx(s_exp, abs=tol)
    assert all(
        isinstance(o, int) and isinstance(n, int) and isinstance(s, float) for o, n, s in got
    )


def test_pairs_above_threshold_sorted_by_similarity():
    got = select_hard_pairs(NEW, OLD, NEW_IDS, OLD_IDS, threshold=0.65, top_k=10)
    assert_pairs_equal(got, ALL_PAIRS_BY_HAND[:4])


def test_top_k_keeps_the_most_similar_pairs():
    got = select_hard_pairs(NEW, OLD, NEW_IDS, OLD_IDS, threshold=-1.0, top_k=2)
    assert_pairs_equal(got, ALL_PAIRS_BY_HAND[:2])


def test_threshold_is_strict():
    # cos(20, 11) is exactly 0 and cos(20, 10) exactly 1: neither passes a threshold equal to it
    got = select_hard_pairs(NEW, OLD, NEW_IDS, OLD_IDS, threshold=0.0, top_k=10)
    assert_pairs_equal(got, ALL_PAIRS_BY_HAND[:5])
    assert select_hard_pairs(NEW, OLD, NEW_IDS, OLD_IDS, threshold=1.0, top_k=10) == []


def test_no_pair_above_threshold_and_top_k_zero_give_empty_lists():
    orthogonal_new = torch.tensor([[0.0, 0.0, 1.0]])
    assert select_hard_pairs(orthogonal_new, OLD, [30], OLD_IDS, 0.1, 10) == []
    assert select_hard_pairs(NEW, OLD, NEW_IDS, OLD_IDS, threshold=-1.0, top_k=0) == []


def test_ties_broken_by_old_id_then_new_id():
    same = torch.tensor([[2.0, 0.0], [5.0, 0.0]])  # every cosine is exactly 1
    got = select_hard_pairs(
        same, same.flip(0), new_ids=[9, 7], old_ids=[5, 3], threshold=0.5, top_k=10
    )
    assert [(o, n) for o, n, _ in got] == [(3, 7), (3, 9), (5, 7), (5, 9)]
    assert all(s == 1.0 for _, _, s in got)


def test_unnormalised_inputs_match_numpy_cosine():
    rng = np.random.default_rng(0)
    new = rng.normal(size=(5, 8)) * rng.uniform(0.1, 10.0, size=(5, 1))
    old = rng.normal(size=(7, 8)) * rng.uniform(0.1, 10.0, size=(7, 1))
    new_ids = [40, 41, 42, 43, 44]
    old_ids = [3, 1, 4, 15, 9, 2, 6]
    sim = numpy_cosine(new, old)
    threshold = float(np.median(sim))
    expected = sorted(
        (
            (old_ids[c], new_ids[r], float(sim[r, c]))
            for r in range(5)
            for c in range(7)
            if sim[r, c] > threshold
        ),
        key=lambda p: (-p[2], p[0], p[1]),
    )[:6]
    got = select_hard_pairs(
        torch.tensor(new, dtype=torch.float32),
        torch.tensor(old, dtype=torch.float32),
        new_ids,
        old_ids,
        threshold,
        top_k=6,
    )
    assert len(expected) == 6
    assert_pairs_equal(got, expected, tol=1e-5)


def test_ids_that_do_not_match_the_rows_raise():
    with pytest.raises(ValueError, match="new ids"):
        select_hard_pairs(NEW, OLD, [20], OLD_IDS, 0.0, 10)
    with pytest.raises(ValueError, match="old ids"):
        select_hard_pairs(NEW, OLD, NEW_IDS, [10, 11], 0.0, 10)


# ---- hinge_loss -------------------------------------------------------------------------
# Hand-worked 2-D example, margin 0.1, old text [2, 0] (-> [1, 0]), new text [0, 5] (-> [0, 1]):
#   f = [3, 4] -> [0.6, 0.8]:        pos 0.6, neg 0.8 -> max(0, 0.8 - 0.6 + 0.1) = 0.3
#   f = [1, 0]:                      pos 1,   neg 0   -> max(0, -0.9)            = 0
#   f = [1, 1] -> [0.7071, 0.7071]:  pos = neg        -> 0.1
#   f = [0, 2] -> [0, 1]:            pos 0,   neg 1   -> 1.1
#   mean = (0.3 + 0 + 0.1 + 1.1) / 4 = 0.375
HAND_FEATS = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
HAND_OLD_TEXT = torch.tensor([2.0, 0.0])
HAND_NEW_TEXT = torch.tensor([0.0, 5.0])


def test_hinge_hand_worked_example():
    loss = hinge_loss(HAND_FEATS, HAND_OLD_TEXT, HAND_NEW_TEXT, margin=0.1)
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(0.375, abs=1e-6)
    # margin 1.2 activates the second sample too: (1.4 + 0.2 + 1.2 + 2.2) / 4 = 1.25
    assert float(hinge_loss(HAND_FEATS, HAND_OLD_TEXT, HAND_NEW_TEXT, 1.2)) == pytest.approx(
        1.25, abs=1e-6
    )


def test_hinge_matches_numpy_on_random_data():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(9, 6))
    old_text, new_text = rng.normal(size=6) * 3, rng.normal(size=6) * 0.2
    for margin in (0.0, 0.1, 0.7):
        got = hinge_loss(
            torch.tensor(feats), torch.tensor(old_text), torch.tensor(new_text), margin
        )
        assert float(got) == pytest.approx(
            numpy_hinge(feats, old_text, new_text, margin), abs=1e-10
        )
    assert numpy_hinge(feats, old_text, new_text, 0.7) > 0  # the data exercise the hinge


def test_batched_pairs_equal_mean_of_per_pair_losses():
    rng = np.random.default_rng(2)
    feats = torch.tensor(rng.normal(size=(3, 5, 4)))
    old_text = torch.tensor(rng.normal(size=(3, 4)))
    new_text = torch.tensor(rng.normal(size=(3, 4)))
    per_pair = [
        numpy_hinge(feats[p].numpy(), old_text[p].numpy(), new_text[p].numpy(), 0.2)
        for p in range(3)
    ]
    batched = hinge_loss(feats, old_text, new_text, margin=0.2)
    assert float(batched) == pytest.approx(float(np.mean(per_pair)), abs=1e-10)
    assert len(set(np.round(per_pair, 8))) == 3  # the pairs really differ


def test_hinge_is_zero_when_every_sample_keeps_the_margin():
    # every feature within ~6 degrees of the old text: pos - neg > 0.8 > margin 0.1
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [2.0, -0.1], [1.0, 0.05]], requires_grad=True)
    loss = hinge_loss(feats, HAND_OLD_TEXT, HAND_NEW_TEXT, margin=0.1)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.count_nonzero(feats.grad) == 0


def test_hinge_gradient_pushes_pos_up_and_neg_down():
    old_text = HAND_OLD_TEXT.clone().requires_grad_(True)
    new_text = HAND_NEW_TEXT.clone().requires_grad_(True)
    feats = HAND_FEATS.clone().requires_grad_(True)
    loss = hinge_loss(feats, old_text, new_text, margin=0.1)
    loss.backward()
    loss = float(loss.detach())
    # the satisfied sample [1, 0] contributes no gradient; the three active ones do
    assert torch.count_nonzero(feats.grad[1]) == 0
    assert all(torch.count_nonzero(feats.grad[i]) > 0 for i in (0, 2, 3))

    def mean_cos(text):
        f = torch.nn.functional.normalize(HAND_FEATS, dim=-1)
        return float((f @ torch.nn.functional.normalize(text.detach(), dim=-1)).mean())

    step = 0.05
    assert mean_cos(old_text - step * old_text.grad) > mean_cos(old_text)  # pos goes up
    assert mean_cos(new_text - step * new_text.grad) < mean_cos(new_text)  # neg goes down
    smaller = hinge_loss(
        HAND_FEATS,
        old_text.detach() - step * old_text.grad,
        new_text.detach() - step * new_text.grad,
        0.1,
    )
    assert float(smaller) < loss


# ---- fuse_logits ------------------------------------------------------------------------
def test_fuse_logits_is_clip_plus_alpha_head():
    rng = np.random.default_rng(3)
    clip, head = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    got = fuse_logits(torch.tensor(clip), torch.tensor(head), 0.3)
    np.testing.assert_allclose(got.numpy(), clip + 0.3 * head, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        fuse_logits(torch.tensor(clip), torch.tensor(head), 0.0).numpy(), clip, atol=0
    )


def test_fuse_logits_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        fuse_logits(torch.zeros(4, 6), torch.zeros(4, 5), 0.3)
