"""The op handlers: everything fxprune knows about one ATen op (or a family of them), in one place.

An ``OpHandler`` says, for the ops it is registered under in ``HANDLERS``:

    rule            how channel indices flow from inputs to outputs (a function in rules.py, called as
                    rule(analysis, node); it returns the node's channel map, a list of them for multi-output
                    ops, or None when no tracked channel flows out). None: the op is a barrier.
    barrier         why a known barrier freezes the channels that reach it ("normalizes across channels")
    commutes        whether a channel-linear map Z -> Z[:, keep] @ T passes through the op unchanged, so the
                    consumers after it may read the reconstruction of the tensor BEFORE it (True for the op's
                    first argument, or a function (analysis, node, group id) -> the input node, or None)
    dtype_only_args positions of tensor arguments that only lend a dtype (type_as(x, other))
    data_arg        the argument a consumer reads its input channels from (addmm(bias, x, W): 1); the hooked
                    reference replaces that argument by its reconstruction
    fix_shape       fix_shape(plan, node): rewrites the node's shape constants in the slim graph (view sizes,
                    split sizes, slice bounds, depthwise groups); functions in shapes.py
    fix_module      fix_module(plan, node, module): updates width attributes of the module that issued the node
                    when no tensor of that module shows the new width (InstanceNorm2d(affine=False).num_features)
    has_flops       the cost model prices it (FlopCounterMode on meta tensors) and scales it by the kept
                    fraction of its input and output channels
    bn_stat_args    (running_mean, running_var) argument positions of a BatchNorm whose statistics can be
                    re-estimated after pruning
    bn_eps_arg      a BatchNorm's eps argument position, and whether it returns a tuple (output first), read by
    bn_tuple        training methods that apply the layer's normalization themselves (training.activation_probe)
    heads           its rule understands head maps (a channel dim split into (heads, head_dim), cmap.py); any
                    other op that a head map reaches is a barrier
    selects         its result depends on the order of values (top-k, sort, arg-max indices): float rounding can
                    flip a near-tie, so verification compares the values it selects from and then gives the slim
                    graph the reference's result (compare.py)
    mixes_channels  a barrier that mixes the channels it freezes (a normalization): the report names it first
                    for a frozen stream
    elementwise     a function of each element alone (training.activation_probe applies it to a layer's output)
    reads_data      False for ops no tensor data flows through (asserts, sizes): a parameter they read is not
                    "also read" elsewhere
    takes_part      its output is a piece of its first input (getitem, split, slice)
    layout          layout(node, rank) -> for each output dim the input dim it shows, for ops that only move
                    dims (identity, cast, permute, same-rank expand): a parameter seen through it is still
                    that parameter; None: not a layout-only view
    groups_arg      a convolution's ``groups`` argument position (fix_conv_groups rewrites it)
    shapes_when     shapes_when(analysis, node): whether fix_shape has a constant to rewrite at this node (None:
                    always); freeze-and-retry blames only those

Any op without a handler is a barrier: the channels that reach it are frozen and the report names the op, the
node and the module — never guessed.

Adding an op: one entry in ``HANDLERS`` (reuse a family handler, or build one with the fields it needs) and a
test in tests/test_ops.py. For example, hard-shrink is element-wise, so::

    "aten.hardshrink": ELEMENTWISE,

and a new op that is linear per channel (it commutes with T) and keeps the channel dim::

    "aten.my_blur": OpHandler("pool", rules.pool, commutes=True),

The test builds a tiny module using the op, captures and analyses it, and checks the groups by hand (producers,
consumers, what is frozen and why); tests/test_rewrite.py checks a pruned model against a float64 reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

from . import hf, rules, shapes
from .cmap import op_name


@dataclass(frozen=True)
class OpHandler:
    """What fxprune knows about one op family (see the module docstring for each field)."""
    family: str
    rule: Callable | None = None
    barrier: str | None = None
    commutes: bool | Callable = False
    dtype_only_args: tuple[int, ...] = ()
    data_arg: int = 0
    fix_shape: Callable | None = None
    fix_module: Callable | None = None
    has_flops: bool = False
    bn_stat_args: tuple[int, int] | None = None
    bn_eps_arg: int | None = None
    bn_tuple: bool = False
    heads: bool = False
    selects: bool = False
    mixes_channels: bool = False
    elementwise: bool = False
    reads_data: bool = True
    takes_part: bool = False
    layout: Callable | None = None
    groups_arg: int | None = None
    shapes_when: Callable | None = None

    def carries_width(self, an, node) -> bool:
        """Whether this node's constants carry a pruned width that fix_shape rewrites (a mean: only an
        RMSNorm's, whose eps follows the kept width)."""
        return self.fix_shape is not None and (self.shapes_when is None or self.shapes_when(an, node))

    def through(self, an, node, gid: int):
        """The input node a consumer's reconstruction may be taken at instead of this node's output (T commutes
        through the op), or None."""
        if self.commutes is True:
            return node.args[0]
        if callable(self.commutes):
            return self.commutes(an, node, gid)
        return None


