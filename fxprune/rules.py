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
    if any(cm.heads for _, cm in tracked):
        return _join_heads(an, node, inputs, tracked, d, out)
    first = tracked[0][1]
    for a, cm in tracked[1:]:
        if len(cm.ids) != len(first.ids) or not np.array_equal(cm.tags, first.tags):
            return an.barrier(node, "inputs carry channels of different layouts")
        an.uf.union(first.ids, cm.ids)
    _untracked_operands(an, node, inputs, d, out, first, per_head=False)
    return CMap(d, first.ids, first.tags)


def _untracked_operands(an, node, inputs, d, out, first: CMap, per_head: bool):
    """Untracked inputs of an element-wise op: broadcast along the channel (heads) dim they couple nothing; a
    parameter that spans it (or a tensor computed from parameters alone: a frozen BatchNorm's scale) becomes a
    per-channel (per-head) member; anything else freezes the channels."""
    for a in inputs:
        if an.cmap(a) is not None:
            continue
        shape = shape_of(a)
        di = d - (len(out) - len(shape)) if shape is not None else -1
        if shape is None or di < 0 or shape[di] == 1:
            continue  # broadcast along the channel dim: no coupling
        cm = CMap(0, first.reps(), np.zeros(first.size, np.int64)) if per_head else first
        if not (np.all(first.tags == 0) and an.param_member(node, a, di, cm)):
            an.uf.freeze(first.ids, f"combined element-wise with untracked tensor '{a.name}' at node '{node.name}'"
                         + an.barrier_before(a))


def _join_heads(an, node, inputs, tracked, d, out):
    """Element-wise over head maps: heads h of every input are one head. Maps with as many channels per head are
    united channel by channel; a per-head value (a bias with one entry per head, Swin's relative position bias)
    couples to its head's first channel, which the head's unit constraint keeps together with the rest."""
    first = max((cm for _, cm in tracked), key=lambda cm: cm.unit)
    subs = {cm.sub + len(out) - len(shape_of(a)) for a, cm in tracked if cm.sub is not None}
    if len(subs) > 1:
        return an.barrier(node, "inputs split attention heads in different dims")
    for _, cm in tracked:
        if cm is first:
            continue
        if cm.size != first.size:
            return an.barrier(node, "inputs carry different numbers of attention heads")
        if cm.unit == first.unit:
            an.uf.union(first.ids, cm.ids)
        else:
            an.uf.union(first.reps(), cm.reps())
    _untracked_operands(an, node, inputs, d, out, first, per_head=True)
    return CMap(d, first.ids, first.tags, first.unit, subs.pop() if subs else None)


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


def conv(an, node, transposed: bool | int, groups_arg: int):
    """Convolution; ``transposed`` an int: the position of the op's own transposed flag (aten.convolution)."""
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    if not isinstance(transposed, bool):
        transposed = bool(node.args[transposed])
    groups = _arg(node, groups_arg, "groups", 1)
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
    cx, cw = an.cmap(x), an.cmap(w)
    if (cx is not None and cx.heads) or (cw is not None and cw.heads):
        return _head_product(an, node, x, w)
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
        return an.barrier(node, "normalization whose channel dim is not dim 1", mixing=True)
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
        norm = _rms_norm(an, node, cm) if op_name(node.target) == "aten.mean" else None
        if not isinstance(norm, dict):
            return an.barrier(node, "reduction over the channel dim mixes channels"
                              + (f" ({norm}; fxprune prunes through an RMSNorm x * rsqrt(mean(x^2) + eps) * weight)"
                                 if norm else ""), mixing=True)
        an.rms_norms[node.name] = norm  # a consumer that takes a selection (the reference zeroes its input)
        return None
    if cm.heads and cm.sub in dims and op_name(node.target) == "aten.mean" and an.prune_hidden:
        norm = _rms_norm(an, node, cm, cm.sub)  # a per-head norm (Qwen3's q_norm / k_norm): see hf.head_norm_scale
        if isinstance(norm, dict):
            an.head_norms[node.name] = norm
    if _arg(node, 2, "keepdim", False):
        return cm
    shift = lambda d: d - sum(x < d for x in dims)  # noqa: E731 - the dim's index once the reduced dims are gone
    return cm.with_dim(shift(cm.dim), None if cm.sub is None or cm.sub in dims else shift(cm.sub))


