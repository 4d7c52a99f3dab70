"""Freeze and retry: what to do when the user's eager forward cannot follow a pruned width.

Verification runs the slimmed eager module against the slim graph; a module whose forward reads a width the
rewrite did not change (``x.split(self.expand_chs // 2)``, ``reshape(B, N, self.num_heads, C // self.num_heads)``,
``F.conv2d(x, w, groups=self.channels)``) fails there, and ``VerificationError.module`` names it. Instead of
refusing the whole model, stages.finish asks ``next_step``:

1. update: the module's own int attributes that equal a width the rewrite changed, where the graph maps that
   old width to exactly one new width (stored_width_updates); applied to the slim copy, kept only if the next
   verification passes;
2. freeze: else the decided groups that the module's own shape-carrying ops read (a split, view, slice or
   grouped conv it issued) are frozen with the reason, and the method decides again for the rest, to the same
   target; if the module still fails, every decided group whose channels reach it (its parameters, the ops it
   and its children issued and their inputs).

A bounded number of rounds; the user's model is never touched (every round works on fresh copies), and
``strict=True`` keeps the refusal. The frozen groups are an overlay on the job (``Retry.frozen``), frozen on its
PruneContext (``PruneContext.freeze``; the analysis is read-only) before the method decides again.

Example::

    retry = Retry()
    step = next_step(retry, exc, plan, old_gm, slim_gm, work)   # "update", "freeze" or None (give up)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .analysis import _flat_cmaps
from .capture import node_module_path
from .modules import adapter
from .ops import node_handler

MAX_ROUNDS = 4


@dataclass
class Retry:
    rounds: int = 0
    frozen: dict[int, str] = field(default_factory=dict)      # group id -> why verification froze it
    update_modules: set[str] = field(default_factory=set)      # modules whose stored widths are being updated
    failed_updates: set[str] = field(default_factory=set)      # updated once, still failed: freeze next time
    updated: list[str] = field(default_factory=list)           # "module.attr: old -> new" in the result
    narrowed: set[str] = field(default_factory=set)            # modules whose shape-op groups were frozen once


def next_step(retry: Retry, exc, plan, old_gm, slim_gm, work: nn.Module) -> str | None:
    """Decide how to go on after an eager-forward failure; None when nothing can be done (then it is raised)."""
    if getattr(exc, "kind", None) != "eager" or exc.module is None or retry.rounds >= MAX_ROUNDS:
        return None
    name = exc.module
    for owner in _self_and_parents(name):  # a conv fails on what its parent's forward split by a stored width
        if owner in retry.update_modules:
            retry.update_modules.discard(owner)
            retry.failed_updates.add(owner)
            break
        if owner not in retry.failed_updates and stored_width_updates(plan, old_gm, slim_gm, work, owner):
            retry.update_modules.add(owner)
            retry.rounds += 1
            return "update"
    narrow = [g for g in groups_shaped_by(plan.an, name) if g in plan.decisions]
    if narrow and name not in retry.narrowed:  # first the groups its own split / view / slice / groups read
        retry.narrowed.add(name)
        gids = narrow
    else:
        gids = [g for g in groups_reaching(plan.an, name) if g in plan.decisions]
    if not gids:
        return None
    label = name or type(work).__name__
    for g in gids:
        retry.frozen[g] = f"module {label} reads a stored width: {exc.detail}"
    retry.rounds += 1
    return "freeze"


def _self_and_parents(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def groups_shaped_by(an, module: str) -> list[int]:
    """Groups read by the ops ``module``'s own forward issued whose constants carry a width (the ops whose
    handler rewrites a shape: split sizes, view sizes, slice bounds, a conv's groups): the likeliest culprits
    when that forward computes such a constant from a stored number."""
    found: set[int] = set()
    for node in an.gm.graph.nodes:
        h = node_handler(node) if node.op == "call_function" else None
        if h is None or not h.carries_width(an, node) or node_module_path(node) != module:
            continue
        for n in node.all_input_nodes:
            for cm in _flat_cmaps(an.channel_map(n)):
                if cm is not None:
                    gid, _ = an.positions(cm)
                    found.update(int(g) for g in gid if g >= 0)
    return sorted(found)


def groups_reaching(an, module: str) -> list[int]:
    """Groups whose channels the module reads or writes: its parameters' slots, the ops it issued (node
    nn_module_stack under it) and those ops' inputs."""
    inside = (lambda p: True) if not module else (lambda p: p == module or p.startswith(module + "."))
    found: set[int] = set()

    def add(holder):
        gid, _ = an.positions(holder)
        found.update(int(g) for g in gid if g >= 0)

    for s in an.slots.values():
        if inside(s.fqn.rsplit(".", 1)[0] if "." in s.fqn else ""):
            add(s)
    for node in an.gm.graph.nodes:
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op != "call_function" or not any(inside(p) for p in paths):
            continue
        for n in [node, *node.all_input_nodes]:
            for cm in _flat_cmaps(an.channel_map(n)):
                if cm is not None:
                    add(cm)
    return sorted(found)


