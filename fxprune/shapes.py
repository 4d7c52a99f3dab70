"""Shape constants in the slim graph: the ``fix_shape`` and ``fix_module`` functions the op handlers in ops.py
name. Each reads the channel maps the analysis left in ``node.meta`` (they survive graph copies) and the plan's
kept positions, and rewrites one node of a COPY of the analysed graph, or one module of the slim eager model.

    fix_shape(plan, node)           view/reshape sizes, split sizes, slice bounds, depthwise ``groups``
    fix_module(plan, node, module)  width attributes no tensor of the module shows (InstanceNorm's num_features)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import modules
from .errors import RewriteError
from .rules import split_dim


def _input(plan, node):
    a = node.args[0] if node.args else None
    return plan.an.cmap(a) if isinstance(a, torch.fx.Node) else None


def fix_view(plan, node):
    """view/reshape/expand sizes: the entry of the channel dim becomes the slim width, of a heads dim the number
    of heads kept (-1 and symbolic sizes stay; head_dim stays: heads are removed whole)."""
    cm = plan.an.cmap(node)
    if cm is None:
        return
    sizes = list(node.args[1])
    if isinstance(sizes[cm.dim], int) and sizes[cm.dim] != -1:
        sizes[cm.dim] = plan.new_size(cm) // cm.unit
        node.args = (node.args[0], sizes, *node.args[2:])


def fix_split(plan, node):
    """A split/chunk of the channel dim becomes split_with_sizes with the slim piece widths; a split of any
    other dim keeps its sizes."""
    pieces, src = plan.an.channel_map(node), _input(plan, node)
    if src is None or not isinstance(pieces, list) or not pieces or pieces[0] is None:
        return
    if split_dim(node) != src.dim:
        return
    node.target = torch.ops.aten.split_with_sizes.default
    node.args = (node.args[0], [plan.new_size(c) for c in pieces], src.dim)
    node.kwargs = {}


def fix_slice(plan, node):
    """slice/narrow of the channel dim: bounds counted in slim positions."""
    src = _input(plan, node)
    if src is None or plan.an.cmap(node) is None:
        return
    dim = node.args[1] if len(node.args) > 1 else 0
    dim = dim + len(node.meta["val"].shape) if dim < 0 else dim
    if dim != src.dim:
        return
    kept = np.concatenate([[0], np.cumsum(plan.kept_positions(src))])
    n = len(src.ids)
    clamp = lambda v: min(max(v + n if v < 0 else v, 0), n)  # noqa: E731
    if node.target is torch.ops.aten.narrow.default:
        start, length = clamp(node.args[2]), node.args[3]
        node.args = (node.args[0], dim, int(kept[start]), int(kept[clamp(start + length)] - kept[start]))
        return
    start = clamp(node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0)
    end = clamp(node.args[3] if len(node.args) > 3 and node.args[3] is not None else n)
    step = node.args[4] if len(node.args) > 4 else 1
    if step != 1:
        raise RewriteError(f"node '{node.name}' slices channels with step {step}; freeze that group instead")
    node.args = (node.args[0], dim, int(kept[start]), int(kept[end]), 1)


def fix_conv_groups(plan, node):
    """A depthwise conv (input channel c -> output channel c) keeps groups equal to its slim width."""
    gi = plan.an.handler(node).groups_arg
    groups = node.args[gi] if len(node.args) > gi else node.kwargs.get("groups", 1)
    src, cm = _input(plan, node), plan.an.cmap(node)
    if groups > 1 and src is not None and cm is not None and groups == len(src.ids) \
            and np.array_equal(src.ids, cm.ids):
        args = list(node.args) + [1] * (gi + 1 - len(node.args))
        args[gi] = plan.new_size(src)
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "groups"}


def fix_norm_module(plan, node, module: nn.Module):
    """A norm's num_features follows its input's slim width (affine=False norms have no tensor to show it)."""
    src = _input(plan, node)
    if src is not None and "num_features" in getattr(modules.adapter(module), "widths", ()):
        module.num_features = plan.new_size(src)


def fix_rms_eps(plan, node):
    """The eps constant after an RMSNorm's mean follows the kept width: eps * n / k (rules._rms_norm; a per-head
    norm: Plan.head_norm_ratio)."""
    eps = plan.norm_eps(node.name)
    if eps is None:
        return
    record = plan.an.rms_norms.get(node.name) or plan.an.head_norms[node.name]
    add = next(u for u in node.users if u.name == record["eps_node"])
    add.args = (add.args[0], eps)
