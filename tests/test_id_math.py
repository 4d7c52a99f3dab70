"""Tests of the ID-pruning kernel (fxprune/passes/_id_math.py) against independent references: the dense column-pivoted
QR of the full Z (LAPACK geqp3), scipy.linalg.interpolative, SVD-based spectral norms and exact constructions."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.linalg import interpolative as sli

from fxprune.errors import DataError

try:
    from fxprune.passes import _id_math as idm
except ImportError:  # not installed: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from passes import _id_math as idm

pytestmark = pytest.mark.numerics  # float tolerances: CI reruns this module under AVX2 kernels, one thread
# The data here is float64 (or float32 rounded once, which both routes then see): only float64 rounding separates
# the Gram route from the dense QR. Forming G = Z^T Z squares the condition number, so T agrees to about
# n * cond(Z[:, keep])^2 * eps64; decaying() keeps cond near decay^-k (<= ~1e2 for these sizes), i.e. <= ~1e-10,
# checked at 1e-6 (the module docstring of _id_math: measured 1e-14..1e-9). Gram matrices of the same rows in
# another order or layout differ by summation order only: ~ sqrt(rows) * eps64 of |G|, checked at 1e-12.

GramAccumulator = idm.GramAccumulator
id_from_gram = idm.id_from_gram
id_dense = idm.id_dense
rel_error_of = idm.rel_error_of


def decaying(N, n, seed, decay=0.8, noise=1e-3):
    """Z = A diag(decay^i) B + noise: a decaying spectrum, columns of distinct norms (no pivot ties)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, n))
    B = rng.standard_normal((n, n))
    return A @ np.diag(decay ** np.arange(n)) @ B + noise * rng.standard_normal((N, n))


def stream(Z, nbatches=5, dtype=torch.float64):
    acc = GramAccumulator(Z.shape[1])
    for b in np.array_split(Z, nbatches):
        acc.update(torch.from_numpy(b).to(dtype))
    return acc


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def spectral_errors(Z):
    """Independent reference: ||R22||_2 / ||R||_2 for every k from geqp3's R, by SVD."""
    from scipy.linalg import qr

    R, _ = qr(Z, mode="r", pivoting=True)
    R = R[: min(Z.shape)]
    nr = np.linalg.norm(R, 2)
    n = Z.shape[1]
    return np.array([np.linalg.norm(R[k:, k:], 2) / nr if R[k:, k:].size else 0.0 for k in range(1, n + 1)])


def check_structure(res, n, k):
    assert res.keep.dtype == np.int64 and res.keep.shape == (k,)
    assert np.all(np.diff(res.keep) > 0), "keep must be sorted and unique"
    assert res.T.dtype == np.float64 and res.T.shape == (k, n)
    assert np.all(np.isfinite(res.T))
    assert np.array_equal(res.T[:, res.keep], np.eye(k)), "T[:, keep] must be I exactly"
    assert np.array_equal(np.sort(res.pivots[:k]), res.keep)
    assert res.errors.shape == (n,) and np.all(np.isfinite(res.errors))


# ---------------------------------------------------------------------------------------------------------------
# streaming vs dense