def reshape(an, node):
    """The channel dim may move (around size-1 dims) or merge with the dims right after it (C*H*W); split into
    (heads, head_dim) it becomes a head map (heads kept or removed whole)."""
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    ins, outs = shape_of(node.args[0]), shape_of(node)
    if cm.heads:
        return _reshape_heads(an, node, cm, ins, outs)
    out = _reshape_flat(cm, ins, outs)
    if out is not None:
        return out
    d, c = cm.dim, ins[cm.dim]
    if not np.any(cm.tags):
        for e in range(len(outs) - 1):  # (.., C, ..) -> (.., heads, head_dim, ..)
            if prod(outs[:e]) == prod(ins[:d]) and outs[e] > 1 and outs[e + 1] > 1 and outs[e] * outs[e + 1] == c:
                an.unit_constraints.append((cm.ids.reshape(outs[e], outs[e + 1]), f"view '{node.name}'"))
                return CMap(e, cm.ids, cm.tags, outs[e + 1], e + 1)
    return an.barrier(node, f"reshape {ins} -> {outs} splits the channel dim or merges it with the batch")


def reshape_as(an, node):
    """x.reshape_as(other): a reshape whose sizes come from ``other``, so the slim graph follows only when other
    carries the same channels where the result has them (LeViT: BatchNorm over x.flatten(0, 1), then back)."""
    out = reshape(an, node)
    if out is None:
        return out
    other = an.cmap(node.args[1])
    if other is None or other.dim != out.dim or not np.array_equal(an.uf.roots(other.ids), an.uf.roots(out.ids)):
        return an.barrier(node, "reshape_as a tensor that does not carry the same channels in the same dim")
    return out


def _reshape_flat(cm: CMap, ins, outs) -> CMap | None:
    """A flat map through a reshape that moves the channel dim or merges it with the dims after it."""
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
    return None


def _same_dim(ins, outs, d) -> int | None:
    """The output dim that is input dim ``d`` unchanged (the same size, the same number of elements before it)."""
    pre = prod(ins[:d])
    return next((e for e in range(len(outs)) if outs[e] == ins[d] and prod(outs[:e]) == pre), None)


def _reshape_heads(an, node, cm: CMap, ins, outs):
    """A reshape of a head map: the heads dim moves (a no-op view, unsqueeze, Swin's window batch split); heads and
    head_dim merge back into channels, head-major; or the heads dim merges with the broadcast dims after it
    (grouped-query attention's repeat_kv: expand(B, kv, n_rep, T, hd) -> (B, kv * n_rep, T, hd) makes position h
    head h // n_rep)."""
    d, s = cm.dim, cm.sub
    zeros = np.zeros(len(cm.ids), np.int64)
    e = _same_dim(ins, outs, d)
    if e is not None:
        if s is None:
            return cm.with_dim(e)
        e2 = _same_dim(ins, outs, s)
        if e2 is not None:
            return cm.with_dim(e, e2)
    pre = prod(ins[:d])
    if s == d + 1 and ins[s] == cm.unit:  # heads and head_dim merge back, head-major (and maybe with more dims)
        flat = _reshape_flat(CMap(d, cm.ids, zeros), ins[:d] + [ins[d] * ins[s]] + ins[s + 1:], outs)
        if flat is not None:
            return flat
    for e in range(len(outs)):
        if prod(outs[:e]) != pre or outs[e] % ins[d] or outs[e] == ins[d]:
            continue
        r, merged = outs[e] // ins[d], 1
        for j in range(d + 1, len(ins)):
            if j == s:
                break
            merged *= ins[j]
            if merged == r:
                e2 = None if s is None else _same_dim(ins, outs, s)
                if s is not None and e2 is None:
                    break
                ids = np.repeat(cm.per_head(), r, axis=0).ravel()
                return CMap(e, ids, np.zeros(len(ids), np.int64), cm.unit, e2)
            if merged > r:
                break
    return an.barrier(node, f"reshape {ins} -> {outs} splits or regroups attention heads")


