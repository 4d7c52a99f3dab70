"""``inplace=True``: the user's own modules are slimmed tensor by tensor, after the slim graph was verified.

No copy of the model is made: every touched parameter, buffer or plain tensor attribute (a per-channel
``self.scale``) is replaced by its slim version one at a time, and size attributes (in_channels, num_features,
Hugging Face's head counts and per-layer config) follow. Module objects stay the user's, so references the user
holds keep working. Peak memory: the model plus one tensor.
"""

from __future__ import annotations

import torch
from torch import nn


def slim_in_place(plan, model: nn.Module, graphs: tuple, released: tuple = (), values: dict | None = None):
    """``inplace=True`` without a copy of the model: each touched tensor of the user's model is sliced/folded
    (from ``values[fqn]`` where given: re-estimated statistics, else the model's own) and replaces the old one in
    ``model`` and in every graph of ``graphs`` (the slim graph built by Plan.graph_only, which shares the model's
    tensors), one tensor at a time, so the peak is the model plus one tensor. ``released``: graphs that still hold
    the old tensors (the captured one) get a meta-device tensor of the old shape instead, so nothing keeps the
    full-width data alive. Width attributes follow. Call it only after the slim graph was verified."""
    from .rewrite import _get, _put, update_attributes
    values = {plan.an.canonical(k): v for k, v in (values or {}).items()}
    with torch.no_grad():
        for fqn in dict.fromkeys([*plan.touched(), *values]):  # untouched values (statistics) go in as they are
            old = _get(model, fqn)
            new = plan.slim_tensor(fqn, values[fqn]) if fqn in values else plan.slim_tensor(fqn, old)
            new = new.clone() if fqn in values and fqn not in plan.touched() else new  # not the caller's tensor
            new = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
            ghost = torch.empty_like(old, device="meta")
            ghost = nn.Parameter(ghost, requires_grad=False) if isinstance(old, nn.Parameter) else ghost
            del old
            for name in plan.an.aliases.get(fqn, [fqn]):
                for m in (model, *graphs):
                    _put(m, name, new)
                for g in released:
                    _put(g, name, ghost)
    for m in (model, *graphs):
        for mod in m.modules():
            update_attributes(mod)
    plan.fix_modules(model)

def transplant(src: nn.Module, dst: nn.Module):
    src_mods = dict(src.named_modules())
    for name, mod in dst.named_modules():
        new = src_mods[name]
        for k in list(mod._parameters):
            mod._parameters[k] = new._parameters[k]
        for k in list(mod._buffers):
            mod._buffers[k] = new._buffers[k]
        for k, v in vars(new).items():
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, _PLAIN) or hasattr(v, "to_dict"):
                setattr(mod, k, v)
