"""Analysis: which channels are coupled, as groups with index maps, and which are frozen and why.

Every tensor node gets a channel map (``CMap``): the dim that carries channels and, per position along it, an
element id (and a tag: the spatial sub-position once C*H*W features are flattened). Producers (conv/linear
outputs) mint fresh elements; ops from the table in ops.py move, slice, concatenate or unite them; anything not
in the table is a barrier that freezes what reaches it. Union-find over elements gives channel classes;
classes minted by the same producer form a group, and every parameter dim that carries channels (a ``Slot``)
maps its positions to (group, index).

Example::

    an = analyze(capture(model, x))
    for g in an.groups:
        print(g.describe())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule, Node

from .capture import node_module_path
from .ops import barrier_reason, op_name, rule_for

# ops between Z and a consumer that commute with a channel-linear map Z -> Z[:, keep] @ T
COMMUTING = {"aten.avg_pool1d", "aten.avg_pool2d", "aten.avg_pool3d", "aten.adaptive_avg_pool1d",
             "aten.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d", "aten.mean", "aten.sum", "aten.view",
             "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.squeeze", "aten.unsqueeze",
             "aten.dropout", "aten.clone", "aten.contiguous", "aten.alias",
             "aten.upsample_nearest2d", "aten.upsample_bilinear2d", "aten.permute", "aten.transpose"}


@dataclass
class CMap:
    """Channel map of one tensor: which dim carries channels, and the element id at each position."""
    dim: int
    ids: np.ndarray
    tags: np.ndarray

    def with_dim(self, dim: int) -> "CMap":
        return CMap(dim, self.ids, self.tags)


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

    def freeze(self, ids: np.ndarray, why: str):
        for i in ids.tolist():
            self.reason.setdefault(self.find(i), why)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(i) for i in ids.tolist()), dtype=np.int64, count=len(ids))


def concrete(size) -> int:
    """A dim size as an int; symbolic (batch) sizes become a large odd stand-in so they never equal a width."""
    if isinstance(size, int):
        return size
    try:
        expr = size.node.expr
        return int(expr.subs({s: 1_000_003 + 2 * i for i, s in enumerate(sorted(expr.free_symbols, key=str))}))
    except Exception:  # noqa: BLE001
        return 1_000_003


def shape_of(node) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return [concrete(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def _where(node: Node) -> str:
    mod = node_module_path(node)
    return f"node '{node.name}'" + (f" in module '{mod}'" if mod else "")


class Analysis:
    """Runs the rules over a captured graph; result in ``groups``, ``slots`` and ``cmaps``."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.uf = _UnionFind()
        self.cmaps: dict[Node, object] = {}
        self.slots: dict[tuple[str, int], Slot] = {}
        self.barrier_nodes: list[Node] = []
        self.param_users: dict[str, list[Node]] = {}
        self.block_constraints: list[tuple[np.ndarray, int, str]] = []  # (ids in order, blocks, where)
        self.slot_source: dict[tuple[str, int, int], str] = {}  # (consumer fqn, dim, group) -> source node
        from . import rules  # the rule functions, one per rule name in ops.py
        self._rules = rules.RULES
        for node in gm.graph.nodes:
            self._visit(node)
        self._freeze_params_at_barriers()
        self.groups: list[Group] = []
        self.class_index: dict[int, tuple[int, int]] = {}
        self._elem_group: np.ndarray | None = None
        self._build_groups()

    # ---- graph walk -------------------------------------------------------------------------------------
    def _visit(self, node: Node):
        if node.op == "placeholder" or node.op == "get_attr":
            self.cmaps[node] = None  # model inputs and raw parameters carry no tracked channels
        elif node.op == "output":
            for arg in _flat_nodes(node.args):
                for cm in _flat_cmaps(self.cmaps.get(arg)):
                    self.uf.freeze(cm.ids, "reaches the model output (its width is part of the interface)")
        elif node.op == "call_function":
            rule = rule_for(node.target)
            if rule == "ignore":
                self.cmaps[node] = None
            elif rule is None:
                self.barrier(node, barrier_reason(node.target))
            else:
                self.cmaps[node] = self._rules[rule](self, node)
        else:  # call_module (guards) / call_method: nothing tracked flows through
            if isinstance(node.meta.get("val"), torch.Tensor):
                self.barrier(node, f"{node.op} {node.target} is opaque to the analysis")
            else:
                self.cmaps[node] = None

    # ---- helpers the rules use ----------------------------------------------------------------------------
    def cmap(self, arg) -> CMap | None:
        cm = self.cmaps.get(arg) if isinstance(arg, Node) else None
        return cm if isinstance(cm, CMap) else None

    def barrier(self, node: Node, why: str) -> None:
        why = f"{why} ({_where(node)})"
        for arg in _flat_nodes(node.args) + _flat_nodes(node.kwargs):
            for cm in _flat_cmaps(self.cmaps.get(arg)):
                self.uf.freeze(cm.ids, why)
        self.barrier_nodes.append(node)
        self.cmaps[node] = None

    def param_fqn(self, arg) -> str | None:
        return arg.target if isinstance(arg, Node) and arg.op == "get_attr" else None

    def slot(self, node: Node, arg, dim: int, role: str, cm: CMap | None, foldable: bool = True):
        """Record that parameter ``arg``'s dim ``dim`` carries channels ``cm`` (a fresh map if cm is None).
        A parameter used twice (shared weights) unites the channels of both uses. Returns the slot's CMap."""
        fqn = self.param_fqn(arg)
        if fqn is None:
            return cm
        users = self.param_users.setdefault(fqn, [])
        if node not in users:
            users.append(node)
        size = shape_of(arg)[dim]
        key = (fqn, dim)
        if key in self.slots:
            s = self.slots[key]
            if cm is not None and len(cm.ids) == len(s.ids) and np.array_equal(cm.tags, s.tags):
                self.uf.union(s.ids, cm.ids)
            elif cm is not None:
                self.uf.freeze(np.concatenate([s.ids, cm.ids]), f"parameter {fqn} is shared by uses that disagree")
            s.foldable = s.foldable and foldable
            return CMap(0, s.ids, s.tags)
        if cm is None:
            cm = CMap(0, self.uf.fresh(size), np.zeros(size, dtype=np.int64))
        self.slots[key] = Slot(fqn, dim, role, cm.ids, cm.tags, node.name, foldable)
        return cm

    def _freeze_params_at_barriers(self):
        # A parameter that a barrier also reads cannot be sliced without breaking that op.
        for node in self.barrier_nodes:
            for arg in _flat_nodes(node.args):
                fqn = self.param_fqn(arg)
                for (f, _), s in self.slots.items():
                    if f == fqn:
                        self.uf.freeze(s.ids, f"parameter {fqn} is also read by {_where(node)}")

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
            g.frozen = reasons[0] if reasons else None
            self.groups.append(g)
        for s in self.slots.values():
            for gid in sorted({self.class_index[r][0] for r in uf.roots(s.ids).tolist() if r in self.class_index}):
                g = self.groups[gid]
                {"out": g.producers, "member": g.members, "in": g.consumers, "grouped_in": g.consumers}[s.role].append(s.fqn)
                if s.role == "out":
                    mod = s.fqn.rsplit(".", 1)[0]
                    if mod not in g.modules:
                        g.modules.append(mod)
        for g in self.groups:
            self._find_sources(g)
        for ids, blocks, where in self.block_constraints:
            self._apply_blocks(ids, blocks, where)

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

    def _apply_blocks(self, ids: np.ndarray, blocks: int, where: str):
        """Positions split into ``blocks`` equal runs must keep equal counts per run: record it on the group."""
        gid, idx = self.positions(CMap(0, ids, ids))
        tracked = sorted(set(gid.tolist()) - {-1})
        if not tracked:
            return
        g = self.groups[tracked[0]]
        if len(tracked) > 1 or (gid < 0).any() or len(set(idx.tolist())) != g.width or len(ids) != g.width:
            why = f"{where} splits channels of several groups (or fixed ones) into blocks; not supported"
        else:
            block_of = np.full(g.width, -1)
            block_of[idx] = np.arange(len(ids)) // (len(ids) // blocks)
            if g.block_of is None or _finer(g.block_of, block_of) is not None:
                g.block_of = block_of if g.block_of is None else _finer(g.block_of, block_of)
                return
            why = f"{where} needs blocks that disagree with another grouped op on the same channels"
        for gg in tracked:
            self.groups[gg].frozen = self.groups[gg].frozen or why

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
            srcs = sorted({self.source(user.args[0], g.gid) for user in self.param_users.get(s.fqn, [])})
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

    def source(self, node: Node, gid: int) -> str:
        while node.op == "call_function":
            name = op_name(node.target)
            if name == "aten.cat":
                carriers = {a for a in node.args[0] if self._carries(a, gid)}
                if len(carriers) != 1:
                    break
                node = carriers.pop()
            elif name in COMMUTING or _zero_pad(node):
                node = node.args[0]
            else:
                break
        return node.name

    def _carries(self, node, gid: int) -> bool:
        cm = self.cmap(node)
        return cm is not None and bool((self.positions(cm)[0] == gid).any())


def _finer(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The finer of two equal-size block partitions when one nests in the other (equal counts per fine block
    then give equal counts per coarse block), else None."""
    fine, coarse = (a, b) if a.max() >= b.max() else (b, a)
    nested = all(len(set(coarse[fine == k].tolist())) == 1 for k in range(int(fine.max()) + 1))
    return fine if nested else None


def _zero_pad(node: Node) -> bool:
    name = op_name(node.target)
    if name == "aten.constant_pad_nd":
        return (node.args[2] if len(node.args) > 2 else 0) == 0
    if name == "aten.pad":
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and not value
    return False


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


def analyze(gm: GraphModule) -> Analysis:
    """Run the channel analysis on a captured GraphModule."""
    return Analysis(gm)


def prod(xs) -> int:
    return math.prod(xs) if xs else 1
