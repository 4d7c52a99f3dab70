"""Channel maps and the node helpers (shapes, op names) the channel rules use.

A channel map (``CMap``) describes one tensor: the dim that carries channels and, per position along it, an
element id (union-find over ids gives the coupled channels) and a tag (the spatial sub-position once C*H*W
features are flattened). A *head map* describes a tensor whose channel dim was split into (heads, head_dim) by a
view: ``dim`` is then the heads dim and each position along it is a whole head of ``unit`` channels
(``ids[h * unit:(h + 1) * unit]``); ``sub`` is the dim that holds the positions within a head (None once it was
contracted away, as in attention scores). Positions within a head are not tracked one by one: heads are kept or
removed whole (a unit constraint), so ops that act inside a head (RoPE's slices, q.k^T over head_dim) are safe. Shapes come from the fake tensors torch.export records (``node.meta["val"]``); a
symbolic size (the batch) becomes a ``SymSize``: a large odd int that never equals a channel width, printed as
``B`` so messages never show the stand-in number.

Example::

    shape_of(node)        # [B, 17, 64]: a list of ints, the batch a SymSize
    CMap(1, ids, tags)    # channels in dim 1
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

BATCH_STANDIN = 1_000_003  # odd and large: a symbolic size never equals (or divides into) a channel width


@dataclass
class CMap:
    """Channel map of one tensor: which dim carries channels, and the element id at each position."""
    dim: int
    ids: np.ndarray
    tags: np.ndarray
    unit: int = 1            # channels per position along dim: > 1 for a head map (head_dim)
    sub: int | None = None   # head maps: the dim holding the positions within a head, when there is one

    @property
    def heads(self) -> bool:
        """Whether this is a head map (positions along ``dim`` are heads of ``unit`` channels)."""
        return self.unit > 1 or self.sub is not None

    @property
    def size(self) -> int:
        """The number of positions along ``dim`` (heads for a head map)."""
        return len(self.ids) // self.unit

    def per_head(self) -> np.ndarray:
        """The ids as (positions along dim, unit)."""
        return self.ids.reshape(self.size, self.unit)

    def reps(self) -> np.ndarray:
        """One id per position: each head's first channel (what a per-head scalar couples to)."""
        return self.per_head()[:, 0]

    def with_dim(self, dim: int, sub: int | None = None) -> "CMap":
        """The same channels with the channel (heads) dim moved to ``dim`` (and a head map's sub dim to ``sub``)."""
        return CMap(dim, self.ids, self.tags, self.unit, sub)


class SymSize(int):
    """A symbolic dim size: behaves as its stand-in int in arithmetic, prints as its symbol ('B', '2*B')."""

    def __new__(cls, value: int, text: str = "B"):
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__

    def __reduce__(self):
        return SymSize, (int(self), self.text)


def concrete(size) -> int:
    """A dim size as an int; a symbolic size becomes a SymSize (odd stand-ins from BATCH_STANDIN, printed with
    the batch symbol B, B2, ...)."""
    if isinstance(size, int):
        return size
    try:
        return _symbolic(size.node.expr)
    except Exception:  # noqa: BLE001
        return SymSize(BATCH_STANDIN)


_SYMBOLS: dict[str, int] = {}  # symbol name -> its index, first seen first: one stand-in per symbol per process


@functools.lru_cache(maxsize=1024)
def _symbolic(expr) -> SymSize:
    # Each symbol keeps one stand-in everywhere (the batch B and a sequence length S are different numbers), so
    # [B*S, C] -> [B, S, C] compares equal products, and never equal sizes of different symbols.
    import sympy
    index = {s: _SYMBOLS.setdefault(str(s), len(_SYMBOLS)) for s in expr.free_symbols}
    value = int(expr.subs({s: BATCH_STANDIN + 2 * i for s, i in index.items()}))
    syms = sorted(expr.free_symbols, key=str)  # printed B, B2, ... within the expression (values stay global)
    text = str(expr.subs({s: sympy.Symbol("B" if i == 0 else f"B{i + 1}") for i, s in enumerate(syms)}))
    return SymSize(value, text)


def shape_of(node) -> list[int] | None:
    """The shape of a node's tensor value (symbolic sizes as SymSize), or None when it is not one tensor."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return [concrete(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def prod(xs) -> int:
    return math.prod(xs) if xs else 1


def op_name(target) -> str:
    """'aten.relu' for torch.ops.aten.relu.default; '_operator.getitem' for operator.getitem."""
    if hasattr(target, "overloadpacket"):
        return f"aten.{target.overloadpacket.__name__}" if target.namespace == "aten" else str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', str(target))}"