@pytest.mark.parametrize(
    "N,n,k,dtype",
    [
        (500, 16, 4, torch.float64),
        (2000, 64, 8, torch.float64),
        (1500, 64, 32, torch.float64),
        (1200, 40, 13, torch.float32),
        (50, 64, 8, torch.float64),  # fewer rows than channels
        (300, 10, 1, torch.float64),
    ],
)
def test_streaming_matches_dense(N, n, k, dtype):
    Z = decaying(N, n, seed=N + n + k)
    if dtype == torch.float32:
        Z = Z.astype(np.float32).astype(np.float64)  # the dense reference sees the same values
    acc = stream(Z, nbatches=7, dtype=dtype)
    assert acc.rows == N
    s = id_from_gram(acc, k)
    d = id_dense(Z, k)
    check_structure(s, n, k)
    check_structure(d, n, k)
    assert set(s.keep.tolist()) == set(d.keep.tolist())
    assert np.array_equal(s.keep, d.keep)
    assert np.array_equal(s.pivots[:k], d.pivots[:k])  # same pivot order too
    assert rel(s.T, d.T) < 1e-6
    assert abs(s.rel_error - d.rel_error) <= 1e-6 * d.rel_error
    # both agree with the directly measured reconstruction error
    assert abs(rel_error_of(Z, s.keep, s.T) - s.rel_error) <= 1e-6 * s.rel_error
    # per-k errors (Frobenius versions) agree too
    live = d.errors > 1e-6
    assert np.allclose(s.errors[live], d.errors[live], rtol=1e-6, atol=0)


def test_errors_array_bounds_spectral():
    Z = decaying(1000, 40, seed=21, decay=0.8)
    res = id_from_gram(stream(Z), 5)
    ref = spectral_errors(Z)  # independent: SVD of geqp3's R22 for every k
    live = ref > 1e-6
    assert np.all(res.errors[live] >= ref[live] * (1 - 1e-9))  # Frobenius >= spectral
    k = np.arange(1, 41)
    assert np.all(res.errors[live] <= ref[live] * np.sqrt(40 - k[live]) * (1 + 1e-9))
    assert np.all(np.diff(res.errors) <= 0) and res.errors[-1] == 0.0
    assert abs(res.rel_error - ref[4]) <= 1e-6 * ref[4]


def test_conv_maps_equal_manual_rows():
    rng = np.random.default_rng(3)
    C = 24
    maps = torch.from_numpy(rng.standard_normal((30, C, 5, 6)) * (0.85 ** np.arange(C))[None, :, None, None])
    acc4 = GramAccumulator(C)
    acc2 = GramAccumulator(C)
    for part in torch.split(maps, 7):
        acc4.update(part)
        acc2.update(part.permute(0, 2, 3, 1).reshape(-1, C))
    assert acc4.rows == acc2.rows == 30 * 5 * 6
    np.testing.assert_allclose(acc4.G, acc2.G, rtol=1e-13, atol=1e-12)
    a, b = id_from_gram(acc4, 7), id_from_gram(acc2, 7)
    assert np.array_equal(a.keep, b.keep)
    assert rel(a.T, b.T) < 1e-12 and abs(a.rel_error - b.rel_error) < 1e-12
    d = id_dense(maps, 7)  # the dense route reshapes (N, C, H, W) the same way
    assert np.array_equal(a.keep, d.keep) and rel(a.T, d.T) < 1e-6
    # float32 and channels_last batches give the same G as float64
    acc32 = GramAccumulator(C)
    acc32.update(maps.float().contiguous(memory_format=torch.channels_last))
    # float32 inputs are rounded at 6e-8 relative: compare normwise, not entry by entry
    assert np.abs(acc32.G - acc4.G).max() <= 1e-6 * np.abs(acc4.G).max()


def test_other_layouts_need_channel_dim():
    acc = GramAccumulator(6)
    x = torch.randn(4, 5, 6)  # (B, L, C), e.g. a transformer
    with pytest.raises(ValueError, match="channel_dim"):
        acc.update(x)
    acc.update(x, channel_dim=-1)
    ref = x.reshape(-1, 6).double()
    np.testing.assert_allclose(acc.G, (ref.T @ ref).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="expected 6"):
        acc.update(torch.randn(3, 7))


