"""The op table: how channel indices flow through each ATen op. Data only; the rules live in analysis.py.

Each entry maps an ATen op (its packet name, or one overload where overloads differ) to a rule:

    "pass"       output channels are the input's channels (element-wise ops, dropout, norms per channel)
    "pool"       like "pass", but only when channels sit in dim 1 (N, C, *spatial) and spatial dims are pooled
    "join"       element-wise with broadcasting: inputs that span the channel dim are the SAME channels
    "conv"       convolution: output channels are new (a producer), input channels are consumed
    "linear"     x @ W^T + b over the last dim: a producer of the last dim, a consumer of the input's last dim
    "batch_norm" per-channel parameters and running statistics follow the input's channels
    "reduce"     mean/sum/amax over some dims: fine unless the channel dim itself is reduced
    "reshape"    view/reshape/flatten/squeeze/unsqueeze: the channel dim moves, or merges with trailing dims
    "permute"    permute/transpose: the channel dim moves
    "cat"        concatenation: along the channel dim channel maps are concatenated, else joined
    "split"      split/chunk: along the channel dim each piece gets a slice of the channel map
    "slice"      slice/narrow: along the channel dim a slice of the channel map
    "pad"        constant padding of trailing (spatial) dims
    "getitem"    picks one output of a multi-output op
    "ignore"     no tensor flows (assertions, shape queries)

Any op NOT in this table is a barrier: the channels that reach it are frozen and the report names the op.
Adding an op is one line here plus a test in tests/test_ops.py.
"""

RULES = {
    # element-wise, one tensor in, same channels out
    **{op: "pass" for op in (
        "aten.relu", "aten.relu_", "aten.relu6", "aten.gelu", "aten.silu", "aten.silu_", "aten.sigmoid",
        "aten.tanh", "aten.hardtanh", "aten.hardtanh_", "aten.hardswish", "aten.hardswish_",
        "aten.hardsigmoid", "aten.leaky_relu", "aten.leaky_relu_", "aten.elu", "aten.mish", "aten.softplus",
        "aten.dropout", "aten.dropout_", "aten.feature_dropout", "aten.alpha_dropout", "aten.clone",
        "aten.contiguous", "aten.alias", "aten.detach", "aten.lift_fresh_copy", "aten._to_copy", "aten.to",
        "aten.type_as", "aten.neg", "aten.abs", "aten.exp", "aten.sqrt", "aten.rsqrt", "aten.clamp",
        "aten.clamp_min", "aten.clamp_max", "aten.square", "aten.reciprocal", "aten.log", "aten.erf",
        "aten.pow", "aten.identity",
    )},
    # spatial ops on (N, C, *spatial)
    **{op: "pool" for op in (
        "aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d", "aten.avg_pool1d", "aten.avg_pool2d",
        "aten.avg_pool3d", "aten.adaptive_avg_pool1d", "aten.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d",
        "aten.adaptive_avg_pool3d", "aten.adaptive_max_pool1d", "aten.adaptive_max_pool2d",
        "aten.max_pool2d_with_indices", "aten.upsample_nearest1d", "aten.upsample_nearest2d",
        "aten.upsample_bilinear2d", "aten.upsample_bicubic2d",
    )},
    **{op: "join" for op in (
        "aten.add", "aten.add_", "aten.sub", "aten.sub_", "aten.mul", "aten.mul_", "aten.div", "aten.div_",
        "aten.maximum", "aten.minimum", "aten.where",
    )},
    **{op: "conv" for op in ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution")},
    "aten.linear": "linear",
    **{op: "batch_norm" for op in (
        "aten.batch_norm", "aten._native_batch_norm_legit_no_training", "aten.native_batch_norm",
        "aten.instance_norm",
    )},
    **{op: "reduce" for op in ("aten.mean", "aten.sum", "aten.amax", "aten.amin")},
    **{op: "reshape" for op in (
        "aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.squeeze", "aten.unsqueeze",
    )},
    **{op: "permute" for op in ("aten.permute", "aten.transpose", "aten.t")},
    "aten.cat": "cat",
    **{op: "split" for op in ("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split")},
    **{op: "slice" for op in ("aten.slice", "aten.narrow")},
    "aten.constant_pad_nd": "pad",
    "aten.pad": "pad",
    "_operator.getitem": "getitem",
    **{op: "ignore" for op in (
        "aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_size", "aten.sym_numel",
        "aten.sym_stride", "aten.sym_constrain_range_for_size", "aten._assert_async",
        "_operator.mul", "_operator.add", "_operator.sub", "_operator.floordiv", "_operator.eq",
    )},
}

# Barriers we know: why each freezes the channels that reach it (anything else: "not in fxprune's op table").
MIXING = {
    "aten.layer_norm": "normalizes across channels (LayerNorm statistics mix them)",
    "aten.group_norm": "normalizes across channels within groups",
    "aten.native_layer_norm": "normalizes across channels (LayerNorm statistics mix them)",
    "aten.softmax": "mixes the entries of the dim it normalizes",
    "aten._softmax": "mixes the entries of the dim it normalizes",
    "aten.matmul": "is a matrix product with a non-parameter operand",
    "aten.bmm": "is a batched matrix product",
    "aten.mm": "is a matrix product with a non-parameter operand",
    "aten.scaled_dot_product_attention": "is attention (heads couple channels)",
    "aten.index_select": "reorders channels by data",
    "aten.select": "removes a dim by picking one index",
    "aten.sort": "reorders by value",
}


def op_name(target) -> str:
    """'aten.relu' for torch.ops.aten.relu.default; '_operator.getitem' for operator.getitem."""
    if hasattr(target, "overloadpacket"):
        return f"aten.{target.overloadpacket.__name__}" if target.namespace == "aten" else str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', str(target))}"


def barrier_reason(target) -> str:
    name = op_name(target)
    return f"{name} {MIXING[name]}" if name in MIXING else f"op {name} is not in fxprune's op table"


def rule_for(target) -> str | None:
    """The rule name for a call_function target, or None for a barrier."""
    return RULES.get(op_name(target))
