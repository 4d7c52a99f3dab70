"""Module name patterns (``ignore=``, ``amounts=``): which modules a pattern selects, and which pattern wins.

A pattern is a module path ("layers.0.conv1"), an fnmatch glob ("layers.*.conv1"), or a module object. It
selects the modules it names and everything inside them. Where several patterns select a module, the most
specific wins: the one that names the deepest module, then an exact name over a glob, then the glob with the
most literal characters.

Example::

    selected = match_modules(model, ["layers.*", "layers.0.conv1"], "amounts")
    under("layers.0.conv1", selected)      # -> "layers.0.conv1"
"""

from __future__ import annotations

import fnmatch

from torch import nn

from .errors import ConfigError

_WILD = set("*?[")


def specificity(pattern) -> tuple:
    if isinstance(pattern, nn.Module) or not (set(pattern) & _WILD):
        return (1, 0)
    return (0, sum(c not in _WILD for c in pattern))


def match_modules(model: nn.Module, patterns, what: str) -> dict[str, object]:
    """module path -> the most specific pattern that names it; a pattern that matches nothing is an error."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, object] = {}
    for p in patterns:
        if isinstance(p, nn.Module):
            if id(p) not in names:
                raise ConfigError(f"{what}: module {type(p).__name__} is not part of the model")
            hits = [names[id(p)]]
        else:
            hits = [n for n in names.values() if n and (fnmatch.fnmatchcase(n, p) or n == p)]
            if not hits:
                some = ", ".join([n for n in names.values() if n][:5])
                raise ConfigError(f"{what}: pattern {p!r} matches no module; module names look like {some}, ...")
        for h in hits:
            if h not in out or specificity(p) > specificity(out[h]):
                out[h] = p
    return out


def under(module_path: str, selected: dict[str, object]):
    """The pattern that governs ``module_path``: the one selecting it or its deepest selected ancestor."""
    best = None
    for sel, pat in selected.items():
        if module_path == sel or module_path.startswith(sel + "."):
            if best is None or (sel.count("."), specificity(pat)) > (best[0].count("."), specificity(best[1])):
                best = (sel, pat)
    return None if best is None else best[1]


def group_amounts(prunable, amounts: dict, selected: dict[str, object], default: float) -> dict[int, float]:
    """Per prunable group, the amount of the most specific pattern governing one of its producer modules.
    A pattern that governs no prunable group is an error (it would silently do nothing)."""
    out, used = {}, set()
    for g in prunable:
        pats = [p for m in g.modules if (p := under(m, selected)) is not None]
        if pats:
            best = max(pats, key=specificity)
            out[g.gid] = float(amounts[best])
            used.add(best)
        else:
            out[g.gid] = default
    idle = [p for p in amounts if p not in used]
    if idle:
        raise ConfigError(
            f"amounts: pattern{'s' if len(idle) > 1 else ''} {', '.join(map(repr, idle))} "
            f"select{'' if len(idle) > 1 else 's'} no module whose "
            "output channels can be pruned (they match only frozen layers, or modules such as BatchNorm that "
            "follow another layer's channels); name the conv/linear layer that produces the channels. "
            "fxprune.describe_groups(model, example_inputs) lists the groups and their layers")
    return out