def _zero_pad_input(an, node, gid):
    """Padding with zeros commutes with a channel-linear map (the pad of Z[:, keep] @ T is the pad of Z ...)."""
    name = op_name(node.target)
    if name == "aten.constant_pad_nd":
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return node.args[0] if value == 0 else None
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return node.args[0] if mode == "constant" and not value else None


def _single_carrier(an, node, gid):
    """A concatenation commutes for a group when exactly one of its inputs carries that group's channels."""
    carriers = {a for a in node.args[0] if an.carries(a, gid)}
    return carriers.pop() if len(carriers) == 1 else None


def _same_layout(node, rank):
    return list(range(rank))


def _same_rank_layout(node, rank):
    """expand without new leading dims shows its input's dims in place."""
    return list(range(rank)) if len(node.meta["val"].shape) == len(node.args[0].meta["val"].shape) else None


# ---- the families ---------------------------------------------------------------------------------------------
ELEMENTWISE = OpHandler("elementwise", rules.passthrough, heads=True, elementwise=True)  # nonlinear: Z after it
IDENTITY = OpHandler("identity", rules.passthrough, commutes=True, heads=True, layout=_same_layout)  # copies
CAST = OpHandler("cast", rules.passthrough, dtype_only_args=(1,), heads=True, layout=_same_layout)  # .to(other)
MAX_POOL = OpHandler("pool", rules.pool)
LINEAR_POOL = OpHandler("pool", rules.pool, commutes=True)                 # averages, upsampling: linear
JOIN = OpHandler("join", rules.join, heads=True)
# conv2d(x, w, b, stride, padding, dilation, groups); conv_transpose2d(x, w, b, stride, padding, output_padding,
# groups, dilation); convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
CONV = OpHandler("conv", functools.partial(rules.conv, transposed=False, groups_arg=6),
                 fix_shape=shapes.fix_conv_groups, has_flops=True, groups_arg=6)
CONV_TRANSPOSE = OpHandler("conv", functools.partial(rules.conv, transposed=True, groups_arg=6),
                           fix_shape=shapes.fix_conv_groups, has_flops=True, groups_arg=6)
CONVOLUTION = OpHandler("conv", functools.partial(rules.conv, transposed=6, groups_arg=8),
                        fix_shape=shapes.fix_conv_groups, has_flops=True, groups_arg=8)
LINEAR = OpHandler("linear", rules.linear, has_flops=True)
# x @ W with a parameter W; or a product of two head maps (attention's q @ k^T and probs @ v)
MATMUL = OpHandler("matmul", functools.partial(rules.matmul, data=0, weight=1), has_flops=True, heads=True,
                   fix_module=hf.fix_attention)
ADDMM = OpHandler("matmul", functools.partial(rules.matmul, data=1, weight=2, bias=0), data_arg=1,
                  has_flops=True)
ATTENTION = OpHandler("attention", rules.attention, has_flops=True, heads=True, fix_module=hf.fix_attention)
SOFTMAX = OpHandler("softmax", rules.softmax, heads=True)
BATCH_NORM = OpHandler("batch_norm", rules.batch_norm, fix_module=shapes.fix_norm_module, bn_stat_args=(3, 4),
                       bn_eps_arg=7)
