"""Numerical kernel of interpolative-decomposition (ID) pruning (Chee, Renz, Damle, De Sa, arXiv 2108.00065).

Pure math, no graph or module code. The compiler feeds activation batches of one channel group to a
:class:`GramAccumulator`, then asks :func:`id_from_gram` for the channels to keep and the reconstruction matrix.

Conventions
-----------
Z is the activation matrix of one channel group: rows = samples (x spatial positions for convs), columns = the n
channels. An ID of rank k is a pair

- ``keep``: k channel indices, **sorted ascending** (not in pivot order; ``IDResult.pivots`` has the pivot order),
- ``T``: a (k, n) float64 matrix whose row i belongs to channel ``keep[i]``,

with ``Z ~= Z[:, keep] @ T`` and ``T[:, keep] == I_k`` exactly. Relative error of rank k:
``||Z - Z[:, keep] @ T||_2 / ||Z||_2 = ||R22||_2 / ||R||_2`` (spectral norms), where Z P = Q R is the column-pivoted
QR of Z and R22 = R[k:, k:].

Route
-----
The Gram matrix G = Z^T Z is accumulated in float64 as batches stream past (memory O(n^2) plus one batch, summable
across processes). Greedy diagonal-pivoted Cholesky of G, P^T G P = R^T R, picks in exact arithmetic the same pivots
as column-pivoted QR of Z (Businger-Golub: the largest remaining column norm is the largest Schur-complement
diagonal) and its factor R is the QR's R up to the signs of its rows. Then T = [I_k, R11^{-1} R12] (triangular solve)
put back in the original column order, and ||R22||_2^2 = lambda_max(S) with the Schur complement
S = G22 - G21 G11^{-1} G12 = G22 - R12^T R12 = R22^T R22.

Accuracy of the Gram route: G carries absolute rounding errors of about eps * ||G||, so relative ID errors below
about sqrt(n * eps) (~1e-7 for n = 64, ~3e-7 for n = 512) are not resolved; the pivots, T and errors above that
level agree with the dense QR: on decaying-spectrum test data the same pivots, T within ~1e-14..1e-9 relative and
rel_error within ~1e-10 relative (tests/test_id_math.py checks 1e-6).

Tie and near-singular rule (deterministic)
------------------------------------------
1. Pivot choice: the channel with the largest remaining Schur-complement diagonal d. Values within a relative 1e-12
   of the maximum count as ties and go to the lowest channel index.
2. Numerical rank r: the greedy stops at the first step whose largest remaining d is <= ``rank_rtol * max(diag G)``
   (default rtol = n * eps, the LAPACK ``?pstrf`` default). Then every remaining channel is a dead channel (all-zero
   activations) or, to working precision, a linear combination of the r pivots. Their Schur diagonals are rounding
   noise (possibly negative), so they are all tied at zero: the remaining n - r pivot positions are filled in order
   of decreasing channel energy diag(G) = ||Z[:, c]||^2 (ties within relative 1e-12 -> lowest index). Dead channels
   (energy exactly 0) therefore come last, in index order, and are never kept before a live channel.
3. k > r: keep = the r numerical pivots plus the next k - r channels of that order. T is the least-squares solution
   that uses only the r independent pivots: rows of the r pivots = R11^{-1} R12 (r x r triangular solve), rows of
   the k - r extra pivots = 0 outside their own identity column. Because the extra kept columns lie in the span of
   the first r, this is a least-squares reconstruction of every column; T stays finite, and a dead channel that is
   not kept gets an all-zero T column.
4. Errors at k >= r are reported as exactly 0 (below the Gram resolution; the true residual is at most about
   sqrt(rank_rtol * (n - r)) relative). So ``tol`` never picks k > r, and ``tol=0`` picks k = r.

The dense reference :func:`id_dense` uses LAPACK ``geqp3`` as is; its tie-breaking is LAPACK's (with norm
downdating), not rule 1, so pivots of the two routes are comparable only on data without (near-)ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import torch

from fxprune.method import CalibrationDataError, GramAccumulator, rows_of

__all__ = [
    "CalibrationDataError",
    "GramAccumulator",
    "IDResult",
    "id_dense",
    "id_from_gram",
    "rel_error_of",
    "rows_of",
]

_TIE_RTOL = 1e-12
_BLOCK = 64


@dataclass
class IDResult:
    """Outcome of an ID of rank k for one channel group.

    keep      -- (k,) int64, sorted ascending, the channels that stay.
    T         -- (k, n) float64, row i belongs to keep[i]; T[:, keep] == I_k exactly; Z ~= Z[:, keep] @ T.
    rel_error -- the spectral relative error ||R22||_2 / ||R||_2 of this k (0 when k >= rank).
    errors    -- (n,) float64, errors[j-1] for rank j = 1..n: the Frobenius version ||R22||_F / ||R||_2, an upper
                 bound of the spectral error (at most sqrt(n - j) times it), non-increasing, 0 for j >= rank.
    rank      -- numerical rank r (Gram route) / min(rows, n) (dense route).
    pivots    -- (n,) int64, all channels in pivot order (keep == sorted(pivots[:k])).
    """

    keep: np.ndarray
    T: np.ndarray
    rel_error: float
    errors: np.ndarray
    rank: int = 0
    pivots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def k(self) -> int:
        return int(self.keep.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Pivoted Cholesky route


def _pick(vals: np.ndarray, avail: np.ndarray) -> int:
    """Index of the largest vals[avail]; values within relative 1e-12 of the max tie -> lowest index."""
    v = np.where(avail, vals, -np.inf)
    m = v.max()
    return int(np.flatnonzero(v >= m - _TIE_RTOL * abs(m))[0])


_DENSE_EIG_MAX = 256  # above this size the largest eigenvalue comes from Lanczos (ARPACK), not a dense eigh


def _lambda_max(S: np.ndarray, R12: np.ndarray | None = None) -> float:
    """Largest eigenvalue of the symmetric S - R12^T R12 (R12 None: of S), to machine precision.

    Small matrices: LAPACK ?syevx for the one eigenvalue. Large ones: ARPACK Lanczos on the operator
    v -> S v - R12^T (R12 v) (no n^2 k product), with a fixed start vector so results are deterministic; falls back
    to the dense route if Lanczos does not converge.
    """
    m = S.shape[0]
    if m == 0:
        return 0.0
    if m > _DENSE_EIG_MAX:
        from scipy.sparse.linalg import (
            ArpackError,
            ArpackNoConvergence,
            LinearOperator,
            eigsh,
        )

        if R12 is None:
            op = S
        else:
            op = LinearOperator((m, m), matvec=lambda v: S @ v - R12.T @ (R12 @ v), dtype=np.float64)
        v0 = np.random.default_rng(20210800065).standard_normal(m)
        try:
            return float(eigsh(op, k=1, which="LA", tol=0, v0=v0, return_eigenvectors=False)[0])
        except (ArpackNoConvergence, ArpackError):
            pass
    if R12 is not None:
        S = S - R12.T @ R12
        S = 0.5 * (S + S.T)
    if m == 1:
        return float(S[0, 0])
    return float(sla.eigh(S, eigvals_only=True, subset_by_index=[m - 1, m - 1], driver="evx",
                          check_finite=False)[0])


def _pivoted_cholesky(G: np.ndarray, thresh: float):
    """Greedy diagonal-pivoted Cholesky of G (blocked: left-looking within a block of _BLOCK pivots, then one
    rank-_BLOCK update of the Schur complement restricted to the channels still unpivoted).

    Returns (R, piv, r, dsum, dmax): R is (r, n) with row j = pivot j, columns in ORIGINAL order (zero at earlier
    pivots); piv the r numerical pivots; dsum[j] / dmax[j] = sum / max of the (clipped) remaining Schur diagonal after
    j pivots, j = 0..r.
    """
    n = G.shape[0]
    d = np.diag(G).copy()  # remaining Schur diagonal, original indexing
    avail = np.ones(n, dtype=bool)
    R = np.zeros((n, n))
    piv: list[int] = []
    dsum = [float(np.clip(d, 0, None).sum())]
    dmax = [float(max(d.max(), 0.0))]
    idx = np.arange(n)  # unpivoted channels at the block start
    S = G.copy()  # Schur complement on idx x idx as of the block start
    pos_of = np.empty(n, dtype=np.int64)
    done = False
    while len(piv) < n and not done:
        m = idx.size
        pos_of[idx] = np.arange(m)
        Rb = np.zeros((min(_BLOCK, m), m))  # this block's rows of R, columns = idx
        openc = np.ones(m, dtype=bool)
        t = 0
        for t in range(Rb.shape[0]):
            p = _pick(d, avail)
            if not d[p] > thresh:
                done = True
                break
            q = pos_of[p]
            rjj = np.sqrt(d[p])
            row = S[q] - Rb[:t, q] @ Rb[:t]
            row /= rjj
            openc[q] = False
            row[~openc] = 0.0
            row[q] = rjj
            Rb[t] = row
            R[len(piv), idx] = row
            d[idx] -= row * row
            d[p] = 0.0
            avail[p] = False
            piv.append(p)
            rem = np.clip(d[avail], 0, None)
            dsum.append(float(rem.sum()))
            dmax.append(float(rem.max()) if rem.size else 0.0)
        else:
            t = Rb.shape[0]
        if done or len(piv) == n:
            break
        B = Rb[:t][:, openc]
        S = S[np.ix_(openc, openc)]
        S -= B.T @ B
        idx = idx[openc]
    r = len(piv)
    return R[:r], np.asarray(piv, dtype=np.int64), r, np.asarray(dsum), np.asarray(dmax)


def _fill_order(energy: np.ndarray, avail: np.ndarray) -> list[int]:
    """Rule 2: remaining channels by decreasing energy, ties (relative 1e-12) -> lowest index."""
    avail = avail.copy()
    out = []
    for _ in range(int(avail.sum())):
        c = _pick(energy, avail)
        out.append(c)
        avail[c] = False
    return out


def _as_gram(G):
    rows = None
    if isinstance(G, GramAccumulator):
        rows = G.rows
        G = G.G
    elif isinstance(G, torch.Tensor):
        G = G.detach().cpu().double().numpy()
    G = np.array(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"id_from_gram: G must be a non-empty square matrix, got shape {G.shape}")
    if not np.all(np.isfinite(G)):
        raise CalibrationDataError("id_from_gram: G contains NaN/inf; calibration activations must be finite")
    return G, rows


def _check_k(k, n, who):
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"{who}: k must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"{who}: k must be in [1, {n}] for {n} channels, got {k}")
    return k


def _assemble(n, keep_piv, R_r, piv_r, r):
    """T (rows in pivot order) from the r-pivot factor; extra pivots (beyond r) get identity rows only."""
    k = len(keep_piv)
    Tp = np.zeros((k, n))
    kept = np.zeros(n, dtype=bool)
    kept[keep_piv] = True
    rest = np.flatnonzero(~kept)
    m = min(k, r)
    if m > 0 and rest.size:
        R11 = R_r[:m][:, piv_r[:m]]
        R12 = R_r[:m][:, rest]
        Tp[:m][:, rest] = sla.solve_triangular(R11, R12, lower=False, check_finite=False)
    Tp[np.arange(k), keep_piv] = 1.0
    order = np.argsort(keep_piv, kind="stable")
    return np.asarray(keep_piv, dtype=np.int64)[order], Tp[order]


def id_from_gram(G, k: int | None = None, *, tol: float | None = None, rows: int | None = None,
                 rank_rtol: float | None = None) -> IDResult:
    """ID of rank k (or the smallest k with spectral relative error <= tol) from the Gram matrix G = Z^T Z.

    G: (n, n) numpy array / torch tensor, or a GramAccumulator (then ``rows`` comes from it). Exactly one of k, tol.
    rows == 0, or G identically zero with rows unknown, raises CalibrationDataError ("no calibration rows").
    With rows > 0 and G == 0 (every channel dead) the rule gives keep = 0..k-1, T = selection, rel_error = 0.
    rank_rtol: numerical-rank threshold relative to max(diag G); default n * eps.
    See the module docstring for the tie / near-singular rule and the accuracy of this route.
    """
    G, acc_rows = _as_gram(G)
    if rows is None:
        rows = acc_rows
    n = G.shape[0]
    if (k is None) == (tol is None):
        raise ValueError("id_from_gram: give exactly one of k and tol")
    if rows is not None and int(rows) == 0:
        raise CalibrationDataError("id_from_gram: no calibration rows (the accumulator saw 0 rows)")
    diag = np.diag(G).copy()
    gmax = float(diag.max())
    if gmax <= 0.0:
        if rows is None and not np.any(G):
            raise CalibrationDataError(
                "id_from_gram: no calibration rows (G is all zero; pass rows= if every channel is truly dead)"
            )
        if gmax < 0.0 or np.any(G):
            raise ValueError("id_from_gram: G is not a Gram matrix (non-positive diagonal)")
    if k is not None:
        k = _check_k(k, n, "id_from_gram")
    else:
        tol = float(tol)
        if not tol >= 0.0:
            raise ValueError(f"id_from_gram: tol must be >= 0, got {tol}")

    G = 0.5 * (G + G.T)
    if rank_rtol is None:
        rank_rtol = n * np.finfo(np.float64).eps
    thresh = float(rank_rtol) * max(gmax, 0.0)
    if gmax > 0.0:
        R_r, piv_r, r, dsum, dmax = _pivoted_cholesky(G, thresh)
        dsum[r] = dmax[r] = 0.0  # rule 4: what is left after the numerical rank counts as zero
        lam_g = max(_lambda_max(G), gmax)  # lambda_max >= max diag; guards rounding
    else:
        R_r, piv_r, r, lam_g = np.zeros((0, n)), np.zeros(0, dtype=np.int64), 0, 1.0
        dsum = dmax = np.zeros(1)

    avail = np.ones(n, dtype=bool)
    avail[piv_r] = False
    pivots = np.concatenate([piv_r, np.asarray(_fill_order(diag, avail), dtype=np.int64)])

    errors = np.zeros(n)
    errors[: r] = np.sqrt(np.clip(dsum[1: r + 1], 0, None) / lam_g)  # errors[r - 1] (k = r) is 0
    errors = np.minimum.accumulate(errors)  # monotone (removes rounding wiggles)

    def spectral(kk: int) -> float:
        if kk >= r:
            return 0.0
        rest = pivots[kk:]
        # lambda_max of the Schur complement S = G22 - R12^T R12 = R22^T R22
        lam = _lambda_max(G[np.ix_(rest, rest)], R_r[:kk][:, rest])
        return float(np.sqrt(max(lam, 0.0) / lam_g))

    if k is None:
        # smallest k with spectral error <= tol. spectral(k) is non-increasing (R22 of k+1 is a submatrix of
        # R22 of k) and sqrt(max remaining diag) <= ||R22||_2 <= ||R22||_F: bound the search, then bisect.
        ok = np.flatnonzero(errors <= tol)
        hi = int(ok[0]) + 1 if ok.size else n  # Frobenius bound <= tol: hi qualifies
        lower = np.sqrt(dmax[1: hi] / lam_g)  # lower[kk - 1] <= spectral(kk) for kk = 1..hi-1
        fail = np.flatnonzero(lower > tol * (1 + 1e-12))
        lo = int(fail[-1]) + 2 if fail.size else 1  # every kk <= fail[-1] + 1 has spectral(kk) > tol
        cache: dict[int, float] = {}
        while lo < hi:
            mid = (lo + hi) // 2
            cache[mid] = spectral(mid)
            if cache[mid] <= tol:
                hi = mid
            else:
                lo = mid + 1
        k = hi
        rel = cache[k] if k in cache else spectral(k)
    else:
        rel = spectral(k)

    keep, T = _assemble(n, pivots[:k], R_r, piv_r, r)
    return IDResult(keep=keep, T=T, rel_error=rel, errors=errors, rank=r, pivots=pivots)


# ----------------------------------------------------------------------------------------------------------------
# Dense reference and helpers


def _rows_np(Z) -> np.ndarray:
    if isinstance(Z, torch.Tensor):
        Z = rows_of(Z).detach().cpu().double().numpy()
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim == 4:
        Z = Z.transpose(0, 2, 3, 1).reshape(-1, Z.shape[1])
    if Z.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, channels) matrix or (N, C, H, W) maps, got shape {Z.shape}")
    return Z


def id_dense(Z, k: int) -> IDResult:
    """Dense reference ID (tests and benchmarks only): column-pivoted QR of the full Z in float64.

    The same LAPACK geqp3 call as scipy.linalg.qr(Z, pivoting=True, mode='economic') (made through mode='raw' so Q
    is never formed). LAPACK breaks pivot ties its own way. T = [I, R11^{-1} R12] by triangular solve (least squares
    if R11 is singular); rel_error = ||R22||_2 / ||R||_2; errors = Frobenius versions for every k, not clamped.
    """
    Z = _rows_np(Z)
    m, n = Z.shape
    k = _check_k(k, n, "id_dense")
    if m == 0:
        raise CalibrationDataError("id_dense: no calibration rows")
    _raw, R, P = sla.qr(Z, pivoting=True, mode="raw", check_finite=True)  # R: (min(m, n), n)
    del _raw
    K = min(m, n)
    P = P.astype(np.int64)
    nrm = np.linalg.norm(R, 2) if R.size else 0.0
    R22 = R[k:, k:]
    rel = float(np.linalg.norm(R22, 2) / nrm) if (R22.size and nrm > 0) else 0.0
    rowsq = np.concatenate([(R * R).sum(axis=1), np.zeros(n - K)])  # ||R[i, :]||^2 = ||R[i, i:]||^2
    tail = np.concatenate([np.cumsum(rowsq[::-1])[::-1], [0.0]])  # tail[k] = ||R[k:, k:]||_F^2
    errors = np.sqrt(tail[1:]) / nrm if nrm > 0 else np.zeros(n)
    keep_piv = P[:k]
    Tp = np.zeros((k, n))
    if k < n:
        Rk = np.zeros((k, n))
        Rk[: min(k, K)] = R[: min(k, K)]
        R11, R12 = Rk[:, :k], Rk[:, k:]
        with np.errstate(all="ignore"):
            try:
                X = sla.solve_triangular(R11, R12, lower=False, check_finite=False)
            except np.linalg.LinAlgError:
                X = np.full_like(R12, np.nan)
        if not np.all(np.isfinite(X)):
            X = np.linalg.lstsq(R11, R12, rcond=None)[0]
        Tp[:, P[k:]] = X
    Tp[np.arange(k), keep_piv] = 1.0
    order = np.argsort(keep_piv, kind="stable")
    return IDResult(keep=keep_piv[order], T=Tp[order], rel_error=rel, errors=errors, rank=K, pivots=P)


def rel_error_of(Z, keep, T) -> float:
    """||Z - Z[:, keep] @ T||_2 / ||Z||_2 in float64 (0 for Z == 0). Accepts (N, n) or (N, C, H, W)."""
    Z = _rows_np(Z)
    keep = np.asarray(keep, dtype=np.int64)
    T = np.asarray(T, dtype=np.float64)
    nz = np.linalg.norm(Z, 2)
    if nz == 0:
        return 0.0
    return float(np.linalg.norm(Z - Z[:, keep] @ T, 2) / nz)
