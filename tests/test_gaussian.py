"""Class Gaussian statistics and sampling against numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from avalanche_cliphinge import ClassGaussians, class_gaussian_stats, make_positive_definite


def numpy_pd(cov: np.ndarray, shrinkage: float, jitter: float) -> np.ndarray:
    dim = cov.shape[-1]
    sym = 0.5 * (cov + cov.T)
    return (
        (1 - shrinkage) * sym + shrinkage * np.trace(sym) / dim * np.eye(dim) + jitter * np.eye(dim)
    )


# ---- class_gaussian_stats ---------------------------------------------------------------
def test_stats_match_numpy_with_unsorted_labels_a_singleton_and_n_below_dim():
    rng = np.random.default_rng(0)
    # class 5: 8 samples (n > d = 6); class 2: 3 samples (n < d); class 9: a single sample
    labels = np.array([5, 2, 5, 9, 5, 2, 5, 5, 2, 5, 5, 5])
    feats = rng.normal(size=(labels.size, 6)) + labels[:, None]
    classes, means, covs = class_gaussian_stats(
        torch.tensor(feats, dtype=torch.float32), torch.tensor(labels)
    )
    assert classes.tolist() == [2, 5, 9]
    assert means.shape == (3, 6) and covs.shape == (3, 6, 6)
    assert means.dtype == torch.float32 and covs.dtype == torch.float32
    for row, c in enumerate([2, 5, 9]):
        x = feats[labels == c].astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(means[row].numpy(), x.mean(0), atol=1e-5)
        expected = np.zeros((6, 6)) if len(x) == 1 else np.cov(x, rowvar=False, ddof=1)
        np.testing.assert_allclose(covs[row].numpy(), expected, atol=1e-5)
    assert torch.count_nonzero(covs[2]) == 0  # singleton: zero covariance
    assert np.linalg.matrix_rank(covs[0].double().numpy(), tol=1e-6) == 2  # 3 samples: rank 2


def test_stats_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="features"):
        class_gaussian_stats(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


# ---- make_positive_definite -------------------------------------------------------------
@pytest.mark.parametrize("shrinkage,jitter", [(0.0, 1e-4), (0.3, 1e-3), (1.0, 0.0)])
def test_positive_definite_formula_and_eigenvalues_for_rank_deficient_covariance(shrinkage, jitter):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8))  # n = 3 < d = 8: rank 2 covariance
    cov = np.cov(x, rowvar=False, ddof=1)
    assert np.linalg.eigvalsh(cov).min() < 1e-10  # really singular
    skew = rng.normal(size=(8, 8)) * 1e-3  # asymmetric noise is symmetrised away
    got = make_positive_definite(torch.tensor(cov + skew - skew.T), shrinkage, jitter)
    expected = numpy_pd(cov, shrinkage, jitter)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), got.numpy().T, atol=0)
    eigenvalues = np.linalg.eigvalsh(got.numpy())
    assert eigenvalues.min() > 0
    if shrinkage == 0.0:
        assert eigenvalues.min() == pytest.approx(jitter, rel=1e-6)


def test_positive_definite_is_batched():
    rng = np.random.default_rng(2)
    covs = np.stack([np.cov(rng.normal(size=(4, 5)), rowvar=False) for _ in range(3)])
    got = make_positive_definite(torch.tensor(covs), shrinkage=0.2, jitter=1e-2)
    for k in range(3):
        np.testing.assert_allclose(got[k].numpy(), numpy_pd(covs[k], 0.2, 1e-2), atol=1e-12)


# ---- ClassGaussians ---------------------------------------------------------------------
def two_class_data(seed=0, n=60):
    """Class 3 around +4, class 8 around -4, dim 4, correlated (known sample statistics)."""
    rng = np.random.default_rng(seed)
    mix = np.array(
        [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 0.8, -0.4], [0.0, 0.0, 0.0, 0.6]]
    )
    a = rng.normal(size=(n, 4)) @ mix + 4.0
    b = rng.normal(size=(n, 4)) * np.array([0.5, 1.0, 1.5, 0.7]) - 4.0
    feats = np.concatenate([a, b]).astype(np.float32)
    labels = np.array([3] * n + [8] * n)
    order = rng.permutation(2 * n)
    return feats[order], labels[order]


def test_fit_stores_means_and_positive_definite_covariances():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    fitted = gaussians.fit(torch.tensor(feats), torch.tensor(labels), shrinkage=0.0, jitter=1e-3)
    assert fitted.tolist() == [3, 8] and len(gaussians) == 2
    for c in (3, 8):
        x = feats[labels == c].astype(np.float64)
        np.testing.assert_allclose(gaussians.mean_of([c])[0].numpy(), x.mean(0), atol=1e-5)
        np.testing.assert_allclose(
            gaussians.covariance_of([c])[0].numpy(),
            np.cov(x, rowvar=False) + 1e-3 * np.eye(4),
            atol=1e-5,
        )


def test_samples_have_the_stored_mean_and_covariance():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    gaussians.fit(torch.tensor(feats), torch.tensor(labels), jitter=1e-4)
    n = 20000
    drawn, drawn_labels = gaussians.sample([8, 3], n, torch.Generator().manual_seed(0))
    assert drawn.shape == (2 * n, 4) and drawn_labels.shape == (2 * n,)
    for block, c in enumerate([8, 3]):
        x = drawn[block * n : (block + 1) * n].double().numpy()
        mean = gaussians.mean_of([c])[0].double().numpy()
        cov = gaussians.covariance_of([c])[0].double().numpy()
        # standard errors at n = 20000 are ~0.01 for these scales: 0.05 is about 5 sigma
        np.testing.assert_allclose(x.mean(0), mean, atol=0.05)
        np.testing.assert_allclose(np.cov(x, rowvar=False), cov, atol=0.06)


def test_sample_labels_grouped_per_class_in_the_requested_order():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    gaussians.fit(torch.tensor(feats), torch.tensor(labels))
    drawn, drawn_labels = gaussians.sample([8, 3, 8], 5, torch.Generator().manual_seed(1))
    assert drawn_labels.tolist() == [8] * 5 + [3] * 5 + [8] * 5
    # class 8 lives around -4, class 3 around +4: each block comes from its own Gaussian
    assert (drawn[:5].mean(1) < 0).all() and (drawn[5:10].mean(1) > 0).all()
    assert (drawn[10:].mean(1) < 0).all()


def test_same_generator_seed_gives_identical_samples():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    gaussians.fit(torch.tensor(feats), torch.tensor(labels))
    a, _ = gaussians.sample([3, 8], 7, torch.Generator().manual_seed(42))
    b, _ = gaussians.sample([3, 8], 7, torch.Generator().manual_seed(42))
    c, _ = gaussians.sample([3, 8], 7, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_refit_merges_a_returning_class_and_keeps_the_others():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    gaussians.fit(torch.tensor(feats), torch.tensor(labels))
    mean_3 = gaussians.mean_of([3]).clone()
    cov_3 = gaussians.covariance_of([3]).clone()
    rng = np.random.default_rng(5)
    new = (rng.normal(size=(20, 4)) + 100.0).astype(np.float32)
    new_labels = np.array([8] * 10 + [11] * 10)
    gaussians.fit(torch.tensor(new), torch.tensor(new_labels))
    assert sorted(gaussians.class_ids.tolist()) == [3, 8, 11] and len(gaussians) == 3
    # class 8 came back: its statistics are those of its 60 old and 10 new samples together
    all_8 = np.concatenate([feats[labels == 8], new[:10]]).astype(np.float64)
    np.testing.assert_allclose(gaussians.mean_of([8])[0].numpy(), all_8.mean(0), atol=1e-4)
    np.testing.assert_allclose(
        gaussians.covs[gaussians.index_of([8])][0].numpy(),
        np.cov(all_8, rowvar=False),
        rtol=1e-4,
        atol=1e-3,
    )
    assert int(gaussians.counts[gaussians.index_of([8])]) == 70
    np.testing.assert_allclose(gaussians.mean_of([11])[0].numpy(), new[10:].mean(0), atol=1e-4)
    assert torch.equal(gaussians.mean_of([3]), mean_3)
    assert torch.equal(gaussians.covariance_of([3]), cov_3)


def test_unknown_class_raises_key_error():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    gaussians.fit(torch.tensor(feats), torch.tensor(labels))
    with pytest.raises(KeyError, match="7"):
        gaussians.index_of([3, 7])
    with pytest.raises(KeyError):
        gaussians.sample([7], 2)
    assert gaussians.index_of([8, 3]).tolist() == [1, 0]


def test_single_sample_class_warns_naming_the_class_and_samples_mean_plus_jitter():
    feats, labels = two_class_data()
    lonely = np.full((1, 4), 10.0, dtype=np.float32)
    gaussians = ClassGaussians(4)
    with pytest.warns(UserWarning, match=r"class 42 has 1 training sample") as record:
        gaussians.fit(
            torch.tensor(np.concatenate([feats, lonely])),
            torch.tensor(np.concatenate([labels, [42]])),
            jitter=1e-4,
        )
    assert not any("class 3 " in str(w.message) or "class 8 " in str(w.message) for w in record)
    drawn, _ = gaussians.sample([42], 5000, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(drawn.mean(0).numpy(), lonely[0], atol=1e-3)
    np.testing.assert_allclose(drawn.std(0).numpy(), np.full(4, 1e-2), rtol=0.1)


def test_classes_with_several_samples_do_not_warn():
    feats, labels = two_class_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassGaussians(4).fit(torch.tensor(feats), torch.tensor(labels))


def test_state_dict_round_trip_into_a_fresh_module():
    feats, labels = two_class_data()
    gaussians = ClassGaussians(4)
    gaussians.fit(torch.tensor(feats), torch.tensor(labels), jitter=1e-3)
    fresh = ClassGaussians(4)
    fresh.load_state_dict(gaussians.state_dict())
    assert fresh.class_ids.tolist() == [3, 8]
    assert torch.equal(fresh.means, gaussians.means)
    assert torch.equal(fresh.covariance_of([3, 8]), gaussians.covariance_of([3, 8]))
    a, la = gaussians.sample([8, 3], 4, torch.Generator().manual_seed(3))
    b, lb = fresh.sample([8, 3], 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(la, lb)