INSTANCE_NORM = OpHandler("batch_norm", rules.batch_norm, fix_module=shapes.fix_norm_module)  # statistics per sample
LINEAR_REDUCE = OpHandler("reduce", rules.reduce, commutes=True, heads=True)
# a mean over the channel dim may be an RMSNorm's (rules._rms_norm): its eps follows the kept width
MEAN = replace(LINEAR_REDUCE, fix_shape=shapes.fix_rms_eps, fix_module=hf.fix_rms_norm,
               shapes_when=lambda an, node: node.name in an.rms_norms or node.name in an.head_norms)
EMBEDDING = OpHandler("embedding", rules.embedding)  # with prune_hidden: its columns are the residual stream
REDUCE = OpHandler("reduce", rules.reduce, heads=True)
VIEW = OpHandler("reshape", rules.reshape, commutes=True, fix_shape=shapes.fix_view, heads=True)
RESHAPE = OpHandler("reshape", rules.reshape, commutes=True, heads=True)   # flatten/squeeze: no sizes to fix
EXPAND = OpHandler("expand", rules.expand, commutes=True, fix_shape=shapes.fix_view, heads=True,
                   layout=_same_rank_layout)
PERMUTE = OpHandler("permute", rules.permute, commutes=True, heads=True, layout=rules.permuted_dims)
SELECT = OpHandler("select", rules.select, commutes=True, heads=True)
ROLL = OpHandler("roll", rules.roll, commutes=True, heads=True)
INDEX = OpHandler("index", rules.index, heads=True)
CAT = OpHandler("cat", rules.cat, commutes=_single_carrier, heads=True)
SPLIT = OpHandler("split", rules.split, fix_shape=shapes.fix_split, heads=True, takes_part=True)
SLICE = OpHandler("slice", rules.slice_, fix_shape=shapes.fix_slice, heads=True, takes_part=True)
PAD = OpHandler("pad", rules.pad, commutes=_zero_pad_input)
GETITEM = OpHandler("getitem", rules.getitem, heads=True, takes_part=True)
IGNORE = OpHandler("ignore", rules.nothing, heads=True, reads_data=False)  # no tensor flows (asserts, sizes)


def _barrier(why: str, has_flops: bool = False, mixes_channels: bool = False, selects: bool = False) -> OpHandler:
    return OpHandler("barrier", barrier=why, has_flops=has_flops, mixes_channels=mixes_channels, selects=selects)


