"""ClassGaussians' storage modes, chunked fitting and sampling, and the state holding the
factors once. Memory figures are the benchmark's (benchmarks/gaussian_memory.py); the slow
test here runs it at a small size."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_cliphinge import CLIPHingeConfig, ClassGaussians, ConfigError
from avalanche_cliphinge.gaussian_storage import STORAGES, factor_bytes_per_class, top_eigenpairs

ROOT = Path(__file__).resolve().parents[1]

HUGE = 1 << 40  # every class in one chunk
TINY = 1  # one class per chunk, one block per fit


def class_data(dim=16, classes=(0, 1, 2), n=400, seed=0, offset=0.0):
    """``n`` features per class, each class with its own correlated covariance whose
    spectrum decays (so a low rank keeps most of it)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for c in classes:
        mix = rng.normal(size=(dim, dim)) * np.exp(-np.arange(dim) / 4.0)[None, :]
        feats.append(rng.normal(size=(n, dim)) @ mix.T + rng.normal(size=dim) + offset)
        labels += [c] * n
    order = rng.permutation(len(labels))
    return (
        torch.tensor(np.concatenate(feats)[order], dtype=torch.float32),
        torch.tensor(labels)[order],
    )


def fitted(storage="full", rank=64, chunk_bytes=HUGE, dim=16, **fit):
    """Gaussians of classes 0-2, then 3-4 and class 1 returning."""
    gaussians = ClassGaussians(dim, storage, min(rank, dim), chunk_bytes)
    gaussians.fit(*class_data(dim), **fit)
    gaussians.fit(*class_data(dim, classes=(3, 1, 4), n=50, seed=1, offset=2.0), **fit)
    return gaussians


def relative_error(got, expected):
    """Relative Frobenius error per matrix ``[k]`` (float64)."""
    diff = torch.linalg.matrix_norm(got.double() - expected.double())
    return diff / torch.linalg.matrix_norm(expected.double())


def sampling_tolerance(cov, n):
    """Three times the expected Frobenius error of the sample covariance of ``n`` draws,
    relative to ``||cov||_F``: ``E||S_n - cov||_F^2 = (tr(cov)^2 + ||cov||_F^2) / n`` for
    Gaussian draws."""
    cov = cov.double()
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    frob = torch.linalg.matrix_norm(cov)
    return 3 * torch.sqrt((trace**2 + frob**2) / n) / frob


def draws_covariance(gaussians, classes, n, seed=0):
    drawn, _ = gaussians.sample(classes, n, torch.Generator().manual_seed(seed))
    x = drawn.double().reshape(len(classes), n, -1)
    centred = x - x.mean(1, keepdim=True)
    return centred.transpose(1, 2) @ centred / (n - 1)


