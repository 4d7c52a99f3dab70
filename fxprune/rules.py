"""The channel rules the op handlers in ops.py name. Each takes (analysis, node) and returns the node's channel
map: a CMap, a list of them for multi-output ops, or None when no tracked channel flows out."""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from .cmap import CMap, op_name, prod, shape_of


def _arg(node: Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _multi(node: Node, cm):
    val = node.meta.get("val")
    return [cm] * len(val) if isinstance(val, (tuple, list)) else cm


def _is_tensor(a) -> bool:
    return isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _fixed(an, n: int, node: Node) -> CMap:
    return CMap(0, an.uf.fresh(n, frozen=f"fixed-width input of '{node.name}'"), np.zeros(n, dtype=np.int64))


def _fresh(an, n: int, dim: int, frozen: str | None = None) -> CMap:
    return CMap(dim, an.uf.fresh(n, frozen=frozen), np.zeros(n, dtype=np.int64))


def nothing(an, node):
    return None


def passthrough(an, node):
    skip = an.handler(node).dtype_only_args
    others = [a for i, a in enumerate(node.args) if i > 0 and i not in skip and _is_tensor(a)]
    others += [a for a in node.kwargs.values() if _is_tensor(a)]
    if others:
        return join(an, node, [node.args[0], *others])  # e.g. clamp(a, max=b), a ** b: element-wise in both
    return an.cmap(node.args[0])


def pool(an, node):
    cm = an.cmap(node.args[0])
    if cm is not None and cm.dim != 1:
        return an.barrier(node, "pooling over the channel dim")
    return _multi(node, cm)


def join(an, node, inputs=None):
    """Element-wise with broadcasting: every input that spans the channel dim holds the SAME channels."""
    inputs = [a for a in (inputs if inputs is not None else list(node.args)) if isinstance(a, Node)]
    out = shape_of(node)
    tracked = [(a, an.cmap(a)) for a in inputs if an.cmap(a) is not None]
    if not tracked or out is None:
        return None
    aligned = {cm.dim + len(out) - len(shape_of(a)) for a, cm in tracked}
    if len(aligned) != 1:
        return an.barrier(node, "inputs carry channels in different dims")
    d = aligned.pop()
    first = tracked[0][1]
    for a, cm in tracked[1:]:
        if len(cm.ids) != len(first.ids) or not np.array_equal(cm.tags, first.tags):
            return an.barrier(node, "inputs carry channels of different layouts")
        an.uf.union(first.ids, cm.ids)
    for a in inputs:
        if an.cmap(a) is not None:
            continue
        shape = shape_of(a)
        di = d - (len(out) - len(shape)) if shape is not None else -1
        if shape is None or di < 0 or shape[di] == 1:
            continue  # broadcast along the channel dim: no coupling
        if an.param_fqn(a) is not None and np.all(first.tags == 0):
            an.slot(node, a, di, "member", first)
        else:
            an.uf.freeze(first.ids, f"combined element-wise with untracked tensor '{a.name}' at node '{node.name}'")
    return CMap(d, first.ids, first.tags)


def computed_weight(an, node, w, out_size: int, out_dim: int) -> CMap:
    """A conv/linear whose weight is not a parameter but computed in forward (weight_norm or spectral_norm
    parametrizations, weight standardization, a merged adapter): slicing the parameters it is computed from
    would not slice the result the same way, so the op's input and output channels are frozen."""
    how = f"by {op_name(w.target)}" if isinstance(w, Node) and w.op == "call_function" else "outside the graph"
    params = an.params_feeding(w)
    if params:
        how += f" from {', '.join(params[:3])}" + (" ..." if len(params) > 3 else "")
    why = (f"the weight of {op_name(node.target)} is computed in forward ({how}: a parametrization such as "
           "weight_norm/spectral_norm, weight standardization or a merged adapter); fxprune slices only "
           "parameters an op reads directly")
    an.barrier(node, why)
    return _fresh(an, out_size, out_dim, frozen=an.where_text(node, why))


def conv(an, node, transposed: bool | None):
    """Convolution; ``transposed`` None reads the flag from aten.convolution's own arguments."""
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    if transposed is None:
        transposed, groups = bool(node.args[6]), node.args[8]
    else:
        groups = _arg(node, 6, "groups", 1)
    cm = an.cmap(x)
    if cm is not None and cm.dim != 1:
        return an.barrier(node, "convolution over a tensor whose channels are not in dim 1")
    cin, cout = shape_of(x)[1], shape_of(node)[1]
    if not an.is_weight(w):
        return computed_weight(an, node, w, cout, 1)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)  # transposed weights are (in, out / groups, ...)
    if groups == 1:
        # an untracked input still gets a (frozen) slot, so a weight shared with a tracked use stays whole
        an.slot(node, w, in_dim, "in", cm if cm is not None else _fixed(an, cin, node))
        out = an.slot(node, w, out_dim, "out", None)
        an.member(node, b, 0, out, "bias")
        return CMap(1, out.ids, np.zeros(len(out.ids), dtype=np.int64))
    if groups == cin == cout:  # depthwise: channel c in -> channel c out (weight (C, 1, ...) either way)
        if cm is None:
            return None
        an.slot(node, w, 0, "member", cm)
        an.member(node, b, 0, cm, "bias")
        return cm
    if transposed or cin % groups or cout % groups:
        why = an.where_text(node, f"transposed grouped convolution (groups={groups}) is not supported")
        if cm is not None:
            an.uf.freeze(cm.ids, why)
        return _fresh(an, cout, 1, frozen=why)
    # grouped: input and output channels stay in their conv group, so each group's blocks shrink equally
    where = f"grouped convolution '{node.name}' (groups={groups})"
    if cm is not None:
        an.slot(node, w, 1, "grouped_in", cm, foldable=False)
        an.block_constraints.append((cm.ids, groups, where))
    out = an.slot(node, w, 0, "out", None)
    an.member(node, b, 0, out, "bias")
    an.block_constraints.append((out.ids, groups, where))
    return CMap(1, out.ids, np.zeros(cout, dtype=np.int64))