def _width_map(plan, old_gm, slim_gm, module: str) -> dict[int, int]:
    """old width -> new width for every channel map and shape constant of the ops ``module``'s own forward issued
    (not its children's: the attribute is read by its own code), keeping only the widths that map to one value
    (an old width seen both pruned and unpruned is ambiguous)."""
    an = plan.an
    seen: dict[int, set[int]] = {}
    slim_nodes = {n.name: n for n in slim_gm.graph.nodes}
    for node in an.gm.graph.nodes:
        if node.op != "call_function" or node_module_path(node) != module:
            continue
        for n in [node, *node.all_input_nodes]:
            for cm in _flat_cmaps(an.channel_map(n)):
                if cm is not None:
                    seen.setdefault(len(cm.ids), set()).add(plan.new_size(cm))
        new = slim_nodes.get(node.name)
        if new is not None and new.target == node.target:
            for a, b in zip(_ints(node.args), _ints(new.args)):
                seen.setdefault(a, set()).add(b)
    return {old: next(iter(new)) for old, new in seen.items() if len(new) == 1}


def _ints(args) -> list[int]:
    out = []
    torch.fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, int) and not isinstance(a, bool)
                                else None)
    return out


def stored_width_updates(plan, old_gm, slim_gm, work: nn.Module, module: str) -> list[tuple[str, str, int, int]]:
    """(module, attribute, old, new) for each int attribute of ``module`` (a user's own class; the module table's,
    fxprune/modules.py, keep their widths true themselves) whose value is a width the rewrite changed
    unambiguously. This is the generic rule for the widths no adapter names."""
    try:
        mod = work.get_submodule(module)
    except AttributeError:
        return []
    if adapter(mod) is not None:  # torch.nn's own and registered modules: modules.resize keeps them true
        return []
    widths = _width_map(plan, old_gm, slim_gm, module)
    out = []
    for attr, v in vars(mod).items():
        if attr.startswith("_") or not isinstance(v, int) or isinstance(v, bool):
            continue
        new = widths.get(v)
        if new is not None and new != v:
            out.append((module, attr, v, new))
    return out


STORED = "_fxprune_stored_widths"  # per module: the attributes set here, so a checkpoint records them too


def apply_updates(retry: Retry, plan, old_gm, slim_gm, work: nn.Module) -> list[str]:
    """Set the stored widths of every module being updated on the slim copy ``work``; returns what was set."""
    done = []
    for name in sorted(retry.update_modules):
        for module, attr, old, new in stored_width_updates(plan, old_gm, slim_gm, work, name):
            mod = work.get_submodule(module)
            setattr(mod, attr, new)
            mod.__dict__[STORED] = tuple(sorted({*mod.__dict__.get(STORED, ()), attr}))
            done.append(f"{module or type(work).__name__}.{attr}: {old} -> {new}")
    return done


__all__ = ["Retry", "MAX_ROUNDS", "next_step", "groups_reaching", "stored_width_updates", "apply_updates"]
