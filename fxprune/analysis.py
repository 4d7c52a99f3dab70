"""Analysis: which channels are coupled, as groups with index maps, and which are frozen and why.

Every tensor node gets a channel map (``CMap``): the dim that carries channels and, per position along it, an
element id (and a tag: the spatial sub-position once C*H*W features are flattened). Producers (conv/linear
outputs) mint fresh elements; the op handlers in ops.py move, slice, concatenate or unite them; an op without a
handler is a barrier that freezes what reaches it. Union-find over elements gives channel classes; classes
minted by the same producer form a group, and every parameter dim that carries channels (a ``Slot``) maps its
positions to (group, index). Channel maps live in ``node.meta[META_KEY]``, so copies of the graph carry them.
Parameters shared by several modules (tied weights) are one parameter here, under their canonical name.

The walk itself is graphwalk.Builder; the ``Analysis`` it returns is read-only (frozen dataclasses, tuples,
mapping proxies), so one analysis can serve many jobs: what a job freezes on top of it lives on the job
(``PruneContext.freeze``).

Example::

    an = analyze(capture(model, x))
    print(an.describe())          # every group, and every barrier op with its node, module and reason
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch.fx import GraphModule, Node

from . import ops
from .capture import node_module_path
from .cmap import CMap, concrete, op_name, prod, shape_of  # noqa: F401 - re-exported for callers
from .errors import RewriteError

META_KEY = "fxprune_cmap"  # node.meta entry: (analysis token, channel map); survives graph copies


@dataclass(frozen=True)
class Slot:
    """A parameter/buffer dim whose positions are channels: 'out' rows of a producer, per-channel 'member'
    entries (bias, BatchNorm, depthwise kernels), or the 'in' dim of a consumer that folds T."""
    fqn: str
    dim: int
    role: str
    ids: np.ndarray
    tags: np.ndarray
    node: str = ""       # the (first) graph node that uses it this way
    foldable: bool = True  # 'in' slots: a full-rank linear consumer (plain conv, linear)
    lookup: bool = False   # 'out' columns of an embedding table: a tied LM head may read them as its input


@dataclass(frozen=True)
class Source:
    """A tensor Z_j that some of a group's consumers read (up to ops that commute with a channel-linear map).
    Each source takes its own k x n reconstruction matrix T_j, folded into the consumers that read it; ``why``
    says why only a plain selection is possible there (the consumer cannot absorb T)."""
    node: str
    consumers: tuple[str, ...] = ()  # weight FQNs whose input dim reads Z_j
    why: str | None = None

    @property
    def foldable(self) -> bool:
        return self.why is None


@dataclass(frozen=True)
class Group:
    """Channels that must be removed together. ``width`` channels, numbered 0..width-1."""
    gid: int
    width: int
    producers: tuple[str, ...] = ()   # weight FQNs whose rows mint the channels
    members: tuple[str, ...] = ()     # per-channel params sliced alongside
    consumers: tuple[str, ...] = ()   # weight FQNs whose input dim reads the channels
    modules: tuple[str, ...] = ()     # producer module paths
    frozen: str | None = None         # why the analysis froze it (a job's own freezing: PruneContext.freeze)
    sources: Mapping[str, Source] = field(default_factory=dict)  # node name of Z_j -> its consumers
    block_of: np.ndarray | None = None  # channel -> block; every block keeps the same count (grouped conv, chunk)
    unit_of: np.ndarray | None = None   # channel -> unit; a unit (an attention head) is kept or removed whole

    @property
    def unit_size(self) -> int:
        """Channels per unit (head_dim for attention heads; 1 when channels move one by one)."""
        return 1 if self.unit_of is None else self.width // (int(self.unit_of.max()) + 1)

    @property
    def blocks(self) -> int:
        return 1 if self.block_of is None else int(self.block_of.max()) + 1

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.width > 1

    def __post_init__(self):
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def describe(self) -> str:
        head = f"group {self.gid}: width {self.width}"
        if self.frozen:
            head += f"  FROZEN: {self.frozen}"
        lines = [head, f"  producers: {', '.join(self.producers)}"]
        if self.consumers:
            lines.append(f"  consumers: {', '.join(self.consumers)}")
        if self.members:
            lines.append(f"  follow:    {', '.join(self.members)}")
        if self.blocks > 1:
            lines.append(f"  blocks:    {self.blocks} (each keeps the same number of channels)")
        if self.unit_of is not None:
            lines.append(f"  heads:     {self.width // self.unit_size} of {self.unit_size} channels "
                         "(kept or removed whole)")
        if not self.frozen:
            for src in self.sources.values():
                how = "T folded" if src.foldable else f"selection only ({src.why})"
                lines.append(f"  reads {src.node}: {', '.join(src.consumers)}; {how}")
        return "\n".join(lines)

    @property
    def foldable_sources(self) -> list[str]:
        return [s.node for s in self.sources.values() if s.foldable]


def _where(node: Node) -> str:
    mod = node_module_path(node)
    return f"node '{node.name}'" + (f" in module '{mod}'" if mod else "")


@dataclass
class Barrier:
    """An op that froze the channels reaching it (or that no channel reached, but would have frozen)."""
    node: str
    module: str
    reason: str  # names the op, the node and the module


class Queries:
    """The read-only questions the rules, the rewrite and the methods ask of an analysis; shared by the walk
    (graphwalk.Builder, while it runs) and its result (``Analysis``)."""

    gm: GraphModule
    token: int

    def _aliases_init(self, gm: GraphModule):
        self.aliases = _aliases(gm)  # canonical name -> every name of the same tensor (tied weights)
        self._canonical = {name: canon for canon, names in self.aliases.items() for name in names}

    # ---- channel maps (kept in node.meta, so copies of the graph carry them) ------------------------------
    def channel_map(self, node):
        """What the analysis found for a node: a CMap, a list of them (multi-output ops) or None."""
        entry = node.meta.get(META_KEY) if isinstance(node, Node) else None
        if entry is None:
            return None
        token, cm = entry
        if token != self.token:
            raise RewriteError(f"node '{node.name}' carries the channel maps of another analysis of this graph "
                               "(it was analysed again); use the plan of the newest analysis")
        return cm

    def cmap(self, arg) -> CMap | None:
        cm = self.channel_map(arg)
        return cm if isinstance(cm, CMap) else None

    @property
    def cmaps(self) -> dict[Node, object]:
        """{node: channel map} for every node of the analysed graph."""
        return {n: self.channel_map(n) for n in self.gm.graph.nodes}

    # ---- helpers the rules use ----------------------------------------------------------------------------
    def handler(self, node: Node) -> ops.OpHandler:
        return ops.handler(node.target)

    def data_input(self, node: Node) -> Node:
        """The argument a consumer node reads its input channels from (addmm: its second)."""
        return node.args[ops.handler(node.target).data_arg]

    def where_text(self, node: Node, why: str) -> str:
        return f"{why} ({_where(node)})"

    def param_fqn(self, arg) -> str | None:
        """The canonical name of a parameter/buffer node (tied weights: the first name it has)."""
        if isinstance(arg, Node) and arg.op == "get_attr":
            return self._canonical.get(arg.target, arg.target)
        return None

    def canonical(self, name: str) -> str:
        """The canonical name of a parameter or buffer known by ``name`` (one of its tied names)."""
        return self._canonical.get(name, name)

    def fqn_text(self, fqn: str) -> str:
        others = [a for a in self.aliases.get(fqn, [fqn]) if a != fqn]
        return fqn + (f" (also {', '.join(others)})" if others else "")

    def param_view(self, arg) -> tuple[str, list[int]] | None:
        """(parameter name, parameter dim per dim of arg) when ``arg`` is a parameter or a layout-only view of
        one (t, transpose, permute, detach, clone, a dtype cast): its dims can be sliced on the parameter."""
        if not isinstance(arg, Node):
            return None
        if arg.op == "get_attr":
            shape = shape_of(arg)
            return (self.param_fqn(arg), list(range(len(shape)))) if shape is not None else None
        layout = ops.handler(arg.target).layout if arg.op == "call_function" else None
        inner = self.param_view(arg.args[0]) if layout is not None else None
        if inner is None:
            return None
        fqn, dims = inner
        perm = layout(arg, len(dims))  # output dim i shows input dim perm[i]
        return None if perm is None else (fqn, [dims[p] for p in perm])

    def params_feeding(self, node) -> list[str]:
        """The parameters (canonical names) a computed tensor is computed from, in graph order."""
        seen, todo, out = set(), [node] if isinstance(node, Node) else [], []
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                out.append(self.param_fqn(n))
            todo.extend(n.all_input_nodes)
        order = {n.target: i for i, n in enumerate(self.gm.graph.nodes) if n.op == "get_attr"}
        return sorted(set(out), key=lambda f: order.get(f, len(order)))

    def is_weight(self, arg) -> bool:
        return self.param_view(arg) is not None

    def param_leaves(self, arg, dim: int) -> list[tuple[Node, int]] | None:
        """The parameters behind dim ``dim`` of a tensor computed from parameters and numbers alone, by
        element-wise ops and views that only add or drop size-1 dims (a frozen BatchNorm's per-channel scale
        ``weight.reshape(1, -1, 1, 1) * (running_var.reshape(1, -1, 1, 1) + eps).rsqrt()``): [(parameter or
        layout view of one, its dim that lines up with ``dim``)], leaving out those broadcast along it; None when
        anything else (an input, a reduction, a view with a literal size) goes into it. Slicing each such
        parameter along its dim slices the computed tensor along ``dim``, in the graph and in the eager forward."""
        if not isinstance(arg, Node):
            return []
        shape = shape_of(arg)
        if shape is None or not 0 <= dim < len(shape):
            return None
        if shape[dim] == 1:
            return []  # broadcast along the channel dim
        if self.param_view(arg) is not None:
            return [(arg, dim)]
        if arg.op != "call_function":
            return None
        family = ops.handler(arg.target).family
        if family == "reshape":
            return self._leaves_through_view(arg, dim, shape)
        if family not in ("elementwise", "identity", "cast", "join"):
            return None
        leaves = []
        for a in [*arg.args, *arg.kwargs.values()]:
            a_shape = shape_of(a) if isinstance(a, Node) else None
            if not isinstance(a, Node) or a_shape is not None and dim - len(shape) + len(a_shape) < 0:
                continue  # a number, or an operand broadcast along the dim (it has no such dim)
            inner = self.param_leaves(a, dim - len(shape) + len(a_shape)) if a_shape is not None else None
            if inner is None:
                return None
            leaves += inner
        return leaves

    def _leaves_through_view(self, arg, dim: int, shape) -> list[tuple[Node, int]] | None:
        """param_leaves through a view that only adds or drops size-1 dims, whose size at ``dim`` is not a
        literal (-1, or no size list at all: squeeze, unsqueeze, flatten): the slim graph still runs."""
        src = arg.args[0] if arg.args else None
        src_shape = shape_of(src) if isinstance(src, Node) else None
        if src_shape is None or [s for s in src_shape if s != 1] != [s for s in shape if s != 1]:
            return None
        sizes = arg.args[1] if len(arg.args) > 1 and isinstance(arg.args[1], (list, tuple)) else None
        has_sizes = ops.handler(arg.target).fix_shape is not None  # view / reshape: a size list, not (un)squeeze
        if has_sizes and (sizes is None or len(sizes) != len(shape) or sizes[dim] != -1):
            return None
        rank = sum(1 for s in shape[:dim] if s != 1)  # dim is the rank-th non-1 dim of both
        src_dim = [i for i, s in enumerate(src_shape) if s != 1][rank]
        return self.param_leaves(src, src_dim)

    def tensor(self, fqn: str) -> torch.Tensor:
        """The analysed graph's parameter or buffer by (any of its) names."""
        obj = self.gm
        for part in fqn.split("."):
            obj = getattr(obj, part)
        return obj

    def _elem_table(self) -> np.ndarray:
        raise NotImplementedError

    def positions(self, slot_or_cmap) -> tuple[np.ndarray, np.ndarray]:
        """(group id, index in group) per position; group id -1 where a position is in no group."""
        gi = self._elem_table()[slot_or_cmap.ids]
        return gi[:, 0], gi[:, 1]

    def kept_lookup(self, masks: Mapping[int, np.ndarray]):
        """``f(slot_or_cmap) -> bool per position``: kept by ``masks`` (group id -> keep mask over its width);
        positions in no group, or in a group without a mask, are kept. One vectorized lookup per call: called
        for every slot and node, a loop over the groups was most of the rewrite's and verification's time."""
        offset = np.concatenate([[0], np.cumsum([g.width for g in self.groups])]).astype(np.int64)
        flat = np.ones(int(offset[-1]) + 1, dtype=bool)  # the last entry answers for positions in no group
        for g, m in masks.items():
            flat[offset[g]:offset[g + 1]] = m

        def kept(holder) -> np.ndarray:
            gid, idx = self.positions(holder)
            return flat[np.where(gid >= 0, offset[np.maximum(gid, 0)] + idx, len(flat) - 1)]
        return kept

    def describe(self) -> str:
        """Every group (what it couples, or why it is frozen) and every barrier op with its node and module."""
        n_free = sum(g.prunable for g in self.groups)
        lines = [f"{len(self.groups)} channel groups: {n_free} prunable, {len(self.groups) - n_free} frozen"]
        lines += [g.describe() for g in self.groups]
        if self.barriers:
            lines.append(f"barriers: {len(self.barriers)} op(s) freeze the channels that reach them")
            lines += [f"  {b.reason}" for b in self.barriers]
        return "\n".join(lines)

    def _upstream(self, node: Node, gid: int) -> Node | None:
        """The tensor a piece of a split/slice/getitem (or an op T commutes through) was taken from."""
        if node.op != "call_function":
            return None
        h = ops.handler(node.target)
        if h.takes_part:
            return node.args[0] if isinstance(node.args[0], Node) else None
        nxt = h.through(self, node, gid)
        return nxt if isinstance(nxt, Node) and not _is_heads(self.cmap(nxt)) else None

    def carries_whole(self, node: Node, gid: int) -> bool:
        """Whether a node's tensor holds every channel of group ``gid`` (a method can measure the group there)."""
        cm = self.cmap(node)
        if cm is None:
            return False
        g, idx = self.positions(cm)
        return len(set(idx[g == gid].tolist())) == self.groups[gid].width

    def source(self, node: Node, gid: int) -> str:
        """The tensor a consumer's input really is for group ``gid``: walk back through ops that commute with a
        channel-linear map (averages, reshapes, zero pads, a cat where one input carries the group)."""
        while node.op == "call_function":
            nxt = ops.handler(node.target).through(self, node, gid)
            if not isinstance(nxt, Node) or _is_heads(self.cmap(nxt)):
                break  # Z is read where its channels are one dim (attention output merged back, not its heads)
            node = nxt
        return node.name

    def carries(self, node, gid: int) -> bool:
        """Whether a node's tensor holds channels of group ``gid``."""
        cm = self.cmap(node)
        return cm is not None and bool((self.positions(cm)[0] == gid).any())