def _product(an, node, x, w, w_in: int, w_out: int, bias=None):
    """y = x @ W (+ bias) over x's last dim, W a parameter with its input dim ``w_in``, output dim ``w_out``."""
    cm = an.cmap(x)
    rank = len(shape_of(node))
    if cm is not None and cm.dim != len(shape_of(x)) - 1:
        return cm  # the map acts on another dim; channels pass through untouched
    an.slot(node, w, w_in, "in", cm if cm is not None else _fixed(an, shape_of(x)[-1], node))
    out = an.slot(node, w, w_out, "out", None)
    if bias is not None:
        bshape = shape_of(bias)
        if bshape is not None and bshape and bshape[-1] != 1:
            an.member(node, bias, len(bshape) - 1, out, "bias")
    return CMap(rank - 1, out.ids, np.zeros(len(out.ids), dtype=np.int64))


def linear(an, node):
    x, w = node.args[0], node.args[1]
    if not an.is_weight(w):
        return computed_weight(an, node, w, shape_of(node)[-1], len(shape_of(node)) - 1)
    return _product(an, node, x, w, 1, 0, _arg(node, 2, "bias"))


def matmul(an, node, data: int, weight: int, bias: int | None = None):
    """x @ W with W a 2-d parameter (mm, matmul, and addmm(bias, x, W) as GPT-2's Conv1D exports): a producer
    of W's dim 1 and a consumer of x's last dim. A product of two untracked tensors (an adapter's B @ A) carries
    no channels; any other operand is a barrier."""
    x, w = node.args[data], node.args[weight]
    wshape = shape_of(w)
    if an.is_weight(w) and wshape is not None and len(wshape) == 2 and not an.is_weight(x) \
            and len(shape_of(x) or ()) >= 2:
        return _product(an, node, x, w, 0, 1, node.args[bias] if bias is not None else None)
    if an.cmap(x) is None and an.cmap(w) is None:
        return None
    return an.barrier(node, f"{op_name(node.target)} is a matrix product with a non-parameter operand")


def batch_norm(an, node):
    cm = an.cmap(node.args[0])
    if cm is not None and cm.dim != 1:
        return an.barrier(node, "normalization whose channel dim is not dim 1")
    if cm is not None:
        for i, what in enumerate(("weight", "bias", "running mean", "running variance"), start=1):
            an.member(node, _arg(node, i, what), 0, cm, what)
    return _multi(node, cm)