def permuted_dims(node, rank: int) -> list[int] | None:
    """For each output dim of a permute / transpose / t, the input dim it shows (None: t of a 1-D tensor...)."""
    if node.target is torch.ops.aten.permute.default:
        return [_norm(p, rank) for p in node.args[1]]
    if node.target is torch.ops.aten.numpy_T.default:  # x.T reverses every dim (Falcon's x @ self.weight.T)
        return list(range(rank))[::-1]
    if len(node.args) >= 3:
        d0, d1 = _norm(node.args[1], rank), _norm(node.args[2], rank)
    elif rank == 2:  # t
        d0, d1 = 0, 1
    elif rank < 2:   # t of a vector or scalar: nothing moves
        return list(range(rank))
    else:
        return None
    dims = list(range(rank))
    dims[d0], dims[d1] = d1, d0
    return dims


def permute(an, node):
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    perm = permuted_dims(node, len(shape_of(node)))
    if perm is None:
        return an.barrier(node, "transpose without dims of a tensor above 2-D")
    move = perm.index
    return cm.with_dim(move(cm.dim), None if cm.sub is None else move(cm.sub))


def cat(an, node):
    tensors = list(node.args[0])
    rank = len(shape_of(node))
    d = _norm(_arg(node, 1, "dim", 0), rank)
    maps = [an.cmap(t) for t in tensors if an.cmap(t) is not None]
    dims = {cm.dim for cm in maps}
    if not dims:
        return None
    if len(dims) > 1:
        return an.barrier(node, "concatenated tensors carry channels in different dims")
    if dims.pop() != d:
        return join(an, node, tensors)  # RoPE's cat over head_dim too: a head map is opaque inside a head
    units = {cm.unit for cm in maps}
    subs = {cm.sub for cm in maps}
    if len(units) > 1 or len(subs) > 1:
        return an.barrier(node, "concatenated heads of different layouts")
    u = units.pop()
    ids, tags = [], []
    for t in tensors:
        cm = an.cmap(t)
        if cm is None:  # positions from an untracked tensor stay as they are
            n = shape_of(t)[d] * u
            cm = CMap(d, an.uf.fresh(n, frozen=f"comes from untracked tensor '{t.name}'"), np.zeros(n, np.int64))
        ids.append(cm.ids)
        tags.append(cm.tags)
    return CMap(d, np.concatenate(ids), np.concatenate(tags), u, subs.pop())


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
    if cm.heads:
        an.barrier(node, "split of the attention heads dim")
        return [None] * len(pieces)
    if node.target is torch.ops.aten.chunk.default and len(cm.ids) % len(pieces) == 0:
        # equal chunks stay equal only if every chunk keeps the same count (the eager code re-chunks)
        an.block_constraints.append((cm.ids, len(pieces), f"chunk '{node.name}'"))
    elif node.target is torch.ops.aten.split.Tensor and len({int(p.shape[d]) for p in pieces}) == 1:
        # x.split(n) into equal pieces: the eager code splits by one size (often a stored int, Res2Net's
        # self.width, a CSP stage's expand_chs // 2), which can follow the slim model only if the pieces stay
        # equal; soft: where the pieces span several groups it is left to verification (freeze and retry)
        an.block_constraints.append((cm.ids, len(pieces), f"split '{node.name}'", True))
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
        return cm  # a head map is opaque inside a head: RoPE's slices of head_dim pass
    if cm.heads:
        return an.barrier(node, "slice of the attention heads dim")
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