# ---- chunking ---------------------------------------------------------------------------
@pytest.mark.parametrize("storage", STORAGES)
def test_chunked_fit_and_sample_equal_unchunked_bitwise(storage):
    whole, chunked = fitted(storage, rank=6), fitted(storage, rank=6, chunk_bytes=TINY)
    assert len(whole._sizes) == 1 and len(chunked._sizes) == 2  # one block per fit
    ids = [4, 0, 1, 3, 2]
    assert torch.equal(whole.mean_of(ids), chunked.mean_of(ids))
    assert torch.equal(whole.counts[whole.index_of(ids)], chunked.counts[chunked.index_of(ids)])
    assert torch.equal(whole.covariance_of(ids), chunked.covariance_of(ids))
    for n in (1, 5, 6, 13):  # 5 and 6: shapes where a lone matmul rounds otherwise
        a = whole.sample(ids, n, torch.Generator().manual_seed(n))
        b = chunked.sample(ids, n, torch.Generator().manual_seed(n))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rows_a, rows_b = whole.index_of([1, 1, 4, 0]), chunked.index_of([1, 1, 4, 0])
    a, _ = whole.sample_rows(rows_a, 6, torch.Generator().manual_seed(3))
    b, _ = chunked.sample_rows(rows_b, 6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_several_blocks_draw_the_same_rows_twice_from_one_plan():
    gaussians = fitted(chunk_bytes=TINY)
    rows = gaussians.index_of([4, 0, 3])
    first, _ = gaussians.sample_rows(rows, 4, torch.Generator().manual_seed(0))
    plan = gaussians._plan
    second, _ = gaussians.sample_rows(rows, 4, torch.Generator().manual_seed(0))
    assert gaussians._plan is plan and torch.equal(first, second)
    rows[0] = rows[1]  # changed in place: a new plan
    gaussians.sample_rows(rows, 4, torch.Generator().manual_seed(0))
    assert gaussians._plan is not plan


def test_adding_classes_keeps_earlier_blocks_in_place():
    dim = 8
    gaussians = ClassGaussians(dim, chunk_bytes=2 * factor_bytes_per_class(dim))
    gaussians.fit(*class_data(dim, classes=(0,)))
    kept = gaussians.chols_0.data_ptr()
    gaussians.fit(*class_data(dim, classes=(1, 2), seed=1))  # block 0 had < 2 classes: grown
    assert gaussians._sizes == [3]
    grown = gaussians.chols_0.data_ptr()
    assert grown != kept
    gaussians.fit(*class_data(dim, classes=(3, 4), seed=2))  # block 0 is full: a new block
    gaussians.fit(*class_data(dim, classes=(0,), n=20, seed=3))  # returning: written in place
    assert gaussians._sizes == [3, 2] and gaussians.chols_0.data_ptr() == grown
    assert gaussians.factor_bytes == 5 * factor_bytes_per_class(dim)


def test_returning_class_merges_as_if_fitted_at_once_with_shrinkage_and_rapf():
    settings = dict(shrinkage=0.3, jitter=1e-3, rapf_shrink=True)
    twice = fitted(**settings)
    old, new = class_data(), class_data(classes=(3, 1, 4), n=50, seed=1, offset=2.0)
    once = ClassGaussians(16)
    once.fit(torch.cat([old[0], new[0]]), torch.cat([old[1], new[1]]), **settings)
    ids = [0, 1, 2, 3, 4]
    assert torch.equal(twice.counts[twice.index_of(ids)], once.counts[once.index_of(ids)])
    torch.testing.assert_close(twice.mean_of(ids), once.mean_of(ids), rtol=0, atol=1e-5)
    assert relative_error(twice.covariance_of(ids), once.covariance_of(ids)).max() < 1e-5
    assert (
        relative_error(twice.sample_covariance_of(ids), once.sample_covariance_of(ids)).max() < 1e-5
    )


@pytest.mark.parametrize("shrinkage,rapf", [(0.0, False), (0.4, False), (0.0, True)])
def test_sample_covariances_are_recovered_from_the_factors(shrinkage, rapf):
    feats, labels = class_data()
    gaussians = ClassGaussians(16)
    gaussians.fit(feats, labels, shrinkage=shrinkage, jitter=1e-3, rapf_shrink=rapf)
    for c in range(3):
        x = feats[labels == c].double().numpy()
        np.testing.assert_allclose(
            gaussians.sample_covariance_of([c])[0].numpy(),
            np.cov(x, rowvar=False),
            rtol=1e-4,
            atol=1e-5,
        )


def test_shrinkage_one_keeps_only_the_trace():
    feats, labels = class_data()
    gaussians = ClassGaussians(16)
    gaussians.fit(feats, labels, shrinkage=1.0)
    cov = np.cov(feats[labels == 0].double().numpy(), rowvar=False)
    np.testing.assert_allclose(
        gaussians.sample_covariance_of([0])[0].numpy(),
        np.trace(cov) / 16 * np.eye(16),
        rtol=1e-5,
        atol=1e-6,
    )


# ---- bf16 and low-rank against the full covariance ---------------------------------------
def test_bf16_covariance_within_its_rounding_bound_of_the_full_one():
    full, half = fitted("full"), fitted("bf16")
    assert half.chols_0.dtype == torch.bfloat16
    ids = [0, 1, 2, 3, 4]
    exact = full.covariance_of(ids).double()
    # each entry of L is rounded to 8 significant bits: |dL| <= 2**-9 |L| entrywise, so
    # ||L'L'^T - LL^T||_F <= 2 ||dL||_F ||L||_2 + ||dL||_F^2, with ||L||_F^2 = tr(S) and
    # ||L||_2^2 = ||S||_2
    trace = torch.diagonal(exact, dim1=-2, dim2=-1).sum(-1)
    top = torch.linalg.matrix_norm(exact, ord=2)
    d_l = 2.0**-9 * trace.sqrt()
    bound = (2 * d_l * top.sqrt() + d_l**2) / torch.linalg.matrix_norm(exact)
    error = relative_error(half.covariance_of(ids), exact)
    assert (error <= bound).all() and (error > 0).all()
    assert error.max() < 2.0**-7  # a few tenths of a percent
    n = 40_000
    got = draws_covariance(half, ids, n)
    assert (relative_error(got, exact) <= bound + sampling_tolerance(exact, n)).all()


def test_lowrank_with_full_rank_reproduces_the_full_covariance():
    full, low = fitted("full"), fitted("lowrank", rank=16)
    ids = [0, 1, 2, 3, 4]
    assert low.basis_0.shape == (5, 16, 16) and low.std_0.shape == (5, 16)
    assert relative_error(low.covariance_of(ids), full.covariance_of(ids)).max() < 1e-5
    n = 40_000
    exact = full.covariance_of(ids)
    got = draws_covariance(low, ids, n)
    assert (relative_error(got, exact) <= sampling_tolerance(exact, n)).all()


def test_lowrank_is_the_top_eigenspace_plus_the_exact_diagonal():
    rank = 4
    full, low = fitted("full"), fitted("lowrank", rank=rank)
    ids = [0, 2, 3, 4]  # class 1 came back: merged through its rank-4 approximation
    exact = full.covariance_of(ids).double()
    values, vectors = torch.linalg.eigh(exact)
    top = vectors[..., -rank:] * values[..., None, -rank:] @ vectors[..., -rank:].transpose(1, 2)
    expected = top + torch.diag_embed(torch.diagonal(exact - top, dim1=-2, dim2=-1))
    got = low.covariance_of(ids).double()
    assert relative_error(got, expected).max() < 1e-4
    torch.testing.assert_close(
        torch.diagonal(got, dim1=-2, dim2=-1),
        torch.diagonal(exact, dim1=-2, dim2=-1),
        rtol=1e-5,
        atol=1e-7,
    )
    # what it drops: the off-diagonal part of the eigenvalues below the top rank
    dropped = torch.linalg.matrix_norm(
        (exact - top) - torch.diag_embed(torch.diagonal(exact - top, dim1=-2, dim2=-1))
    ) / torch.linalg.matrix_norm(exact)
    torch.testing.assert_close(relative_error(got, exact), dropped, rtol=1e-3, atol=1e-6)
    n = 40_000
    drawn = draws_covariance(low, ids, n)
    assert (relative_error(drawn, got) <= sampling_tolerance(got, n)).all()


def test_lowrank_float32_eigh_refined_matches_the_float64_truncation():
    # rank + RITZ_EXTRA <= dim / 2: the float32 eigh refined in float64 (the path a rank of
    # 64 at dim 512 takes), against the exact float64 eigh
    dim, rank = 64, 8
    feats, labels = class_data(dim, classes=range(6), n=300)
    covs = torch.stack([torch.cov(feats[labels == c].double().T) for c in range(6)])
    pd = covs + 1e-4 * torch.eye(dim, dtype=torch.float64)
    values, vectors = top_eigenpairs(pd, rank)
    exact_values, exact_vectors = torch.linalg.eigh(pd)
    torch.testing.assert_close(values, exact_values[:, -rank:], rtol=1e-10, atol=0)
    top = exact_vectors[..., -rank:] * exact_values[:, None, -rank:]
    expected = top @ exact_vectors[..., -rank:].transpose(1, 2)
    assert (
        relative_error(vectors * values[:, None, :] @ vectors.transpose(1, 2), expected).max()
        < 1e-9
    )
    # the stored Gaussians: within float32 rounding of the float64 truncation
    low = ClassGaussians(dim, "lowrank", rank)
    low.fit(feats, labels)
    diag = torch.diagonal(pd, dim1=-2, dim2=-1)
    exact = expected + torch.diag_embed(diag - torch.diagonal(expected, dim1=-2, dim2=-1))
    assert relative_error(low.covariance_of(range(6)), exact).max() < 2e-7


@pytest.mark.parametrize("storage", STORAGES)
def test_sample_into_a_given_output_draws_the_same_features(storage):
    gaussians = fitted(storage, rank=6, chunk_bytes=TINY)  # two blocks: rows split
    ids = [4, 0, 1, 3]
    expected, labels = gaussians.sample(ids, 5, torch.Generator().manual_seed(2))
    out = torch.full((20, 16), float("nan"))
    got, got_labels = gaussians.sample(ids, 5, torch.Generator().manual_seed(2), out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, expected) and torch.equal(got_labels, labels)
    for bad in (torch.empty(19, 16), torch.empty(20, 16, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"out must be a contiguous float32 tensor"):
            gaussians.sample(ids, 5, out=bad)


@pytest.mark.slow
def test_lowrank_sample_peak_within_the_bound_measured_by_the_benchmark():
    # the benchmark's gaussian_sample phase in its own process (glibc's mmap threshold fixed,
    # VmHWM), at 600 classes of 256-d, rank 32 (19 MiB of factors, chunks of 2 MiB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gaussian_memory.py"), "--child"]
    command += ["gaussian_sample", "--classes", "600", "--storage", "lowrank", "--dim", "256"]
    command += ["--rank", "32", "--tasks", "2", "--per-class", "4", "--chunk-bytes", str(2 << 20)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    stored = 600 * factor_bytes_per_class(256, "lowrank", 32) / (1 << 20)
    assert record["stored_factor_mib"] == round(stored, 1)
    # the store, the means (0.6 MiB), the rank noise (1.5 MiB) and a chunk (2 MiB)
    assert record["ratio"] <= 1.3, record
    output = 600 * 20 * 256 * 4 / (1 << 20)
    assert record["output_mib"] == round(output, 1)
    # a call that allocates its output takes the output on top, nothing more
    assert record["peak_with_output_mib"] <= record["peak_mib"] + output + 0.5, record


# ---- state ------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", STORAGES)
def test_state_holds_the_factors_once_and_round_trips(storage):
    gaussians = fitted(storage, rank=6, chunk_bytes=TINY)
    state = gaussians.state_dict()
    assert "covs" not in state and not any(k.startswith("chols") and k[-1] == "s" for k in state)
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)  # nothing shared or repeated
    factors = sum(
        t.numel() * t.element_size()
        for k, t in state.items()
        if k.split("_")[0] in ("chols", "basis", "std")
    )
    assert factors == gaussians.factor_bytes == 5 * factor_bytes_per_class(16, storage, 6)
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert total == factors + 5 * (16 * 4 + 8 + 8) + 3 * 8  # means, ids, counts, params
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert total < buffer.tell() < total + 8192  # the file: once, plus headers
    buffer.seek(0)
    for assign in (False, True):
        buffer.seek(0)
        fresh = ClassGaussians(16, storage, 6)
        fresh.load_state_dict(torch.load(buffer, weights_only=True), assign=assign)
        assert fresh._sizes == gaussians._sizes
        a = gaussians.sample([4, 1, 0], 5, torch.Generator().manual_seed(1))[0]
        b = fresh.sample([4, 1, 0], 5, torch.Generator().manual_seed(1))[0]
        assert torch.equal(a, b)
        fresh.fit(*class_data(16, classes=(7,), seed=4))  # keeps growing after loading
        assert len(fresh) == 6


def test_a_state_saved_before_the_blocks_loads():
    feats, labels = class_data()
    gaussians = ClassGaussians(16)
    gaussians.fit(feats, labels)
    chols = gaussians.chols_0
    legacy = {
        "class_ids": gaussians.class_ids,
        "counts": gaussians.counts,
        "means": gaussians.means,
        "covs": chols @ chols.transpose(1, 2),
        "chols": chols,
    }
    fresh = ClassGaussians(16)
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.covariance_of([0, 1, 2]), gaussians.covariance_of([0, 1, 2]))
    with pytest.raises(ValueError, match="without their fit parameters"):
        fresh.sample_covariance_of([0])
    fresh.fit(*class_data(classes=(5,), seed=2))  # sets them
    assert len(fresh) == 4


def test_loading_another_storage_names_both():
    state = fitted("bf16").state_dict()
    with pytest.raises(RuntimeError, match="stored as 'bf16' but this model keeps 'full'"):
        ClassGaussians(16).load_state_dict(state)
    with pytest.raises(RuntimeError, match="'lowrank' rank 4"):
        ClassGaussians(16, "lowrank", 8).load_state_dict(fitted("lowrank", rank=4).state_dict())


# ---- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (dict(storage="fp16"), "'fp16' is not one of full, bf16, lowrank"),
        (dict(storage="lowrank", rank=0), "rank must be an integer >= 1"),
        (dict(storage="lowrank", rank=17), "rank 17 exceeds the feature dimension 16"),
        (dict(chunk_bytes=0), "chunk_bytes must be a positive number of bytes"),
    ],
)
def test_bad_storage_settings_raise(args, message):
    with pytest.raises(ValueError, match=message):
        ClassGaussians(16, **args)


