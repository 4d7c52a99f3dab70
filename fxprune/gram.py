"""Streaming Gram matrices of activations: G = Z^T Z in float64, accumulated batch by batch (O(n^2) memory) and
summable across processes. ID pivots on them; least-squares reconstruction solves with them.

Example::

    acc = GramAccumulator(64)
    for z in batches_of_activations:      # (N, 64) rows or (N, 64, H, W) conv maps
        acc.update(z)
    G = acc.allreduce().G                 # numpy float64, 64 x 64
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError


class CalibrationDataError(DataError, ValueError):
    """Calibration activations are empty, malformed or not finite (a ValueError and an fxprune DataError)."""


# ----------------------------------------------------------------------------------------------------------------
# Streaming Gram accumulation


def rows_of(Z, channel_dim: int | None = None) -> torch.Tensor:
    """View activations as a (rows, channels) matrix.

    2-D (N, n): as is. 4-D conv maps (N, C, H, W): channels are dim 1, rows are (N, H, W) -> (N*H*W, C).
    Other ranks need ``channel_dim``; that dim becomes the columns and all others are flattened into rows.
    Returns a tensor (a view where possible, else one copy of this batch); dtype unchanged.
    """
    V = _channels_last(Z, channel_dim)
    return V.reshape(-1, V.shape[-1])


def _channels_last(Z, channel_dim: int | None = None) -> torch.Tensor:
    """A view of Z with the channel dim moved last (see rows_of for the layout rules)."""
    if not isinstance(Z, torch.Tensor):
        Z = torch.as_tensor(np.asarray(Z))
    if Z.is_complex():
        raise CalibrationDataError(f"activations must be real, got dtype {Z.dtype}")
    if channel_dim is None:
        if Z.dim() in (2, 4):
            channel_dim = 1
        else:
            raise CalibrationDataError(
                f"activations of shape {tuple(Z.shape)}: expected (N, n) rows or (N, C, H, W) conv maps; "
                "for other layouts pass channel_dim"
            )
    if Z.dim() < 2:
        raise CalibrationDataError(f"activations of shape {tuple(Z.shape)}: need at least 2 dimensions")
    return Z.movedim(channel_dim % Z.dim(), -1)


class GramAccumulator:
    """Accumulates G = Z^T Z (float64) and the row count from batches of activations of one n-channel group.

    Memory: the n x n float64 G plus one float64 copy of the current batch. G lives on the device of the first
    batch (or ``device``) so GPU activations are reduced where they are.

    update(Z)     -- add a batch: (N, n) rows, or (N, C, H, W) conv maps (-> (N*H*W, C) rows), any real dtype.
    rows          -- number of rows seen so far (after allreduce: across all processes).
    G             -- the accumulated Gram matrix as a float64 numpy array (a copy).
    allreduce()   -- sum G and rows over torch.distributed processes when a process group is initialized; no-op
                     otherwise. Call it once, after the last update.
    check_finite  -- when True (default) a batch with NaN or inf raises CalibrationDataError (a ValueError).
    """

    def __init__(self, n: int, *, check_finite: bool = True, device=None):
        n = int(n)
        if n < 1:
            raise ValueError(f"GramAccumulator: n must be >= 1, got {n}")
        self.n = n
        self.check_finite = bool(check_finite)
        self.rows = 0
        self._device = None if device is None else torch.device(device)
        self._G: torch.Tensor | None = None
        self._reduced = False

    def _ensure(self, device) -> torch.Tensor:
        if self._G is None:
            dev = self._device if self._device is not None else device
            self._G = torch.zeros(self.n, self.n, dtype=torch.float64, device=dev)
        return self._G

    @torch.no_grad()
    def update(self, Z, *, channel_dim: int | None = None) -> GramAccumulator:
        if self._reduced:
            raise RuntimeError("GramAccumulator.update after allreduce(): the reduced sum would count rows twice")
        V = _channels_last(Z, channel_dim)  # a view
        if V.shape[-1] != self.n:
            raise CalibrationDataError(
                f"GramAccumulator.update: batch has {V.shape[-1]} channels (shape {tuple(V.shape)}), "
                f"expected {self.n}"
            )
        G = self._ensure(V.device)
        if V.numel() == 0:
            return self
        if V.dtype == torch.float64 and V.device == G.device and V.is_contiguous():
            X = V.reshape(-1, self.n)  # no copy
        else:  # exactly one float64 copy of the batch, already in (rows, channels) layout
            X = torch.empty(V.shape, dtype=torch.float64, device=G.device)
            X.copy_(V)
            X = X.view(-1, self.n)
        B = X.T @ X
        # a NaN/inf anywhere in column c makes B[c, c] non-finite: check n values, not the whole batch
        if self.check_finite and not bool(torch.isfinite(B.diagonal()).all()):
            bad = ~torch.isfinite(X)
            nbad = int(bad.sum())
            if nbad:
                chans = torch.nonzero(bad.any(dim=0)).flatten().tolist()
                what = f"{nbad} NaN/inf activation value(s)"
            else:  # finite values whose squares overflow float64
                chans = torch.nonzero(~torch.isfinite(B.diagonal())).flatten().tolist()
                what = "activation values so large that their squares overflow float64"
            shown = ", ".join(map(str, chans[:10])) + (" ..." if len(chans) > 10 else "")
            raise CalibrationDataError(
                f"GramAccumulator.update: batch contains {what} in channel(s) [{shown}] of {self.n}; "
                "calibration activations must be finite (check the model and the input data)"
            )
        G.add_(B)
        self.rows += int(X.shape[0])
        return self

    @property
    def G(self) -> np.ndarray:
        if self._G is None:
            return np.zeros((self.n, self.n))
        return self._G.detach().cpu().numpy().copy()

    @torch.no_grad()
    def allreduce(self, group=None) -> GramAccumulator:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._reduced:
            raise RuntimeError("GramAccumulator.allreduce called twice: G would be summed twice")
        G = self._ensure(self._device or torch.device("cpu"))
        buf = torch.empty(self.n * self.n + 1, dtype=torch.float64, device=G.device)
        buf[:-1] = G.reshape(-1)
        buf[-1] = float(self.rows)
        if group is None:  # the checked collective: ranks about to sum other sizes raise a clear error
            from . import distributed
            buf = distributed.allreduce_sum(buf, "a Gram matrix")
        else:
            dev = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend(group) == "nccl" and buf.device.type != "cuda" else buf.device
            buf = buf.to(dev)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        G.copy_(buf[:-1].reshape(self.n, self.n).to(G.device))
        self.rows = round(float(buf[-1].item()))
        self._reduced = True
        return self
