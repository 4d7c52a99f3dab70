"""ID for groups whose channels move in whole units (attention heads: ``Group.unit_of``).

A head is head_dim columns of Z that are kept or removed together, so the pivots are heads, not columns: a
greedy block-pivoted Cholesky of the Gram matrix G = Z^T Z picks, at every step, the head whose columns keep the
most energy after projecting out the heads already picked (the residual Gram's trace over the head), then takes
that head's Schur complement. With one column per unit this is the ordinary pivoted Cholesky (the column-pivoted
QR's pivots). The kept heads' columns then give T by least squares (Z ~ Z[:, keep] @ T), like any selection.
With blocks as well (every block keeps the same count), heads are picked per block.
"""

from __future__ import annotations

import numpy as np


def unit_order(G: np.ndarray, unit_of: np.ndarray, n_units: int | None = None) -> np.ndarray:
    """Units in the greedy block-pivoted Cholesky order (the first ``n_units``, default all), as a list of unit
    labels of ``unit_of``."""
    labels = np.unique(unit_of)
    members = {u: np.flatnonzero(unit_of == u) for u in labels.tolist()}
    n_units = len(labels) if n_units is None else n_units
    S = np.array(G, dtype=np.float64, copy=True)
    scale = max(float(np.trace(S)) / max(len(S), 1), 1e-300)
    left, order = list(members), []
    for _ in range(n_units):
        energy = [float(np.trace(S[np.ix_(members[u], members[u])])) for u in left]
        u = left.pop(int(np.argmax(energy)))
        order.append(u)
        P = members[u]
        Spp = S[np.ix_(P, P)] + 1e-12 * scale * np.eye(len(P))
        S -= S[:, P] @ np.linalg.solve(Spp, S[P, :])
    return np.array(order, dtype=np.int64)


def unit_pivots(G: np.ndarray, unit_of: np.ndarray, k: int, block_of: np.ndarray | None = None) -> np.ndarray:
    """Sorted column indices of the k columns kept: whole units, k / unit size of them rounded up (a k chosen by
    an error tolerance keeps the unit it reaches into), per block with blocks."""
    size = len(unit_of) // len(np.unique(unit_of))
    if block_of is None:
        return np.sort(np.flatnonzero(np.isin(unit_of, unit_order(G, unit_of, max(1, -(-k // size))))))
    blocks = np.unique(block_of)
    picks = []
    for b in blocks.tolist():
        m = np.flatnonzero(block_of == b)
        local = unit_pivots(G[np.ix_(m, m)], unit_of[m], k // len(blocks))
        picks.append(m[local])
    return np.sort(np.concatenate(picks))


def channel_order(G: np.ndarray, unit_of: np.ndarray) -> np.ndarray:
    """Columns with whole units in greedy order (each unit's columns together): an error curve read at
    multiples of the unit size is the residual of keeping the first units."""
    return np.concatenate([np.flatnonzero(unit_of == u) for u in unit_order(G, unit_of).tolist()])
