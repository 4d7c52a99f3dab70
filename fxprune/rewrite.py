"""The one rewrite engine: decisions {group id: Decision(keep, T)} -> physically smaller tensors.

Producers' rows and every per-channel parameter that follows them (bias, BatchNorm, depthwise kernels) are
sliced to ``keep``; consumers fold T (Z ~ Z[:, keep] @ T) into their input dim; module attributes and graph
shape constants (view sizes, split sizes, slice bounds, depthwise ``groups``) are updated. Methods never edit
tensors: this file is the only place that does.

Example::

    plan = Plan(analysis, {3: Decision(keep=np.array([0, 2, 5]), T=None)})
    slim_gm, slim_model = plan.slim(gm, model)   # copies; edits by parameter FQN and graph constants
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from . import hf, modules
from .analysis import Analysis, Slot
from .capture import node_module_path
from .errors import RewriteError
from .ops import node_handler


@dataclass
class Decision:
    """What a method decides for one group: the kept channel indices (sorted) and how the consumers rebuild
    the removed ones. ``T`` is a k x n reconstruction matrix (consumers see Z[:, keep] @ T), either one for every
    tensor the group's consumers read, or ``{source node: T_j}`` per source (``Group.sources``); None, or a
    source left out, means a plain selection there. ``info`` is free-form report data (scores, errors, ...)."""
    keep: np.ndarray
    T: np.ndarray | dict[str, np.ndarray] | None = None
    info: dict = field(default_factory=dict)

    def T_for(self, source: str) -> np.ndarray | None:
        """The reconstruction matrix the consumers reading ``source`` fold (None: a selection)."""
        T = self.T.get(source) if isinstance(self.T, dict) else self.T
        return None if T is None or _is_selection(T, self.keep) else T

    def is_selection(self) -> bool:
        if isinstance(self.T, dict):
            return all(_is_selection(T, self.keep) for T in self.T.values() if T is not None)
        return self.T is None or _is_selection(self.T, self.keep)


def _is_selection(T: np.ndarray, keep: np.ndarray) -> bool:
    sel = np.zeros(np.shape(T))
    sel[np.arange(len(keep)), keep] = 1.0
    return np.array_equal(T, sel)


def segments(gid: np.ndarray, idx: np.ndarray, tags: np.ndarray) -> dict[tuple, np.ndarray]:
    """Positions grouped by (group, tag, copy); a concat of the same tensor twice gives copies 0 and 1.
    Within a segment positions are ordered by group index, so a complete one is indexable by channel."""
    seen: dict[tuple, int] = {}
    out: dict[tuple, list] = {}
    for p, (g, i, t) in enumerate(zip(gid.tolist(), idx.tolist(), tags.tolist())):
        if g < 0:
            continue
        c = seen.get((g, i, t), 0)
        seen[(g, i, t)] = c + 1
        out.setdefault((g, t, c), []).append((i, p))
    return {k: np.array([p for _, p in sorted(v)], dtype=np.int64) for k, v in out.items()}


class Plan:
    """Validated decisions plus the index bookkeeping every edit needs. One per prune: reconstruction folds its
    T into it (``fold``, validated like the method's own); ``frozen``: the job's frozen groups (the analysis'
    own are refused too)."""

    def __init__(self, an: Analysis, decisions: dict[int, Decision], frozen: Mapping[int, str] | None = None):
        self.an = an
        self._frozen = dict(frozen or {})
        self._decisions = {g: self._check(g, d) for g, d in decisions.items()}
        self.keep_mask = {g: np.isin(np.arange(an.groups[g].width), d.keep) for g, d in self.decisions.items()}
        self._kept = an.kept_lookup(self.keep_mask)
        for s in an.slots.values():  # torch has no 0-channel conv/linear: refuse before anything is edited
            if s.role in ("out", "in", "grouped_in") and len(s.ids) and not self.kept_positions(s).any():
                raise RewriteError(f"these decisions remove every channel of {s.fqn} (dim {s.dim}); keep at "
                                   "least one channel that it produces or reads")

    def _check(self, gid: int, d: Decision) -> Decision:
        if not 0 <= gid < len(self.an.groups):
            raise RewriteError(f"decision for unknown group {gid}")
        g = self.an.groups[gid]
        keep = np.asarray(d.keep, dtype=np.int64)
        if g.frozen or gid in self._frozen:
            raise RewriteError(f"group {gid} is frozen ({g.frozen or self._frozen[gid]}); a method must not "
                               "decide for it")
        if keep.ndim != 1 or len(keep) == 0 or np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= g.width:
            raise RewriteError(f"group {gid}: keep must be sorted unique indices in [0, {g.width}), at least one")
        if g.block_of is not None and len(set(np.bincount(g.block_of[keep], minlength=g.blocks).tolist())) != 1:
            raise RewriteError(f"group {gid}: its {g.blocks} blocks (a grouped conv or chunk) must each keep the "
                               "same number of channels")
        if g.unit_of is not None:
            counts = np.bincount(g.unit_of[keep], minlength=g.width // g.unit_size)
            cut = np.flatnonzero((counts != 0) & (counts != g.unit_size))
            if len(cut):
                raise RewriteError(f"group {gid} ({', '.join(g.modules)}): its attention heads ({g.unit_size} channels "
                                   f"each) are kept or removed whole, but keep cuts head(s) "
                                   f"{', '.join(map(str, cut[:8].tolist()))} inside")
        return Decision(keep, self._check_T(gid, keep, d.T), d.info)

    @property
    def decisions(self) -> Mapping[int, Decision]:
        return MappingProxyType(self._decisions)

    def fold(self, gid: int, src: str, T: np.ndarray, err: float) -> None:
        """Replace group ``gid``'s T at source ``src`` (reconstruction's least-squares fit; its relative error
        goes in the decision's info), validated as a method's T is."""
        d = self._decisions[gid]
        Ts = {**(d.T if isinstance(d.T, dict) else {}), src: T}
        info = {**d.info, "recon_error": {**d.info.get("recon_error", {}), src: err}}
        self._decisions[gid] = Decision(d.keep, self._check_T(gid, d.keep, Ts), info)

    def _check_T(self, gid: int, keep: np.ndarray, T) -> dict[str, np.ndarray] | None:
        """Normalize T to {source: non-selection T}; refuse a T where the consumers cannot absorb it."""
        g = self.an.groups[gid]
        if T is None:
            return None
        if not isinstance(T, dict):
            T = dict.fromkeys(g.sources, T)
        out = {}
        for src, t in T.items():
            if src not in g.sources:
                raise RewriteError(f"group {gid}: T given for '{src}', which no consumer of the group reads; "
                                   f"its sources are {', '.join(g.sources) or 'none'}")
            if t is None:
                continue
            t = np.asarray(t, dtype=np.float64)
            if t.shape != (len(keep), g.width):
                raise RewriteError(f"group {gid}: T must be {len(keep)} x {g.width}, got {t.shape}")
            if not np.isfinite(t).all():
                raise RewriteError(f"group {gid}: T for '{src}' has NaN or inf entries")
            if _is_selection(t, keep):
                continue
            if not g.sources[src].foldable:
                raise RewriteError(
                    f"group {gid} ({', '.join(g.modules)}) cannot absorb a reconstruction matrix T at '{src}': "
                    f"{g.sources[src].why}. Use a selection there (leave that source out of T, or T=None).")
            out[src] = t
        return out or None

    # ---- per-position masks ------------------------------------------------------------------------------
    def kept_positions(self, ids_holder) -> np.ndarray:
        return self._kept(ids_holder)

    def new_size(self, ids_holder) -> int:
        return int(self.kept_positions(ids_holder).sum())

    # ---- parameters ---------------------------------------------------------------------------------------
    def new_tensor(self, s: Slot, tensor: torch.Tensor) -> torch.Tensor:
        kept = self.kept_positions(s)
        if s.role == "grouped_in":
            return _slice_grouped_inputs(tensor, kept)
        index = torch.as_tensor(np.flatnonzero(kept), device=tensor.device)
        out = tensor.index_select(s.dim, index)
        if s.role == "member" and s.fqn in self.rms_weights:  # an RMSNorm's weight: * sqrt(n / k) (rules._rms_norm)
            out = (out.double() * (len(kept) / int(kept.sum())) ** 0.5).to(out.dtype)
        if s.role in ("out", "member") and s.node in self.norm_producers:  # rows a norm alone reads: * sqrt(k / n)
            out = (out.double() * self.norm_producers[s.node] ** 0.5).to(out.dtype)
        if self._head_norm_input(s):  # see head_norm_ratio
            out = (out.double() * self.head_norm_ratio ** 0.5).to(out.dtype)
        if s.role != "in":
            return out
        slim_pos = np.cumsum(kept) - 1
        gid, idx = self.an.positions(s)
        for (g, _, _), P in segments(gid, idx, s.tags).items():
            T = self.T_at(s, g)
            if T is None:
                continue
            d = self.decisions[g]
            Q = torch.as_tensor(slim_pos[P[d.keep]], device=tensor.device)
            W = tensor.index_select(s.dim, torch.as_tensor(P, device=tensor.device)).movedim(s.dim, -1)
            folded = (W.double() @ torch.as_tensor(T.T, device=tensor.device)).to(tensor.dtype).movedim(-1, s.dim)
            out.index_copy_(s.dim, Q, folded)
        return out

    def T_at(self, s: Slot, gid: int) -> np.ndarray | None:
        """The T that consumer slot ``s`` folds for group ``gid`` (None: selection or not decided)."""
        d = self.decisions.get(gid)
        src = self.an.slot_source.get((s.fqn, s.dim, gid))
        return None if d is None or src is None else d.T_for(src)

    def norm_eps(self, name: str) -> float | None:
        """The slim eps of the RMSNorm whose mean is node ``name`` (rules._rms_norm): eps * n / k over the hidden
        size; a per-head norm's eps * r when head_norm_ratio applies; None when it stays."""
        an = self.an
        if name in getattr(an, "rms_norms", {}):
            r = an.rms_norms[name]
            return None if r["producer"] else r["eps"] * len(r["cmap"].ids) / self.new_size(r["cmap"])
        if name in getattr(an, "head_norms", {}) and self.head_norm_ratio is not None:
            return an.head_norms[name]["eps"] * self.head_norm_ratio
        return None

    @property
    def head_norm_ratio(self) -> float | None:
        """r = n / k of a pruned hidden size when per-head RMSNorms (Qwen3's q_norm / k_norm over head_dim) have
        the same eps as the hidden-size norms (one config eps serves both): their eps becomes eps * r too and
        their inputs (the q / k projections' rows) are scaled by sqrt(r), which leaves each norm's output exactly
        as it was (x / sqrt(mean(x^2) + eps) is unchanged under x -> c x, eps -> c^2 eps), so the config's one
        eps * r rebuilds every norm on from_pretrained."""
        if "_head_ratio" not in self.__dict__:
            an, r = self.an, None
            norms, heads = getattr(an, "rms_norms", {}), getattr(an, "head_norms", {})
            norms = [x for x in norms.values() if not x["producer"]]  # the ones whose eps changes
            if norms and heads:
                ratios = {len(x["cmap"].ids) / self.new_size(x["cmap"]) for x in norms}
                eps = {x["eps"] for x in norms} | {x["eps"] for x in heads.values()}
                if len(ratios) == 1 and len(eps) == 1 and ratios != {1.0}:
                    r = ratios.pop()
            self._head_ratio = r
            self._head_inputs = [frozenset(x["cmap"].ids.tolist()) for x in heads.values()] if r else []
        return self._head_ratio

    def compared_at(self, node) -> str | None:
        """Where verification compares a node the reference hooks: an RMSNorm's mean at the norm's output; a
        projection scaled for a per-head norm (head_norm_ratio) nowhere of its own (it differs by sqrt(r) by
        design; the attention's output projection and the model outputs are compared); else the node itself."""
        an = self.an
        if node.name in getattr(an, "rms_norms", {}):
            return an.rms_norms[node.name]["out"]
        if node.name in self.norm_producers:  # scaled by sqrt(k / n) by design; the norm's output is compared
            return None
        cm = an.cmap(node) if self.head_norm_ratio is not None else None
        if cm is not None:
            ids = frozenset(cm.ids.tolist())
            for x in an.head_norms.values():
                if frozenset(x["cmap"].ids.tolist()) == ids:
                    return None
        return node.name

    def _head_norm_input(self, s: Slot) -> bool:
        """Whether slot ``s`` (a projection's rows, or their bias) produces the input of a per-head norm."""
        return self.head_norm_ratio is not None and s.role in ("out", "member") and \
            frozenset(s.ids.tolist()) in self._head_inputs

    @property
    def norm_producers(self) -> dict[str, float]:
        """Producer node -> k / n for the RMSNorms that alone read a conv / linear's output (rules._private_producer):
        those rows are scaled by sqrt(k / n) and the norm keeps its eps."""
        if "_norm_producers" not in self.__dict__:  # the kept channels are fixed once the plan is made
            self._norm_producers = {r["producer"]: self.new_size(r["cmap"]) / len(r["cmap"].ids)
                                    for r in getattr(self.an, "rms_norms", {}).values() if r["producer"]}
        return self._norm_producers

    @property
    def rms_weights(self) -> set[str]:
        """The weights of the RMSNorms that take a selection (rules._rms_norm), rescaled when sliced."""
        return {r["weight"] for r in getattr(self.an, "rms_norms", {}).values()}

    @property
    def slots_by_fqn(self) -> dict[str, list[Slot]]:
        if "_by_fqn" not in self.__dict__:
            by_fqn: dict[str, list[Slot]] = {}
            for s in self.an.slots.values():
                by_fqn.setdefault(s.fqn, []).append(s)
            self._by_fqn = by_fqn
        return self._by_fqn

    def touched(self) -> list[str]:
        """Canonical names of the tensors the decisions change (each slimmed once, shared by its tied names)."""
        if "_touched" not in self.__dict__:
            decided = list(self.decisions)
            self._touched = [fqn for fqn, slots in self.slots_by_fqn.items()
                             if any(bool(np.isin(self.an.positions(s)[0], decided).any()) for s in slots)]
        return self._touched

    def slim_tensor(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        """The slim version of a full-width tensor known by ``fqn`` (a new tensor; ``tensor`` itself when the
        decisions do not touch it)."""
        new = tensor.detach()
        with torch.no_grad():
            for s in self.slots_by_fqn.get(self.an.canonical(fqn), []):
                new = self.new_tensor(s, new)
        return new

    def slim_values(self, source: nn.Module) -> dict[str, torch.Tensor]:
        """{canonical name: slim tensor} for every touched tensor, each built exactly once from ``source`` (a
        full-width module: the user's model or the captured graph). Parameters stay parameters."""
        out = {}
        for fqn in self.touched():
            old = _get(source, fqn)
            new = self.slim_tensor(fqn, old)  # a new tensor: every touched name has a slot that slices it
            out[fqn] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        return out

    def apply_params(self, module: nn.Module, values: dict[str, torch.Tensor] | None = None):
        """Replace every touched parameter/buffer of ``module`` (found by FQN) by its slim version (``values``:
        the ones slim_values built, shared; else built from ``module`` itself), then fix width attributes."""
        values = self.slim_values(module) if values is None else values
        for fqn, new in values.items():
            for name in self.an.aliases.get(fqn, [fqn]):  # tied weights stay one tensor
                _put(module, name, new)
        for mod in module.modules():
            update_attributes(mod)
        self.fix_modules(module)

    def replace_tensors(self, module: nn.Module, values: dict[str, torch.Tensor]):
        """Copy full-width values (e.g. re-estimated BatchNorm statistics, keyed by FQN) into a slimmed module,
        sliced the way the rewrite sliced each tensor."""
        for fqn, value in values.items():
            new = self.slim_tensor(fqn, value)
            with torch.no_grad():
                _get(module, fqn).copy_(new)

    def slim(self, gm: torch.fx.GraphModule, model: nn.Module) -> tuple[torch.fx.GraphModule, nn.Module]:
        """Slimmed copies of the analysed graph and of the eager model; neither input is changed (see build)."""
        slim_gm, eager, _ = self.build(gm, model)
        return slim_gm, eager

    def build(self, gm: torch.fx.GraphModule, model: nn.Module
              ) -> tuple[torch.fx.GraphModule, nn.Module, dict[str, torch.Tensor]]:
        """The slim graph and a slim copy of the eager model; neither input is changed.

        Each touched tensor is sliced/folded exactly once (slim_values, from ``model``) into a new tensor that the
        slim model and the slim graph share; every untouched tensor is copied once (the slim model must not alias
        the user's) and shared the same way. So the extra memory is the slim model's own size, nothing twice.
        Returns (slim graph, slim model, the slim values)."""
        values = self.slim_values(model)
        memo = {}
        for fqn, new in values.items():
            for name in self.an.aliases.get(fqn, [fqn]):
                memo[id(_get(model, name))] = new
        eager = _deepcopy(model, memo)  # untouched tensors: one copy each (deepcopy keeps ties)
        self.apply_params(eager, values)
        # the graph holds the same tensor objects as the model (torch.export unlifts them): map each to the slim
        # model's tensor of the same name
        slim_gm = copy_structure(gm, lambda name, t: values[self.an.canonical(name)]
                                 if self.an.canonical(name) in values else _find(eager, name))
        self.apply_params(slim_gm, values)
        self.fix_graph(slim_gm)
        return slim_gm, eager, values

    def graph_only(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """The slim graph's structure (shape constants rewritten) still holding ``gm``'s full-width tensors, none
        copied: inplace=True verifies it with each touched tensor slimmed as it is read (verify(lazy=True)), and
        gives it the user's slim tensors afterwards (transplant.slim_in_place)."""
        slim_gm = copy_structure(gm, lambda name, t: t)
        self.fix_graph(slim_gm)
        return slim_gm

    def skeleton(self, model: nn.Module, values: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The slim eager model's structure without its data: a copy of ``model`` whose touched tensors are meta
        tensors of their slim shape and whose other tensors are ``model``'s own, shared (read only), or a copy of
        ``values[fqn]`` (re-estimated statistics); width attributes fixed as in build. Its forward runs with each
        module's slim tensors computed for that forward alone (lazy.Materializer)."""
        values = values or {}
        slim, memo = {}, {}
        for fqn in self.touched():
            old = _get(model, fqn)
            new = self.slim_tensor(fqn, old.detach().to("meta"))  # the shape, no data
            slim[fqn] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
            for name in self.an.aliases.get(fqn, [fqn]):
                memo[id(_get(model, name))] = slim[fqn]
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if id(t) not in memo:
                v = values.get(self.an.canonical(name))
                memo[id(t)] = t if v is None else v.detach().clone()
        eager = _deepcopy(model, memo)
        self.apply_params(eager, slim)
        return eager

    # ---- graph constants ----------------------------------------------------------------------------------
    def fix_graph(self, gm: torch.fx.GraphModule):
        """Rewrite shape constants that carry a pruned width (each op handler's fix_shape), then recompile.
        ``gm`` is the analysed graph or a copy of it: the channel maps travel in node.meta."""
        for node in gm.graph.nodes:
            h = node_handler(node)
            if h is not None and h.fix_shape is not None:
                h.fix_shape(self, node)
        gm.recompile()

    def fix_modules(self, module: nn.Module):
        """Width attributes of the modules that issued a node whose handler knows them (fix_module)."""
        mods = dict(module.named_modules())
        for node in self.an.gm.graph.nodes:
            h = node_handler(node)
            if h is not None and h.fix_module is not None and node_module_path(node) in mods:
                h.fix_module(self, node, mods[node_module_path(node)])
        for mod in mods.values():
            hf.update_config(mod)


def _deepcopy(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy of the user's model (fxprune never edits the original); ``memo`` maps tensors to what the copy
    holds instead (their slim versions, so the full-width ones are never copied). An attribute that cannot be
    copied is named in the error."""
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - find the culprit for the message
        for name, mod in model.named_modules():
            for attr, value in vars(mod).items():
                if attr.startswith("_") and attr not in ("_parameters", "_buffers"):
                    continue
                try:
                    copy.deepcopy(value)
                except Exception:  # noqa: BLE001
                    where = f"{name}.{attr}" if name else attr
                    raise RewriteError(
                        f"fxprune works on a copy of the model, and attribute '{where}' ({type(value).__name__}) "
                        f"cannot be deep-copied ({type(exc).__name__}: {exc}). Make it copyable (define "
                        "__deepcopy__, or keep it outside the module) and prune again") from None
        raise RewriteError(f"fxprune works on a copy of the model, and copy.deepcopy failed: "
                           f"{type(exc).__name__}: {exc}") from None


def copy_structure(gm: torch.fx.GraphModule, tensor_for) -> torch.fx.GraphModule:
    """A deep copy of a GraphModule whose parameters and buffers are not copied: ``tensor_for(name, tensor)``
    says what the copy holds (the same tensor, a slim one, ...; None: a copy)."""
    memo = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        new = tensor_for(name, t)
        if new is not None:
            memo[id(t)] = new
    with warnings.catch_warnings():  # deep-copying an exported module warns about pytree internals
        warnings.simplefilter("ignore")
        return copy.deepcopy(gm, memo)


def _find(module: nn.Module, name: str):
    try:
        return _get(module, name)
    except AttributeError:  # a tensor the graph holds under a name the module does not have: copied
        return None


def _slice_grouped_inputs(w: torch.Tensor, kept: np.ndarray) -> torch.Tensor:
    """A grouped conv's weight (Cout, Cin/G, ...): each output row keeps the inputs kept in its own group."""
    groups = len(kept) // w.shape[1]
    local = kept.reshape(groups, w.shape[1])
    per_group = [np.flatnonzero(row) for row in local]
    if len({len(p) for p in per_group}) != 1:
        raise RewriteError("a grouped convolution's groups would keep different numbers of input channels")
    rows_per_group = w.shape[0] // groups
    index = torch.as_tensor(np.stack([per_group[r // rows_per_group] for r in range(w.shape[0])]))
    index = index.reshape(*index.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
    return w.gather(1, index.to(w.device))


def _get(module: nn.Module, name: str):
    owner_path, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner_path), attr)


def _put(module: nn.Module, name: str, value: torch.Tensor):
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    if isinstance(value, nn.Parameter):
        setattr(owner, attr, value)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:  # a plain tensor attribute
        setattr(owner, attr, value)


def update_attributes(mod: nn.Module):
    """Keep a module's size attributes (used by repr, state-dict loading, F.* calls) true: the module table's
    resize (fxprune/modules.py). Norms without a per-channel tensor (InstanceNorm2d(affine=False)) are updated
    from the graph: Plan.fix_modules."""
    modules.resize(mod)