def test_interp_decomp_same_kept_set_and_T():
    for seed, (N, n, k) in enumerate([(300, 20, 6), (1000, 64, 8), (200, 33, 20)]):
        Z = decaying(N, n, seed=100 + seed, decay=0.75)
        idx, proj = sli.interp_decomp(Z, k, rand=False)  # Z[:, idx[k:]] ~= Z[:, idx[:k]] @ proj
        res = id_from_gram(stream(Z), k)
        assert set(res.keep.tolist()) == set(idx[:k].tolist())
        T_ref = np.zeros((k, n))
        T_ref[:, idx[:k]] = np.eye(k)
        T_ref[:, idx[k:]] = proj
        T_ref = T_ref[np.argsort(idx[:k])]  # rows ordered like the sorted keep
        assert rel(res.T, T_ref) < 1e-6
        assert abs(rel_error_of(Z, idx[:k][np.argsort(idx[:k])], T_ref) - res.rel_error) <= 1e-6 * res.rel_error


def test_k_equals_n_gives_identity():
    Z = decaying(400, 12, seed=7)
    for res in (id_from_gram(stream(Z), 12), id_dense(Z, 12)):
        assert np.array_equal(res.keep, np.arange(12))
        assert np.array_equal(res.T, np.eye(12))
        assert res.rel_error == 0.0


def test_exact_rank():
    rng = np.random.default_rng(11)
    m, r, n = 400, 6, 40
    Z = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    acc = stream(Z)
    res = id_from_gram(acc, r)
    assert res.rank == r
    assert rel_error_of(Z, res.keep, res.T) < 1e-9
    assert res.rel_error == 0.0
    assert id_from_gram(acc, tol=1e-8).k == r
    assert id_from_gram(acc, tol=0.0).k == r
    assert res.errors[r - 1] == 0.0 and res.errors[r - 2] > 1e-3
    below = id_from_gram(acc, r - 1)
    assert below.rel_error > 1e-3  # rank r - 1 is a real loss
    # k > rank: finite T, still an exact reconstruction
    more = id_from_gram(acc, r + 5)
    check_structure(more, n, r + 5)
    assert rel_error_of(Z, more.keep, more.T) < 1e-9


def test_dead_and_duplicated_channels():
    rng = np.random.default_rng(5)
    n = 10
    Z = rng.standard_normal((200, n)) * np.linspace(1.0, 2.0, n)
    dead = [0, 4]
    Z[:, dead] = 0.0
    Z[:, 7] = Z[:, 2]  # duplicate
    Z[:, 9] = 3.0 * Z[:, 1] - Z[:, 5]  # exact linear combination
    live_rank = n - 4
    acc = stream(Z)
    seen = []
    for k in range(1, n + 1):
        res = id_from_gram(acc, k)
        check_structure(res, n, k)
        assert res.rank == live_rank
        kept_dead = set(res.keep.tolist()) & set(dead)
        assert len(kept_dead) <= max(0, k - (n - len(dead))), f"dead channel kept before a live one at k={k}"
        for c in set(dead) - set(res.keep.tolist()):
            assert np.all(res.T[:, c] == 0.0), "a dead channel that is not kept gets T column 0"
        if k >= live_rank:
            assert res.rel_error == 0.0
            assert rel_error_of(Z, res.keep, res.T) < 1e-12
        else:
            assert abs(rel_error_of(Z, res.keep, res.T) - res.rel_error) < 1e-8
        seen.append(res.keep)
    # pivots beyond the rank: live dependents (by energy) first, dead channels last in index order
    piv = id_from_gram(acc, 1).pivots
    assert piv[-2:].tolist() == dead
    assert set(piv[:live_rank].tolist()).isdisjoint(dead)
    # the kept sets are nested (prefixes of one pivot order)
    for a, b in itertools.pairwise(seen):
        assert set(a.tolist()) <= set(b.tolist())


def test_all_channels_dead_with_rows():
    res = id_from_gram(np.zeros((5, 5)), 2, rows=10)
    assert res.keep.tolist() == [0, 1] and res.rel_error == 0.0
    assert np.array_equal(res.T, np.eye(5)[:2])