HANDLERS: dict[str, OpHandler] = {
    **dict.fromkeys((
        "aten.relu", "aten.relu_", "aten.relu6", "aten.gelu", "aten.silu", "aten.silu_", "aten.sigmoid",
        "aten.tanh", "aten.hardtanh", "aten.hardtanh_", "aten.hardswish", "aten.hardswish_",
        "aten.hardsigmoid", "aten.leaky_relu", "aten.leaky_relu_", "aten.elu", "aten.mish", "aten.softplus",
        "aten.neg", "aten.abs", "aten.exp", "aten.sqrt", "aten.rsqrt", "aten.clamp", "aten.clamp_min",
        "aten.clamp_max", "aten.square", "aten.reciprocal", "aten.log", "aten.erf", "aten.pow", "aten.hardshrink",
    ), ELEMENTWISE),
    **dict.fromkeys((
        "aten.dropout", "aten.dropout_", "aten.feature_dropout", "aten.alpha_dropout", "aten.clone",
        "aten.contiguous", "aten.alias", "aten.detach", "aten.lift_fresh_copy", "aten.identity",
    ), IDENTITY),
    **dict.fromkeys(("aten._to_copy", "aten.to", "aten.type_as"), CAST),
    **dict.fromkeys((
        "aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d", "aten.adaptive_max_pool1d",
        "aten.adaptive_max_pool2d", "aten.max_pool2d_with_indices",
    ), MAX_POOL),
    **dict.fromkeys((
        "aten.avg_pool1d", "aten.avg_pool2d", "aten.avg_pool3d", "aten.adaptive_avg_pool1d",
        "aten.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d", "aten.adaptive_avg_pool3d",
        "aten.upsample_nearest1d", "aten.upsample_nearest2d", "aten.upsample_bilinear2d", "aten.upsample_bicubic2d",
    ), LINEAR_POOL),
    **dict.fromkeys((
        "aten.add", "aten.add_", "aten.sub", "aten.sub_", "aten.mul", "aten.mul_", "aten.div", "aten.div_",
        "aten.maximum", "aten.minimum", "aten.where",
    ), JOIN),
    **dict.fromkeys(("aten.conv1d", "aten.conv2d", "aten.conv3d"), CONV),
    **dict.fromkeys(("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d"), CONV_TRANSPOSE),
    "aten.convolution": CONVOLUTION,
    "aten.linear": LINEAR,
    **dict.fromkeys(("aten.mm", "aten.matmul", "aten.bmm"), MATMUL),
    "aten.scaled_dot_product_attention": ATTENTION,
    **dict.fromkeys(("aten.softmax", "aten._softmax"), SOFTMAX),
    "aten.expand": EXPAND,
    "aten.select": SELECT,
    "aten.roll": ROLL,
    "aten.index": INDEX,
    "aten.addmm": ADDMM,
    "aten.batch_norm": BATCH_NORM,
    "aten.native_batch_norm": replace(BATCH_NORM, bn_tuple=True),
    "aten._native_batch_norm_legit_no_training": replace(BATCH_NORM, bn_eps_arg=6, bn_tuple=True),
    "aten.instance_norm": INSTANCE_NORM,
    "aten.mean": MEAN,
    "aten.sum": LINEAR_REDUCE,
    **dict.fromkeys(("aten.amax", "aten.amin"), REDUCE),
    **dict.fromkeys(("aten.view", "aten.reshape", "aten._unsafe_view"), VIEW),
    **dict.fromkeys(("aten.flatten", "aten.squeeze", "aten.unsqueeze"), RESHAPE),
    "aten.reshape_as": replace(RESHAPE, rule=rules.reshape_as, dtype_only_args=(1,)),  # sizes from its 2nd input
    **dict.fromkeys(("aten.permute", "aten.transpose", "aten.t", "aten.numpy_T"), PERMUTE),  # numpy_T: x.T
    **dict.fromkeys(("aten.cat", "aten.concat", "aten.concatenate"), CAT),
    **dict.fromkeys(("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split"), SPLIT),
    **dict.fromkeys(("aten.slice", "aten.narrow"), SLICE),
    **dict.fromkeys(("aten.constant_pad_nd", "aten.pad"), PAD),
    "_operator.getitem": GETITEM,
    **dict.fromkeys((
        "aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_size", "aten.sym_numel",
        "aten.sym_stride", "aten.sym_constrain_range_for_size", "aten._assert_async",
        "_operator.mul", "_operator.add", "_operator.sub", "_operator.floordiv", "_operator.eq",
    ), IGNORE),
    # known barriers: the reason goes into the report
    **dict.fromkeys(("aten.layer_norm", "aten.native_layer_norm"),
                    _barrier("normalizes across channels (LayerNorm statistics mix them; prune_hidden covers "
                             "RMSNorm only: a pre-norm LayerNorm needs the writers centered first, not done)",
                             mixes_channels=True)),
    "aten.group_norm": _barrier("normalizes across channels within groups", mixes_channels=True),
    "aten.baddbmm": _barrier("is a batched matrix product plus a tensor", has_flops=True),
    "aten.einsum": _barrier("is an einsum (a product over named dims)", has_flops=True),
    "aten.embedding": EMBEDDING,
    "aten.index_select": _barrier("reorders channels by data"),
    **dict.fromkeys(("aten.sort", "aten.argsort"), _barrier("reorders by value", selects=True)),
    **dict.fromkeys(("aten.topk", "aten.kthvalue"), _barrier("selects by value", selects=True)),
    **dict.fromkeys(("aten.argmax", "aten.argmin"), _barrier("returns indices chosen by value", selects=True)),
}

UNKNOWN = _barrier("is not in fxprune's op table")


def handler(target) -> OpHandler:
    """The handler of a call_function target (UNKNOWN, a barrier, for ops fxprune does not know)."""
    return HANDLERS.get(op_name(target), UNKNOWN)


