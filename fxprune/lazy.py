"""``inplace=True`` checks the slim eager model before any slim tensor exists in full.

The skeleton (Plan.skeleton) is the slim model's module tree whose touched tensors are meta placeholders. Its
forward runs with a hook pair per module that owns touched tensors: just before the module's forward each of its
slim tensors is computed from the full-width original (Plan.slim_tensor, the function that later slims the user's
tensor, so the values are bitwise the ones the user gets), and put back to the placeholder after it. So the eager
check costs one module's slim tensors plus the activations, not a slim copy of the model. A forward that reads
another module's tensor (a parent calling ``F.linear(x, self.child.weight)``) meets a placeholder and fails:
``check_eager`` then repeats the check on a full slim copy, which is what names a failing module for freeze and
retry, or passes (the model reads tensors across modules; the check then cost the copy).

Example::

    skel = plan.skeleton(model)
    check_eager(plan, skel, slim_gm, source_gm, full, inputs, rtol, full_copy)   # raises VerificationError
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .capture import eval_mode
from .compare import _steps
from .rewrite import _get, _put


class Materializer:
    """Puts a skeleton's slim tensors in place module by module (see the module doc). ``full(fqn)``: the
    full-width tensor a slim one is computed from."""

    def __init__(self, plan, skeleton: nn.Module, full):
        self.plan, self.skeleton, self.full = plan, skeleton, full
        self.owners: dict[str, list[tuple[str, str]]] = {}  # module path -> [(tensor name, canonical fqn)]
        for fqn in plan.touched():
            for name in plan.an.aliases.get(fqn, [fqn]):
                self.owners.setdefault(name.rpartition(".")[0], []).append((name, fqn))
        self.placeholders = {name: _get(skeleton, name) for items in self.owners.values() for name, _ in items}

    def slim(self, fqn: str, like: torch.Tensor) -> torch.Tensor:
        new = self.plan.slim_tensor(fqn, self.full(fqn))
        return nn.Parameter(new, requires_grad=False) if isinstance(like, nn.Parameter) else new

    def _fill(self, items):
        def hook(mod, args):
            for name, fqn in items:
                _put(self.skeleton, name, self.slim(fqn, self.placeholders[name]))
        return hook

    def _empty(self, items):
        def hook(mod, args, out):
            for name, _ in items:
                _put(self.skeleton, name, self.placeholders[name])
        return hook

    @contextmanager
    def materialized(self):
        mods = dict(self.skeleton.named_modules())
        handles = []
        for path, items in self.owners.items():
            handles.append(mods[path].register_forward_pre_hook(self._fill(items)))
            handles.append(mods[path].register_forward_hook(self._empty(items)))
        try:
            yield self.skeleton
        finally:
            for h in handles:
                h.remove()
            for name, ghost in self.placeholders.items():  # a forward that raised skipped its post-hook
                _put(self.skeleton, name, ghost)

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The slim model's state dict, each touched tensor computed when it is read (the distributed check
        fingerprints one at a time)."""
        return _LazyState(self)


class _LazyState(Mapping):
    def __init__(self, mat: Materializer):
        self.mat, self.base = mat, mat.skeleton.state_dict(keep_vars=True)

    def __getitem__(self, k):
        v = self.base[k]
        return self.mat.plan.slim_tensor(k, self.mat.full(k)) if v.device.type == "meta" else v.detach()

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


def run_graph(interp, inputs: tuple):
    """The output of a torch.fx interpreter run one node at a time, each get_attr fetched just before its first
    reader and freed after its last (compare._steps)."""
    value = None
    for _, value in _steps(interp, inputs):
        pass
    return value


@torch.no_grad()
def check_eager(mat: Materializer, graph_interp, inputs: tuple, rtol: float, full_copy):
    """The skeleton's eager forward (tensors materialized per module) against the slim graph (``graph_interp``:
    an interpreter that slims each touched get_attr as it is read). Any failure or difference: the same check on
    a full slim copy (``full_copy()`` -> (slim graph, slim model)), which raises the VerificationError that copy
    mode raises (kind="eager", naming the module)."""
    from .verify import check_eager_matches_graph, rel_diff
    try:
        with eval_mode(mat.skeleton), mat.materialized() as skel:
            got = skel(*inputs)
        if rel_diff(got, run_graph(graph_interp, inputs)) <= rtol:
            return
    except Exception:  # noqa: BLE001 - the full copy below says what fails, and where
        pass
    slim_gm, work = full_copy()
    with eval_mode(work):
        check_eager_matches_graph(work, slim_gm, inputs, rtol=rtol)


__all__ = ["Materializer", "check_eager", "run_graph"]
