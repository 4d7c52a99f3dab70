"""Analysis: which channels are coupled, as groups with index maps, and which are frozen and why.

Every tensor node gets a channel map (``CMap``): the dim that carries channels and, per position along it, an
element id (and a tag: the spatial sub-position once C*H*W features are flattened). Producers (conv/linear
outputs) mint fresh elements; the op handlers in ops.py move, slice, concatenate or unite them; an op without a
handler is a barrier that freezes what reaches it. Union-find over elements gives channel classes; classes
minted by the same producer form a group, and every parameter dim that carries channels (a ``Slot``) maps its
positions to (group, index). Channel maps live in ``node.meta[META_KEY]``, so copies of the graph carry them.
Parameters shared by several modules (tied weights) are one parameter here, under their canonical name.

Example::

    an = analyze(capture(model, x))
    print(an.describe())          # every group, and every barrier op with its node, module and reason
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule, Node

from . import ops
from .capture import node_module_path
from .cmap import CMap, concrete, op_name, prod, shape_of  # noqa: F401 - re-exported for callers
from .errors import RewriteError

META_KEY = "fxprune_cmap"  # node.meta entry: (analysis token, channel map); survives graph copies


@dataclass
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


@dataclass
class Source:
    """A tensor Z_j that some of a group's consumers read (up to ops that commute with a channel-linear map).
    Each source takes its own k x n reconstruction matrix T_j, folded into the consumers that read it; ``why``
    says why only a plain selection is possible there (the consumer cannot absorb T)."""
    node: str
    consumers: list[str] = field(default_factory=list)  # weight FQNs whose input dim reads Z_j
    why: str | None = None

    @property
    def foldable(self) -> bool:
        return self.why is None


@dataclass
class Group:
    """Channels that must be removed together. ``width`` channels, numbered 0..width-1."""
    gid: int
    width: int
    producers: list[str] = field(default_factory=list)   # weight FQNs whose rows mint the channels
    members: list[str] = field(default_factory=list)     # per-channel params sliced alongside
    consumers: list[str] = field(default_factory=list)   # weight FQNs whose input dim reads the channels
    modules: list[str] = field(default_factory=list)     # producer module paths
    frozen: str | None = None
    sources: dict[str, Source] = field(default_factory=dict)  # node name of Z_j -> its consumers
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


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}
        self.mixing: dict[int, str] = {}  # the first channel-mixing reason (a normalization), when there is one

    def fresh(self, n: int, frozen: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        ids = np.arange(start, start + n, dtype=np.int64)
        if frozen:
            for i in ids:
                self.reason[int(i)] = frozen
        return ids

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray):
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                if ry in self.reason and rx not in self.reason:
                    self.reason[rx] = self.reason[ry]
                if ry in self.mixing and rx not in self.mixing:
                    self.mixing[rx] = self.mixing[ry]

    def freeze(self, ids: np.ndarray, why: str, mixing: bool = False):
        for i in ids.tolist():
            r = self.find(i)
            self.reason.setdefault(r, why)
            if mixing:
                self.mixing.setdefault(r, why)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(i) for i in ids.tolist()), dtype=np.int64, count=len(ids))


def _where(node: Node) -> str:
    mod = node_module_path(node)
    return f"node '{node.name}'" + (f" in module '{mod}'" if mod else "")


@dataclass
class Barrier:
    """An op that froze the channels reaching it (or that no channel reached, but would have frozen)."""
    node: str
    module: str
    reason: str  # names the op, the node and the module


_TOKENS = itertools.count()
_CONSUMER_ROLES = ("in", "grouped_in")


class Analysis:
    """Runs the op handlers' rules over a captured graph; result in ``groups``, ``slots``, ``barriers`` and
    each node's channel map in ``node.meta[META_KEY]`` (read it with ``cmap``/``channel_map``)."""

    def __init__(self, gm: GraphModule, prune_hidden: bool = False):
        self.gm = gm
        # RMSNorms over the channel dim take a selection (rules._rms_norm) instead of freezing the residual stream
        self.prune_hidden = bool(prune_hidden)
        self.rms_norms: dict[str, dict] = {}  # mean node name -> {eps_node, eps, weight fqn, cmap of its input}
        self.head_norms: dict[str, dict] = {}  # per-head RMSNorms over head_dim (Qwen3): the same records
        self.selections: dict[str, CMap] = {}  # node name -> its input's map: it reads a selection (tied LM head)
        self.token = next(_TOKENS)  # tells this analysis' channel maps from another's on the same graph
        self.uf = _UnionFind()
        self.slots: dict[tuple[str, int], Slot] = {}
        self.slot_users: dict[tuple[str, int], list[Node]] = {}  # the nodes that read each slot
        self.barrier_nodes: list[Node] = []
        self.barriers: list[Barrier] = []
        self.param_users: dict[str, list[Node]] = {}
        self.block_constraints: list[tuple] = []  # (ids in order, blocks, where[, soft: skip what cannot be met])
        self.unit_constraints: list[tuple[np.ndarray, str]] = []  # (ids as (units, unit size), where)
        self.slot_source: dict[tuple[str, int, int], str] = {}  # (consumer fqn, dim, group) -> source node
        self.aliases = _aliases(gm)  # canonical name -> every name of the same tensor (tied weights)
        self._canonical = {name: canon for canon, names in self.aliases.items() for name in names}
        for node in gm.graph.nodes:
            self._visit(node)
        self._freeze_params_read_elsewhere()
        self.groups: list[Group] = []
        self.class_index: dict[int, tuple[int, int]] = {}
        self._elem_group: np.ndarray | None = None
        self._build_groups()

    # ---- graph walk -------------------------------------------------------------------------------------
    def _visit(self, node: Node):
        if node.op == "placeholder" or node.op == "get_attr":
            self._set(node, None)  # model inputs and raw parameters carry no tracked channels
        elif node.op == "output":
            for arg in _flat_nodes(node.args):
                for cm in _flat_cmaps(self.channel_map(arg)):
                    self.uf.freeze(cm.ids, "reaches the model output (its width is part of the interface)")
        elif node.op == "call_function":
            h = ops.handler(node.target)
            if h.rule is None:
                self._set(node, self.barrier(node, ops.barrier_reason(node.target), mixing=h.mixes_channels))
            elif not h.heads and any(cm.heads for a in _flat_nodes(node.args) + _flat_nodes(node.kwargs)
                                     for cm in _flat_cmaps(self.channel_map(a))):
                self._set(node, self.barrier(node, f"{op_name(node.target)} on a tensor split into attention "
                                                   "heads is not supported"))
            else:
                self._set(node, h.rule(self, node))
        else:  # call_module (guards) / call_method: nothing tracked flows through
            self._set(node, None)
            if isinstance(node.meta.get("val"), torch.Tensor):
                self.barrier(node, f"{node.op} {node.target} is opaque to the analysis")

    def _set(self, node: Node, cm):
        node.meta[META_KEY] = (self.token, cm)

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

    def barrier(self, node: Node, why: str, mixing: bool = False) -> None:
        """Freeze every tracked channel among the node's inputs, and record why (``mixing``: the op mixes the
        channels, e.g. a normalization: the report names it first). Returns None (no channels)."""
        why = self.where_text(node, why)
        for arg in _flat_nodes(node.args) + _flat_nodes(node.kwargs):
            for cm in _flat_cmaps(self.channel_map(arg)):
                self.uf.freeze(cm.ids, why, mixing)
        self.barrier_nodes.append(node)
        self.barriers.append(Barrier(node.name, node_module_path(node), why))
        return None

    def barrier_before(self, node: Node, depth: int = 8) -> str:
        """', which comes from <the nearest barrier upstream>' (a residual stream added to a LayerNorm's output
        is frozen because of the LayerNorm), or '' when none is near."""
        names = {b.node: b for b in self.barriers}
        seen, frontier = set(), [node]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                if n.name in names:
                    return f", which comes from a barrier: {names[n.name].reason}"
                seen.add(n)
                nxt += [a for a in n.all_input_nodes if a not in seen]
            frontier = nxt
        return ""

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

    def slot(self, node: Node, arg, dim: int, role: str, cm: CMap | None, foldable: bool = True,
             lookup: bool = False):
        """Record that parameter ``arg``'s dim ``dim`` carries channels ``cm`` (a fresh map if cm is None).
        A parameter used twice (shared or tied weights) unites the channels of both uses. Returns the slot's
        CMap; ``cm`` unchanged when ``arg`` is not a parameter."""
        view = self.param_view(arg)
        if view is None:
            return cm
        fqn, dims = view
        users = self.param_users.setdefault(fqn, [])
        if node not in users:
            users.append(node)
        size = shape_of(arg)[dim]
        key = (fqn, dims[dim])
        readers = self.slot_users.setdefault(key, [])
        if node not in readers:
            readers.append(node)
        if key in self.slots:
            s = self.slots[key]
            if s.lookup and role == "in" and cm is not None and len(cm.ids) == len(s.ids) \
                    and np.array_equal(cm.tags, s.tags):
                # a tied LM head reads the embedding's columns: one tensor, sliced once; the head takes a
                # selection (a T folded into it would change the embedding too); the reference zeroes its input
                self.uf.union(s.ids, cm.ids)
                self.selections[node.name] = cm
                return CMap(0, s.ids, s.tags)
            if (s.role in _CONSUMER_ROLES) != (role in _CONSUMER_ROLES) or {s.role, role} == set(_CONSUMER_ROLES):
                why = (f"parameter {self.fqn_text(fqn)} is read as '{s.role}' channels by node '{s.node}' and as "
                       f"'{role}' channels by {_where(node)}")
                self.uf.freeze(np.concatenate([s.ids] + ([cm.ids] if cm is not None else [])), why)
            elif cm is not None and len(cm.ids) == len(s.ids) and np.array_equal(cm.tags, s.tags):
                self.uf.union(s.ids, cm.ids)
            elif cm is not None:
                self.uf.freeze(np.concatenate([s.ids, cm.ids]),
                               f"parameter {self.fqn_text(fqn)} is shared by uses that disagree")
            s.foldable = s.foldable and foldable
            return CMap(0, s.ids, s.tags)
        if cm is None:
            cm = CMap(0, self.uf.fresh(size), np.zeros(size, dtype=np.int64))
        self.slots[key] = Slot(fqn, dims[dim], role, cm.ids, cm.tags, node.name, foldable, lookup)
        return cm

    def member(self, node: Node, arg, dim: int, cm: CMap, what: str):
        """A per-channel argument (bias, norm weight, running statistics) that must follow channels ``cm``:
        a parameter becomes a 'member' slot; a tensor computed in forward freezes the channels."""
        if cm is None or not isinstance(arg, Node):
            return cm
        if self.is_weight(arg):
            return self.slot(node, arg, dim, "member", cm)
        why = self.where_text(node, f"the {what} of {op_name(node.target)} is computed in forward (node "
                                    f"'{arg.name}'); fxprune slices only parameters an op reads directly")
        self.uf.freeze(cm.ids, why)
        other = self.cmap(arg)
        if other is not None:
            self.uf.freeze(other.ids, why)
        self.barriers.append(Barrier(node.name, node_module_path(node), why))
        return cm

    def _freeze_params_read_elsewhere(self):
        """A parameter with channel slots that some other op also reads (a barrier, a weight computation, a
        use on another dim) cannot be sliced without breaking that op: freeze its slots."""
        by_fqn: dict[str, list[Slot]] = {}
        for (f, _), s in self.slots.items():
            by_fqn.setdefault(f, []).append(s)
        for node in self.gm.graph.nodes:
            fqn = self.param_fqn(node)
            if fqn not in by_fqn:
                continue
            for user in self._readers(node):
                if user in self.param_users.get(fqn, ()) or not ops.handler(user.target).reads_data:
                    continue
                for s in by_fqn[fqn]:
                    self.uf.freeze(s.ids, f"parameter {self.fqn_text(fqn)} is also read by {_where(user)}")

    def _readers(self, node: Node):
        """The ops that read a parameter node, looking through layout-only views of it."""
        for user in node.users:
            if user.op == "call_function" and user.args and user.args[0] is node and self.param_view(user) \
                    is not None:
                yield from self._readers(user)
            else:
                yield user

    def tensor(self, fqn: str) -> torch.Tensor:
        """The analysed graph's parameter or buffer by (any of its) names."""
        obj = self.gm
        for part in fqn.split("."):
            obj = getattr(obj, part)
        return obj

    def describe(self) -> str:
        """Every group (what it couples, or why it is frozen) and every barrier op with its node and module."""
        n_free = sum(g.prunable for g in self.groups)
        lines = [f"{len(self.groups)} channel groups: {n_free} prunable, {len(self.groups) - n_free} frozen"]
        lines += [g.describe() for g in self.groups]
        if self.barriers:
            lines.append(f"barriers: {len(self.barriers)} op(s) freeze the channels that reach them")
            lines += [f"  {b.reason}" for b in self.barriers]
        return "\n".join(lines)

    # ---- groups -------------------------------------------------------------------------------------------
    def _build_groups(self):
        uf = self.uf
        comp = _UnionFind()  # over producer slots: classes minted by one producer belong to one group
        slot_list = [s for s in self.slots.values() if s.role == "out"]
        owner: dict[int, int] = {}
        comp.fresh(len(slot_list))
        for si, s in enumerate(slot_list):
            for r in uf.roots(s.ids).tolist():
                if r in owner:
                    comp.union(np.array([owner[r]]), np.array([si]))
                else:
                    owner[r] = si
        by_comp: dict[int, list[int]] = {}
        for si in range(len(slot_list)):
            by_comp.setdefault(comp.find(si), []).append(si)
        for sis in by_comp.values():
            classes: list[int] = []
            seen = set()
            for si in sis:
                for r in uf.roots(slot_list[si].ids).tolist():
                    if r not in seen:
                        seen.add(r)
                        classes.append(r)
            g = Group(gid=len(self.groups), width=len(classes))
            for i, r in enumerate(classes):
                self.class_index[r] = (g.gid, i)
            reasons = [uf.reason[r] for r in classes if r in uf.reason]
            # a channel-mixing normalization says best why a stream is frozen (a transformer's residual stream:
            # LayerNorm / RMSNorm), ahead of an untracked input it is also added to (an embedding lookup)
            mixing = [uf.mixing[r] for r in classes if r in uf.mixing]
            g.frozen = (mixing or reasons or [None])[0]
            self.groups.append(g)
        for s in self.slots.values():
            for gid in sorted({self.class_index[r][0] for r in uf.roots(s.ids).tolist() if r in self.class_index}):
                g = self.groups[gid]
                {"out": g.producers, "member": g.members, "in": g.consumers, "grouped_in": g.consumers}[s.role].append(s.fqn)
                if s.role == "out":
                    for name in self.aliases.get(s.fqn, [s.fqn]):
                        mod = name.rsplit(".", 1)[0]
                        if mod not in g.modules:
                            g.modules.append(mod)
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for g in self.groups:
            self._find_sources(g)
            self._whole_sources(g, nodes)
        for ids, blocks, where, *soft in self.block_constraints:
            self._apply_blocks(ids, blocks, where, soft=bool(soft and soft[0]))
        self._apply_units()

    def positions(self, slot_or_cmap) -> tuple[np.ndarray, np.ndarray]:
        """(group id, index in group) per position; group id -1 where a position is in no group."""
        if self._elem_group is None:  # groups are final: resolve every element once, then index
            n = len(self.uf.parent)
            roots = self.uf.roots(np.arange(n, dtype=np.int64))
            table = np.full((n, 2), -1, dtype=np.int64)
            for e, r in enumerate(roots.tolist()):
                if r in self.class_index:
                    table[e] = self.class_index[r]
            self._elem_group = table
        gi = self._elem_group[slot_or_cmap.ids]
        return gi[:, 0], gi[:, 1]

    def _apply_blocks(self, ids: np.ndarray, blocks: int, where: str, soft: bool = False):
        """Positions split into ``blocks`` equal runs must keep equal counts per run: record it on the group.
        A soft constraint that cannot be met (several groups, blocks that disagree) is dropped, not frozen."""
        gid, idx = self.positions(CMap(0, ids, ids))
        tracked = sorted(set(gid.tolist()) - {-1})
        if not tracked:
            return
        g = self.groups[tracked[0]]
        if len(tracked) == 1 and not (gid < 0).any() and len(ids) == blocks * g.width and all(
                len(set(run.tolist())) == g.width for run in idx.reshape(blocks, -1)):
            return  # every piece holds the whole group (a fused gate|up chunk, gate_i * up_i): equal by itself
        if len(tracked) > 1 or (gid < 0).any() or len(set(idx.tolist())) != g.width or len(ids) != g.width:
            why = f"{where} splits channels of several groups (or fixed ones) into blocks; not supported"
        else:
            block_of = np.full(g.width, -1)
            block_of[idx] = np.arange(len(ids)) // (len(ids) // blocks)
            if g.block_of is None or _finer(g.block_of, block_of) is not None:
                g.block_of = block_of if g.block_of is None else _finer(g.block_of, block_of)
                return
            why = f"{where} needs blocks that disagree with another grouped op on the same channels"
        if soft:
            return
        for gg in tracked:
            self.groups[gg].frozen = self.groups[gg].frozen or why

    def _apply_units(self):
        """Heads split off a channel dim are kept or removed whole: the channels of one head (and of every head
        united with it: q, k, v, a grouped-query kv head and its query heads) form one unit of the group."""
        rows: dict[int, list[np.ndarray]] = {}
        for ids, where in self.unit_constraints:
            gid, idx = self.positions(CMap(0, ids.ravel(), ids.ravel()))
            tracked = sorted(set(gid.tolist()) - {-1})
            if not tracked:
                continue
            if len(tracked) > 1 or (gid < 0).any():
                for gg in tracked:
                    self.groups[gg].frozen = self.groups[gg].frozen or \
                        f"the heads of {where} hold channels of several groups (or fixed ones); not supported"
                continue
            rows.setdefault(tracked[0], []).append(idx.reshape(ids.shape))
        for gid, blocks in rows.items():
            g = self.groups[gid]
            uf = _UnionFind()
            uf.fresh(g.width)
            covered = np.zeros(g.width, dtype=bool)
            for r in blocks:
                for row in r:
                    uf.union(np.repeat(row[:1], len(row) - 1), row[1:])
                    covered[row] = True
            _, unit_of = np.unique(uf.roots(np.arange(g.width)), return_inverse=True)
            sizes = set(np.bincount(unit_of).tolist())
            why = None
            if not covered.all() or len(sizes) > 1:
                why = "its attention heads have different sizes (or some channels are in no head); not supported"
            elif g.block_of is not None and any(len(set(g.block_of[unit_of == u].tolist())) > 1
                                                for u in range(int(unit_of.max()) + 1)):
                why = "an attention head spans several blocks of a grouped op; not supported"
            if why:
                g.frozen = g.frozen or why
            else:
                g.unit_of = unit_of.astype(np.int64)

    def _find_sources(self, g: Group):
        """Which tensors the group's consumers read, and where a reconstruction T can be folded: at a source
        whose every consumer is a full linear map that sees the whole group (and reads no other source)."""
        for s in self.slots.values():
            if s.role not in ("in", "grouped_in"):
                continue
            gid, idx = self.positions(s)
            mine = gid == g.gid
            if not mine.any():
                continue
            srcs = sorted({self.source(self.data_input(user), g.gid)
                           for user in self.slot_users.get((s.fqn, s.dim), [])})
            why = None
            if not s.foldable:
                why = f"consumer {s.fqn} is not a plain linear map of its input"
            elif any(len(set(idx[mine & (s.tags == t)].tolist())) != g.width for t in np.unique(s.tags[mine])):
                why = f"consumer {s.fqn} does not read every channel of the group"
            elif len(srcs) > 1:
                why = f"weight {s.fqn} is shared by consumers that read different tensors"
            for name in srcs:
                src = g.sources.setdefault(name, Source(name))
                if s.fqn not in src.consumers:
                    src.consumers.append(s.fqn)
                src.why = src.why or why
            self.slot_source[(s.fqn, s.dim, g.gid)] = srcs[0]

    def _whole_sources(self, g: Group, nodes: dict[str, Node]):
        """A source that holds only part of the group (consumers that read a chunk, a split or a slice of it)
        moves to the nearest tensor upstream that holds the whole group, so every group has a tensor whose
        channels a method can measure (ID's Z: the ShuffleNet unit's pooled output, not its two halves). Its
        consumers take a selection either way; a foldable source already there is left alone."""
        for name in list(g.sources):
            node = nodes[name]
            if self.carries_whole(node, g.gid):
                continue
            whole = node
            while whole is not None and not self.carries_whole(whole, g.gid):
                whole = self._upstream(whole, g.gid)
            if whole is None:
                continue
            target = self.source(whole, g.gid)
            if target in g.sources and g.sources[target].foldable:
                continue
            moved = g.sources.pop(name)
            src = g.sources.setdefault(target, Source(target))
            src.consumers += [c for c in moved.consumers if c not in src.consumers]
            src.why = src.why or moved.why or "its consumers read parts of the group"
            for key, v in self.slot_source.items():
                if key[2] == g.gid and v == name:
                    self.slot_source[key] = target

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


def _finer(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The finer of two equal-size block partitions when one nests in the other (equal counts per fine block
    then give equal counts per coarse block), else None."""
    fine, coarse = (a, b) if a.max() >= b.max() else (b, a)
    nested = all(len(set(coarse[fine == k].tolist())) == 1 for k in range(int(fine.max()) + 1))
    return fine if nested else None


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
    return Analysis(gm, prune_hidden)