def test_ties_break_to_lowest_index():
    # orthogonal columns of equal norm: every pivot is a tie
    Z = np.kron(np.eye(6), np.ones((3, 1)))
    res = id_from_gram(Z.T @ Z, 3)
    assert res.keep.tolist() == [0, 1, 2] and res.pivots.tolist() == list(range(6))
    # a relative difference below 1e-12 is still a tie; above it is not
    Z2 = Z.copy()
    Z2[:, 4] *= 1 + 1e-14
    assert id_from_gram(Z2.T @ Z2, 1).keep.tolist() == [0]
    Z2[:, 4] *= 1 + 1e-9
    assert id_from_gram(Z2.T @ Z2, 1).keep.tolist() == [4]
    # deterministic
    Z3 = decaying(100, 9, seed=2)
    a, b = id_from_gram(Z3.T @ Z3, 4), id_from_gram(Z3.T @ Z3, 4)
    assert np.array_equal(a.keep, b.keep) and np.array_equal(a.T, b.T)


def test_tol_picks_smallest_k():
    Z = decaying(800, 30, seed=9, decay=0.6, noise=1e-4)
    ref = spectral_errors(Z)
    acc = stream(Z)
    for k in [1, 3, 8, 15, 22]:
        # a tol strictly between the errors of k - 1 and k
        tol = np.sqrt(ref[k - 1] * ref[k - 2]) if k > 1 else 1.0 + (ref[0] - 1) * 0.5
        res = id_from_gram(acc, tol=tol)
        assert res.k == k, (k, res.k, tol)
        assert res.rel_error <= tol
        assert abs(res.rel_error - ref[k - 1]) <= 1e-6 * ref[k - 1]
        assert res.errors[k - 1] >= res.rel_error


def test_bad_input_raises():
    acc = GramAccumulator(4)
    x = torch.randn(10, 4)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        acc.update(x)
    x[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"channel\(s\) \[2\]"):
        acc.update(x.reshape(10, 4))
    assert acc.rows == 0  # a rejected batch is not counted
    # empty: nothing seen, or only 0-row batches
    with pytest.raises(ValueError, match="no calibration rows"):
        id_from_gram(acc, 2)
    acc.update(torch.zeros(0, 4))
    acc.update(torch.zeros(0, 4, 3, 3))
    with pytest.raises(ValueError, match="no calibration rows"):
        id_from_gram(acc, 2)
    with pytest.raises(ValueError, match="no calibration rows"):
        id_from_gram(np.zeros((4, 4)), 2)
    assert isinstance(pytest.raises(ValueError, id_from_gram, acc, 2).value, DataError)
    G = np.eye(4)
    with pytest.raises(ValueError, match="exactly one"):
        id_from_gram(G)
    with pytest.raises(ValueError, match="exactly one"):
        id_from_gram(G, 2, tol=0.1)
    for k in (0, 5, 1.5):
        with pytest.raises(ValueError, match="k must"):
            id_from_gram(G, k)
    with pytest.raises(ValueError, match="NaN"):
        id_from_gram(np.full((3, 3), np.nan), 1)
    with pytest.raises(ValueError, match="overflow"):
        acc.update(torch.full((2, 4), 1e200, dtype=torch.float64))
    # check_finite=False skips the test (the caller takes responsibility)
    GramAccumulator(4, check_finite=False).update(torch.full((2, 4), float("nan")))


def test_accepts_torch_gram_and_numpy_batches():
    Z = decaying(300, 16, seed=4)
    a = id_from_gram(torch.from_numpy(Z.T @ Z).float().double(), 5)
    acc = GramAccumulator(16)
    acc.update(Z)  # numpy batch
    b = id_from_gram(acc.G, 5)
    assert np.array_equal(a.keep, b.keep)


def test_allreduce_noop_without_process_group():
    Z = decaying(200, 8, seed=1)
    acc = stream(Z)
    G0 = acc.G
    acc.allreduce()  # no process group initialized: no-op
    assert acc.rows == 200 and np.array_equal(acc.G, G0)
    acc.update(torch.from_numpy(Z))  # still open for updates
    assert acc.rows == 400