def test_config_validates_the_storage_keys():
    assert CLIPHingeConfig().gaussian_storage == "full"
    assert CLIPHingeConfig(gaussian_storage="lowrank", gaussian_rank=32).gaussian_rank == 32
    with pytest.raises(ConfigError, match="gaussian_storage' must be 'full'.*'bf16'.*'lowrank'"):
        CLIPHingeConfig(gaussian_storage="half")
    with pytest.raises(ConfigError, match="gaussian_rank' must be >= 1"):
        CLIPHingeConfig(gaussian_rank=0)


def test_fits_with_other_settings_or_features_are_refused():
    feats, labels = class_data()
    gaussians = ClassGaussians(16)
    gaussians.fit(feats, labels, jitter=1e-3)
    with pytest.raises(ValueError, match="fitted with shrinkage=0, jitter=0.001"):
        gaussians.fit(feats, labels, jitter=1e-4)
    with pytest.raises(ValueError, match="features have 8 dimensions but these Gaussians 16"):
        gaussians.fit(feats[:, :8], labels, jitter=1e-3)
    with pytest.raises(ValueError, match=r"shrinkage must be in \[0, 1\]"):
        ClassGaussians(16).fit(feats, labels, shrinkage=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gaussians.fit(feats, labels, jitter=1e-3)  # same settings: fine