# Ops that assert a tensor's dtype/layout as traced (rotary inv_freq in bf16): true of the half model only, so a
# float32 recomputation of a half graph (precision.Float32) skips them.
DTYPE_ASSERTS = frozenset({"aten._assert_tensor_metadata"})


def asserts_dtype(target) -> bool:
    return op_name(target) in DTYPE_ASSERTS


# Ops whose large half-precision weight a float32 recomputation (precision.Float32) need not upcast whole:
# (the weight's argument index, how): "gather" selects rows of it (exact in the half dtype; upcast after),
# "rows" makes one output feature per weight row (computed a block of rows at a time).
HALF_WEIGHT = {"aten.linear": (1, "rows"), "aten.embedding": (0, "gather")}


def half_weight(target) -> tuple[int, str] | None:
    return HALF_WEIGHT.get(op_name(target))


def node_handler(node) -> OpHandler | None:
    """The handler of a graph node, or None for nodes that are not op calls (placeholders, get_attr, output)."""
    return handler(node.target) if node.op == "call_function" else None


def tuple_item(node) -> int | None:
    """The index ``node`` takes out of a multi-output op's result (output[i]), or None when it is no such pick."""
    if node.op == "call_function" and op_name(node.target) == "_operator.getitem" and isinstance(node.args[1], int):
        return node.args[1]
    return None


def barrier_reason(target) -> str:
    name = op_name(target)
    h = HANDLERS.get(name)
    if h is not None and h.barrier:
        return f"{name} {h.barrier}"
    return f"op {name} {UNKNOWN.barrier}"


def bn_stat_args(node) -> tuple[int, int] | None:
    """(running_mean, running_var) argument positions when ``node`` is a BatchNorm with running statistics
    that are parameters of the model, else None."""
    h = node_handler(node)
    if h is None or h.bn_stat_args is None:
        return None
    if any(len(node.args) <= i or getattr(node.args[i], "op", None) != "get_attr" for i in h.bn_stat_args):
        return None
    return h.bn_stat_args


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes


def extra_flop_formulas() -> dict:
    """{op: FLOP formula} for eager ops FlopCounterMode does not count (cost.flop_counter): scaled_dot_product_
    attention on CPU dispatches to _scaled_dot_product_flash_attention_for_cpu (the same op on meta tensors,
    where the cost model prices it, is counted through its math form: the two must agree)."""
    import torch
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _cpu_flash_attention_flops}


# ---- extension --------------------------------------------------------------------------------------------------
FAMILIES = {"elementwise": ELEMENTWISE, "identity": IDENTITY, "max_pool": MAX_POOL, "linear_pool": LINEAR_POOL,
            "join": JOIN, "reduce": REDUCE, "linear_reduce": LINEAR_REDUCE, "ignore": IGNORE}


def barrier(why: str, has_flops: bool = False, mixes_channels: bool = False) -> OpHandler:
    """A handler for an op whose channels must stay: ``why`` goes into the report after the op's name."""
    return _barrier(why, has_flops, mixes_channels)


def register_op(op, handler) -> OpHandler:
    """Tell fxprune how channels flow through an op of your own (a torch.library custom op, or an ATen op it
    does not know yet). ``op``: the op (``torch.ops.mylib.blur``, or one overload of it) or its table name
    (``"aten.hardshrink"``); ``handler``: an OpHandler, ``barrier("why")``, or a family name: one of FAMILIES
    ("elementwise": a nonlinear function of each element; "identity": a copy; "linear_pool": linear per channel,
    keeps the channel dim; ...). Replaces what the table had for that op."""
    if isinstance(handler, str):
        if handler not in FAMILIES:
            raise ValueError(f"unknown op family {handler!r}; one of: {', '.join(FAMILIES)}, or pass an OpHandler")
        handler = FAMILIES[handler]
    if not isinstance(handler, OpHandler):
        raise TypeError(f"handler must be an OpHandler or a family name, got {type(handler).__name__}")
    if isinstance(op, str):
        names = [op]
    elif hasattr(op, "overloads"):  # a packet: every overload of it
        names = [op_name(getattr(op, o)) for o in op.overloads()]
    else:
        names = [op_name(op)]
    for name in names:
        HANDLERS[name] = handler
    return handler