_DIST_SCRIPT = """
import sys
import numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {root!r})
try:
    from fxprune.passes._id_math import GramAccumulator
except ImportError:
    from passes._id_math import GramAccumulator

def worker(rank, world, path, Z, out):
    dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=world)
    acc = GramAccumulator(Z.shape[1])
    acc.update(torch.from_numpy(np.array_split(Z, world)[rank]))  # each process sees its own shard
    acc.allreduce()
    try:
        acc.update(torch.from_numpy(Z))
        raise AssertionError("update after allreduce must raise")
    except RuntimeError:
        pass
    if rank == 0:
        np.save(out, np.concatenate([[acc.rows], acc.G.ravel()]))
    dist.destroy_process_group()

if __name__ == "__main__":
    Z = np.load(sys.argv[1])
    mp.start_processes(worker, args=(2, sys.argv[2], Z, sys.argv[3]), nprocs=2, start_method="fork")
"""


def test_allreduce_two_processes(tmp_path):
    """Two gloo processes, each with half the rows, reduce to the G and row count of all rows. Runs in a fresh
    interpreter: forking a process that already holds gloo or thread-pool state can deadlock."""
    import subprocess

    Z = decaying(301, 6, seed=8)
    np.save(tmp_path / "z.npy", Z)
    script = tmp_path / "dist_gram.py"
    script.write_text(_DIST_SCRIPT.format(root=str(Path(__file__).resolve().parents[1])))
    out = tmp_path / "g.npy"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "z.npy"), str(tmp_path / "store"), str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    v = np.load(out)
    assert int(v[0]) == 301
    np.testing.assert_allclose(v[1:].reshape(6, 6), Z.T @ Z, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# properties


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), extra=st.integers(0, 30), data=st.data())
def test_property_well_conditioned(seed, n, extra, data):
    rng = np.random.default_rng(seed)
    m = n + extra
    Z = rng.standard_normal((m, n)) * rng.uniform(0.3, 3.0, size=n)
    k = data.draw(st.integers(1, n), label="k")
    res = id_from_gram(stream(Z, nbatches=min(3, m)), k)
    check_structure(res, n, k)
    if np.linalg.cond(Z) < 1e3:
        measured = rel_error_of(Z, res.keep, res.T)
        assert abs(measured - res.rel_error) <= 1e-6 * max(measured, 1e-300) + (1e-14 if k == n else 0)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    Z=hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 8)), elements=st.integers(-3, 3).map(float)),
    data=st.data(),
)
def test_property_degenerate_small_integers(Z, data):
    """Integer data: exact ties, dead and duplicated columns, rank deficiency. Structure must always hold."""
    m, n = Z.shape
    k = data.draw(st.integers(1, n), label="k")
    if not np.any(Z):
        with pytest.raises(ValueError, match="no calibration rows"):
            id_from_gram(Z.T @ Z, k)
        res = id_from_gram(Z.T @ Z, k, rows=m)
    else:
        res = id_from_gram(stream(Z, nbatches=min(2, m)), k)
    check_structure(res, n, k)
    assert 0.0 <= res.rel_error <= 1.0 + 1e-12
    measured = rel_error_of(Z, res.keep, res.T)
    # within the Gram route's resolution (~sqrt(n * eps)) of the reported error
    assert abs(measured - res.rel_error) <= 1e-6
    # dead channels are never kept while a live channel is left out
    dead = ~np.any(Z, axis=0)
    if np.any(dead[res.keep]):
        assert np.all(np.isin(np.flatnonzero(~dead), res.keep))
    # determinism: a second run gives the same bits
    res2 = id_from_gram(Z.T @ Z, k, rows=m)
    assert np.array_equal(res.keep, res2.keep)