def reduce(an, node):
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    rank = len(shape_of(node.args[0]))
    dims = _arg(node, 1, "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return an.barrier(node, "reduction over every dim, channels included")
    dims = {_norm(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    if cm.dim in dims:
        return an.barrier(node, "reduction over the channel dim mixes channels")
    keep = _arg(node, 2, "keepdim", False)
    return cm if keep else cm.with_dim(cm.dim - sum(d < cm.dim for d in dims))


def reshape(an, node):
    """The channel dim may move (around size-1 dims) or merge with the dims right after it (C*H*W)."""
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    ins, outs = shape_of(node.args[0]), shape_of(node)
    d, c = cm.dim, ins[cm.dim]
    pre = prod(ins[:d])
    for e in range(len(outs)):
        if prod(outs[:e]) != pre or outs[e] % c or (outs[e] == 1 and c != 1):
            continue
        r, merged = outs[e] // c, 1
        for size in [1] + ins[d + 1:]:
            merged *= size
            if merged == r:
                ids = np.repeat(cm.ids, r)
                tags = (np.repeat(cm.tags, r) * r + np.tile(np.arange(r), len(cm.ids))).astype(np.int64)
                return CMap(e, ids, tags) if r > 1 else CMap(e, cm.ids, cm.tags)
            if merged > r:
                break
    return an.barrier(node, f"reshape {ins} -> {outs} splits the channel dim or merges it with the batch")


def permute(an, node):
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    rank = len(shape_of(node))
    if node.target is torch.ops.aten.permute.default:
        perm = [_norm(p, rank) for p in node.args[1]]
        return cm.with_dim(perm.index(cm.dim))
    d0, d1 = (0, 1) if len(node.args) < 3 else (_norm(node.args[1], rank), _norm(node.args[2], rank))
    return cm.with_dim({d0: d1, d1: d0}.get(cm.dim, cm.dim))


def cat(an, node):
    tensors = list(node.args[0])
    rank = len(shape_of(node))
    d = _norm(_arg(node, 1, "dim", 0), rank)
    dims = {an.cmap(t).dim for t in tensors if an.cmap(t) is not None}
    if not dims:
        return None
    if len(dims) > 1:
        return an.barrier(node, "concatenated tensors carry channels in different dims")
    if dims.pop() != d:
        return join(an, node, tensors)
    ids, tags = [], []
    for t in tensors:
        cm = an.cmap(t)
        if cm is None:  # positions from an untracked tensor stay as they are
            n = shape_of(t)[d]
            cm = CMap(d, an.uf.fresh(n, frozen=f"comes from untracked tensor '{t.name}'"), np.zeros(n, np.int64))
        ids.append(cm.ids)
        tags.append(cm.tags)
    return CMap(d, np.concatenate(ids), np.concatenate(tags))


def split_dim(node) -> int:
    """The dim a split/chunk/tensor_split node splits (non-negative)."""
    return _norm(_arg(node, 2, "dim", 0), len(shape_of(node.args[0])))


def split(an, node):
    cm = an.cmap(node.args[0])
    pieces = node.meta.get("val")
    if cm is None:
        return [None] * len(pieces)
    d = split_dim(node)
    if d != cm.dim:
        return [cm] * len(pieces)
    if node.target is torch.ops.aten.chunk.default and len(cm.ids) % len(pieces) == 0:
        # equal chunks stay equal only if every chunk keeps the same count (the eager code re-chunks)
        an.block_constraints.append((cm.ids, len(pieces), f"chunk '{node.name}'"))
    out, start = [], 0
    for p in pieces:
        n = int(p.shape[d])
        out.append(CMap(d, cm.ids[start:start + n], cm.tags[start:start + n]))
        start += n
    return out


def slice_(an, node):
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    rank = len(shape_of(node.args[0]))
    d = _norm(_arg(node, 1, "dim", 0), rank)
    if d != cm.dim:
        return cm
    if node.target is torch.ops.aten.narrow.default:
        start = node.args[2]
        sl = slice(start, start + node.args[3])
    else:
        sl = slice(_arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
        if sl.step not in (None, 1):
            return an.barrier(node, f"strided slice (step {sl.step}) of the channel dim")
    return CMap(d, cm.ids[sl], cm.tags[sl])


def pad(an, node):
    cm = an.cmap(node.args[0])
    if cm is not None and cm.dim >= len(shape_of(node)) - len(node.args[1]) // 2:
        return an.barrier(node, "padding of the channel dim")
    return cm


def getitem(an, node):
    src = an.channel_map(node.args[0])
    return src[node.args[1]] if isinstance(src, list) else None
