"""The graph walk that builds an ``Analysis``: runs each op handler's rule over the captured graph, unites
coupled channels (union-find over channel elements), records parameter slots, barriers and block / head
constraints, then forms the groups. Everything here is mutable while the walk runs; ``Builder.result()`` hands
out the read-only ``Analysis`` (analysis.py) that the rest of fxprune queries.

The rules in rules.py receive the Builder as ``an``: they read channel maps through the same queries the result
offers, and write only through ``slot`` / ``member`` / ``barrier`` and the union-find.

Example::

    an = Builder(capture(model, x)).result()     # what analysis.analyze() does
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule, Node

from . import ops
from .analysis import (META_KEY, Analysis, Barrier, Group, Queries, Slot, Source, _flat_cmaps, _flat_nodes,
                       _where, freeze_array)
from .capture import node_module_path
from .cmap import CMap, op_name, shape_of

_TOKENS = itertools.count()
_CONSUMER_ROLES = ("in", "grouped_in")


@dataclass
class _SourceDraft:
    node: str
    consumers: list[str] = field(default_factory=list)
    why: str | None = None

    @property
    def foldable(self) -> bool:
        return self.why is None


@dataclass
class _GroupDraft:
    gid: int
    width: int
    producers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    frozen: str | None = None
    sources: dict[str, _SourceDraft] = field(default_factory=dict)
    block_of: np.ndarray | None = None
    unit_of: np.ndarray | None = None

    def done(self) -> Group:
        srcs = {k: Source(s.node, tuple(s.consumers), s.why) for k, s in self.sources.items()}
        return Group(self.gid, self.width, tuple(self.producers), tuple(self.members), tuple(self.consumers),
                     tuple(self.modules), self.frozen, srcs, freeze_array(self.block_of),
                     freeze_array(self.unit_of))


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


class Builder(Queries):
    """Walks a captured graph once (in ``__init__``); ``result()`` is the read-only Analysis."""

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
        self.param_exprs: set[Node] = set()  # ops of per-channel tensors computed from parameters (param_member)
        self.block_constraints: list[tuple] = []  # (ids in order, blocks, where[, soft: skip what cannot be met])
        self.unit_constraints: list[tuple[np.ndarray, str]] = []  # (ids as (units, unit size), where)
        self.slot_source: dict[tuple[str, int, int], str] = {}  # (consumer fqn, dim, group) -> source node
        self._aliases_init(gm)
        for node in gm.graph.nodes:
            self._visit(node)
        self._freeze_params_read_elsewhere()
        self.groups: list[_GroupDraft] = []
        self.class_index: dict[int, tuple[int, int]] = {}
        self._elem_group: np.ndarray | None = None
        self._build_groups()

    def result(self) -> Analysis:
        """The walk's findings, read-only: frozen dataclasses, tuples and mapping proxies."""
        for s in self.slots.values():  # the channel maps in node.meta share these arrays: read-only there too
            freeze_array(s.ids)
            freeze_array(s.tags)
        return Analysis(
            self.gm, self.token, self.prune_hidden, [g.done() for g in self.groups], self.slots,
            {k: tuple(v) for k, v in self.slot_users.items()}, {k: tuple(v) for k, v in self.param_users.items()},
            self.barriers, self.barrier_nodes, self.slot_source, self.rms_norms, self.head_norms, self.selections,
            self.aliases, self._elem_table())

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
            self.slots[key] = dataclasses.replace(s, foldable=s.foldable and foldable)
            return CMap(0, s.ids, s.tags)
        if cm is None:
            cm = CMap(0, self.uf.fresh(size), np.zeros(size, dtype=np.int64))
        self.slots[key] = Slot(fqn, dims[dim], role, cm.ids, cm.tags, node.name, foldable, lookup)
        return cm

    def param_member(self, node: Node, arg, dim: int, cm: CMap) -> bool:
        """Slot the parameters behind ``arg`` (a parameter, or a per-channel tensor computed from parameters
        alone: param_leaves) as members following channels ``cm``; False when ``arg`` is neither. The ops of
        the computation are remembered, so that a parameter read only through them is not "read elsewhere"."""
        leaves = self.param_leaves(arg, dim)
        if leaves is None:
            return False
        for leaf, leaf_dim in leaves:
            self.slot(node, leaf, leaf_dim, "member", cm)
        todo = [arg]
        while todo:
            n = todo.pop()
            if isinstance(n, Node) and n.op == "call_function" and self.param_view(n) is None \
                    and n not in self.param_exprs:
                self.param_exprs.add(n)
                todo += n.all_input_nodes
        return True

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
        """The ops that read a parameter node, looking through layout-only views of it and through the
        per-channel computations param_member took it from (their readers must be slots' users too)."""
        for user in node.users:
            if user in self.param_exprs or user.op == "call_function" and user.args and user.args[0] is node \
                    and self.param_view(user) is not None:
                yield from self._readers(user)
            else:
                yield user

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
            g = _GroupDraft(gid=len(self.groups), width=len(classes))
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

    def _elem_table(self) -> np.ndarray:
        """(group id, index) per union-find element, -1 where it is in no group; built once the groups are final."""
        if self._elem_group is None:
            n = len(self.uf.parent)
            roots = self.uf.roots(np.arange(n, dtype=np.int64))
            table = np.full((n, 2), -1, dtype=np.int64)
            for e, r in enumerate(roots.tolist()):
                if r in self.class_index:
                    table[e] = self.class_index[r]
            self._elem_group = table
        return self._elem_group

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
                src = g.sources.setdefault(name, _SourceDraft(name))
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
            src = g.sources.setdefault(target, _SourceDraft(target))
            src.consumers += [c for c in moved.consumers if c not in src.consumers]
            src.why = src.why or moved.why or "its consumers read parts of the group"
            for key, v in self.slot_source.items():
                if key[2] == g.gid and v == name:
                    self.slot_source[key] = target


def _finer(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The finer of two equal-size block partitions when one nests in the other (equal counts per fine block
    then give equal counts per coarse block), else None."""
    fine, coarse = (a, b) if a.max() >= b.max() else (b, a)
    nested = all(len(set(coarse[fine == k].tolist())) == 1 for k in range(int(fine.max()) + 1))
    return fine if nested else None