# ---- attention ------------------------------------------------------------------------------------------------
def _repeat_heads(cm: CMap, n: int) -> CMap:
    """Head h of the result is head h // n of ``cm`` (grouped-query attention: kv head j serves n query heads)."""
    ids = np.repeat(cm.per_head(), n, axis=0).ravel()
    return CMap(cm.dim, ids, np.zeros(len(ids), np.int64), cm.unit, cm.sub)


def _unite_heads(an, a: CMap, b: CMap):
    """Head h of ``a`` and head h of ``b`` are one head: channel by channel when they have as many channels,
    else through each head's first channel (the unit constraint keeps the rest with it)."""
    if a.unit == b.unit:
        an.uf.union(a.ids, b.ids)
    else:
        an.uf.union(a.reps(), b.reps())


def _head_product(an, node, a, b):
    """a @ b over head maps, the heads dim a batch dim of both: q @ k^T contracts head_dim within each head (the q
    and k heads are one), probs @ v carries v's heads. The result is a head map of the operand whose head_dim
    survives (None when it was contracted: attention scores)."""
    ca, cb = an.cmap(a), an.cmap(b)
    sa, sb, so = shape_of(a), shape_of(b), shape_of(node)
    r = len(so)
    if ca is None or cb is None or len(sa) < 3 or len(sb) < 3:
        return an.barrier(node, "matrix product of attention heads with an untracked operand")
    da, db = ca.dim + r - len(sa), cb.dim + r - len(sb)
    if da != db or ca.dim >= len(sa) - 2 or cb.dim >= len(sb) - 2 or ca.size != cb.size:
        return an.barrier(node, "matrix product whose operands carry attention heads in different dims")
    _unite_heads(an, ca, cb)
    keep_a, keep_b = ca.sub == len(sa) - 2, cb.sub == len(sb) - 1  # head_dim in a's rows / b's columns
    if keep_a and keep_b:
        return an.barrier(node, "matrix product of head_dim by head_dim (an outer product within heads)")
    if keep_b:
        return CMap(db, cb.ids, cb.tags, cb.unit, r - 1)
    return CMap(da, ca.ids, ca.tags, ca.unit, r - 2 if keep_a else None)