def _is_heads(cm) -> bool:
    return isinstance(cm, CMap) and cm.heads


class Analysis(Queries):
    """What the walk found, read-only: ``groups`` (tuple of frozen Groups), ``slots`` / ``slot_users`` /
    ``param_users`` / ``slot_source`` / the norm records (mapping proxies), ``barriers`` (tuple), and each node's
    channel map in ``node.meta[META_KEY]`` (read it with ``cmap`` / ``channel_map``). Built by ``analyze``."""

    def __init__(self, gm, token, prune_hidden, groups, slots, slot_users, param_users, barriers, barrier_nodes,
                 slot_source, rms_norms, head_norms, selections, aliases, elem_table):
        self.gm, self.token, self.prune_hidden = gm, token, prune_hidden
        self.groups: tuple[Group, ...] = tuple(groups)
        self.slots: Mapping[tuple[str, int], Slot] = MappingProxyType(dict(slots))
        self.slot_users: Mapping[tuple[str, int], tuple[Node, ...]] = MappingProxyType(dict(slot_users))
        self.param_users: Mapping[str, tuple[Node, ...]] = MappingProxyType(dict(param_users))
        self.barriers: tuple[Barrier, ...] = tuple(barriers)
        self.barrier_nodes: tuple[Node, ...] = tuple(barrier_nodes)
        self.slot_source: Mapping[tuple[str, int, int], str] = MappingProxyType(dict(slot_source))
        self.rms_norms = MappingProxyType({k: MappingProxyType(v) for k, v in rms_norms.items()})
        self.head_norms = MappingProxyType({k: MappingProxyType(v) for k, v in head_norms.items()})
        self.selections: Mapping[str, CMap] = MappingProxyType(dict(selections))
        self.aliases = MappingProxyType({k: tuple(v) for k, v in aliases.items()})
        self._canonical = {name: canon for canon, names in self.aliases.items() for name in names}
        self._table = freeze_array(elem_table)

    def _elem_table(self) -> np.ndarray:
        return self._table

    def __setattr__(self, name, value):
        if "_table" in self.__dict__:
            raise AttributeError(f"an Analysis is read-only (setting {name!r}); a job freezes groups with "
                                 "PruneContext.freeze")
        super().__setattr__(name, value)


def freeze_array(a):
    """``a`` made read-only in place (None stays None): results that share arrays cannot corrupt each other."""
    if a is not None:
        a.flags.writeable = False
    return a


def _flat_nodes(args) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, Node) else None)
    return out


def _flat_cmaps(cm) -> list[CMap]:
    if isinstance(cm, CMap):
        return [cm]
    if isinstance(cm, (list, tuple)):
        return [c for c in cm if isinstance(c, CMap)]
    return []


def _aliases(gm: GraphModule) -> dict[str, list[str]]:
    """Canonical name -> every name of the same parameter or buffer object (two modules sharing one tensor).
    The canonical name is the one named_parameters()/named_buffers() report."""
    out: dict[str, list[str]] = {}
    first: dict[int, str] = {}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        canon = first.setdefault(id(t), name)
        out.setdefault(canon, []).append(name)
    return out


def analyze(gm: GraphModule, prune_hidden: bool = False) -> Analysis:
    """Run the channel analysis on a captured GraphModule (``prune_hidden``: the residual stream of RMSNorm
    transformers is a prunable group, see rules._rms_norm)."""
    from .graphwalk import Builder  # the walk imports this module's result types
    return Builder(gm, prune_hidden).result()