def attention(an, node):
    """scaled_dot_product_attention(q, k, v, mask): q, k, v split into heads (B, heads, T, head_dim). q and k
    heads are one (q . k^T contracts head_dim within a head); the output carries v's heads, which are the same
    heads; a mask with a heads dim follows them. Grouped-query attention (enable_gqa, fewer k/v heads): query
    head h reads kv head h // (heads / kv heads)."""
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    gqa = _arg(node, 7, "enable_gqa", False)
    maps = [an.cmap(t) for t in (q, k, v)]
    cmask = an.cmap(mask) if isinstance(mask, Node) else None
    if all(m is None for m in maps) and cmask is None:
        return None
    r = len(shape_of(node))
    if any(m is None or not m.heads or m.dim != r - 3 or m.sub != r - 1 or len(shape_of(t)) != r
           for m, t in zip(maps, (q, k, v))):
        return an.barrier(node, "attention whose q, k and v are not all split into heads (B, heads, T, head_dim)")
    cq, ck, cv = maps
    if ck.size != cq.size or cv.size != cq.size:
        if not gqa or cq.size % ck.size or ck.size != cv.size:
            return an.barrier(node, "attention with different numbers of q and k/v heads")
        ck, cv = _repeat_heads(ck, cq.size // ck.size), _repeat_heads(cv, cq.size // ck.size)
    if ck.unit != cq.unit:
        return an.barrier(node, "attention whose q and k heads have different sizes")
    an.uf.union(cq.ids, ck.ids)
    _unite_heads(an, cq, cv)
    if isinstance(mask, Node):
        mshape = shape_of(mask)
        dm = r - 3 - (r - len(mshape))
        if cmask is not None:
            if cmask.dim != dm or cmask.size != cq.size:
                return an.barrier(node, "attention mask whose heads are not in the heads dim")
            _unite_heads(an, cq, cmask)
        elif dm >= 0 and mshape[dm] != 1:
            an.uf.freeze(cq.ids, f"the attention mask '{mask.name}' differs per head and is computed from no "
                                 f"parameter fxprune can slice (node '{node.name}')")
    return CMap(r - 3, cv.ids, cv.tags, cv.unit, r - 1)


def softmax(an, node):
    """Normalizes along one dim: channels in another dim pass (each channel normalized on its own)."""
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    if _norm(node.args[1], len(shape_of(node))) == cm.dim:
        return an.barrier(node, "softmax over the channel dim mixes channels", mixing=True)
    return cm


def expand(an, node):
    """Broadcast along size-1 dims (a class token over the batch, repeat_kv's copies of each kv head)."""
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    ins, outs = shape_of(node.args[0]), shape_of(node)
    k = len(outs) - len(ins)
    if outs[cm.dim + k] != ins[cm.dim]:
        return an.barrier(node, "expand of the channel dim")
    return cm.with_dim(cm.dim + k, None if cm.sub is None else cm.sub + k)


def select(an, node):
    """x.select(dim, i) (CLS-token pooling): picks one index of a non-channel dim."""
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    d = _norm(node.args[1], len(shape_of(node.args[0])))
    if d == cm.dim:
        return an.barrier(node, "select picks one channel")
    shift = lambda x: x - (x > d)  # noqa: E731
    return cm.with_dim(shift(cm.dim), None if cm.sub is None or cm.sub == d else shift(cm.sub))


def roll(an, node):
    """A cyclic shift of non-channel dims (Swin's shifted windows) moves positions, not channels."""
    cm = an.cmap(node.args[0])
    if cm is None:
        return None
    dims = _arg(node, 2, "dims", [])
    rank = len(shape_of(node))
    dims = {_norm(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    if not dims or cm.dim in dims:
        return an.barrier(node, "roll of the channel dim (or of the flattened tensor)")
    return cm


def index(an, node):
    """x[i0, i1, ...] with index tensors on leading dims: the dims after them pass. A parameter gathered this way
    (Swin's relative position bias table, (positions, heads)) gets a per-channel slot on its last dim, so its
    columns follow whatever channels (heads) it is later combined with."""
    x, indices = node.args[0], list(node.args[1])
    xs, outs = shape_of(x), shape_of(node)
    cm = an.cmap(x)
    n = len(indices)
    if xs is None or outs is None or any(t is None for t in indices) or len(xs) <= n:
        return None if cm is None else an.barrier(node, "indexing of the channel dim")
    offset = len(outs) - len(xs)  # the indexed leading dims became the index tensors' broadcast shape
    if cm is not None:
        if cm.dim < n:
            return an.barrier(node, "indexing of the channel dim")
        return cm.with_dim(cm.dim + offset, None if cm.sub is None else cm.sub + offset)
    if an.is_weight(x) and an.param_view(x)[1] == list(range(len(xs))):
        size = xs[-1]
        cm = an.slot(node, x, len(xs) - 1, "member", CMap(0, an.uf.fresh(size), np.zeros(size, np.int64)))
        return CMap(len(outs) - 1, cm.ids, cm.tags)
    return None


def embedding(an, node):
    """embedding(weight, indices): a producer whose channels are the weight's columns (its dim 1), along the
    output's last dim (the residual stream of a transformer starts here)."""
    weight = node.args[0]
    if not an.prune_hidden:
        return an.barrier(node, "looks up rows of its weight by index (the hidden size is pruned only with "
                                "prune_hidden=True)")
    cm = an.slot(node, weight, 1, "out", None, lookup=True)
    if cm is None:
        return an.barrier(node, "looks up rows of a tensor computed in forward")
    return CMap(len(shape_of(node)) - 1, cm.ids, cm.tags)


def _only_reader(node: Node) -> Node | None:
    """The single user of ``node`` that reads its data (asserts on its metadata do not count)."""
    from .ops import handler  # ops imports rules
    users = [u for u in node.users if u.op == "call_function" and handler(u.target).reads_data]
    return users[0] if len(users) == 1 else None


def _past_casts(node: Node) -> Node | None:
    """Walk down through dtype casts and copies to the next op that reads ``node``'s value."""
    from .ops import handler
    nxt = _only_reader(node)
    while nxt is not None and handler(nxt.target).family in ("cast", "identity"):
        nxt = _only_reader(nxt)
    return nxt


def _rms_norm(an, node, cm: CMap, dim: int | None = None):
    """mean(x ** 2, channel dim, keepdim) + eps -> rsqrt -> x * r -> weight * (.): an RMSNorm over the channels.

    It takes a selection: if the pruned channels of x are zero (the reference zeroes them at the norm's input),
    the mean over the k kept channels is n / k times the mean over all n, so the slim norm equals the reference
    on the kept channels exactly with eps' = eps * n / k and weight' = weight * sqrt(n / k). Returns the record
    (Analysis.rms_norms), a reason when an RMSNorm's weight cannot absorb the scale, or None when the pattern is
    not an RMSNorm. ``dim``: the dim it normalizes (the channel dim; a head map's head_dim for Qwen3's q_norm)."""
    dim = cm.dim if dim is None else dim
    pw = node.args[0]
    if not (isinstance(pw, Node) and op_name(pw.target) == "aten.pow" and len(pw.args) > 1 and pw.args[1] == 2):
        return None
    rank = len(shape_of(pw))
    dims = _arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if [_norm(d, rank) for d in dims] != [dim] or dim != rank - 1 or not _arg(node, 2, "keepdim", False):
        return None
    add = _only_reader(node)
    if add is None or op_name(add.target) != "aten.add" or len(add.args) != 2 or add.args[0] is not node \
            or not isinstance(add.args[1], float):
        return None
    rs = _only_reader(add)
    if rs is None or op_name(rs.target) != "aten.rsqrt":
        return None
    mul = _only_reader(rs)
    if mul is None or op_name(mul.target) != "aten.mul" or set(mul.args) != {pw.args[0], rs}:
        return None
    wmul = _past_casts(mul)
    if wmul is None or op_name(wmul.target) != "aten.mul" or len(wmul.args) != 2:
        return None
    weights = [a for a in wmul.args if an.param_view(a) is not None and len(shape_of(a)) == 1]
    if len(weights) != 1 or shape_of(weights[0])[0] != shape_of(pw)[-1]:
        # no per-channel weight parameter to absorb sqrt(n / k): Gemma's (1 + weight) is computed in forward
        return "the norm's weight is computed in forward (e.g. Gemma's 1 + weight), not a parameter"
    # out: the first node where slim and reference agree (the mean, rsqrt and x * r differ by powers of n / k)
    return dict(eps_node=add.name, eps=float(add.args[1]), weight=an.param_view(weights[0])[0], cmap=cm,
                out=wmul.name, producer=_private_producer(pw.args[0], {pw, mul}))


def _private_producer(x: Node, norm_ops: set) -> str | None:
    """The conv / linear whose output only this norm reads (OLMoE's q_proj -> q_norm over all heads), through
    dtype casts; None when the norm's input is read elsewhere (a residual stream). Its rows can then be scaled by
    sqrt(k / n) instead of the norm's eps by n / k: the mean over the k kept channels of (c x)^2 with c^2 = k / n
    is the mean over all n with the pruned ones zero, so eps stays the config's (a checkpoint reloads exactly)."""
    from .ops import handler
    chain = set()
    while isinstance(x, Node) and x.op == "call_function" and handler(x.target).family in ("cast", "identity"):
        chain.add(x)
        x = x.args[0]
    if not (isinstance(x, Node) and x.op == "call_function" and handler(x.target).family in ("linear", "conv")):
        return None
    chain.add(x)
    others = {u for n in chain for u in n.users if u.op != "call_function" or handler(u.target).reads_data}
    return x.name if others <= chain | norm_ops else None
