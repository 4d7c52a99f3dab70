"""``inplace=True``: the user's own modules are slimmed tensor by tensor, after everything was verified.

No slim copy of the model exists at any time: each touched parameter, buffer or plain tensor attribute (a
per-channel ``self.scale``) is sliced/folded from the user's tensor and replaces it, one at a time, and the
graphs that held the old one let go of it, so the peak is the model plus one tensor. Then the attributes the
skeleton (Plan.skeleton) fixed follow: size attributes (in_channels, num_features, ...), width-carrying configs
(Hugging Face's ``config``) and the stored widths freeze-and-retry updated. Module objects stay the user's, so
references the user holds keep working. Nothing here can fail on a verified plan but a bug, so the user's model is
either untouched (everything before raised) or the verified slim model.
"""

from __future__ import annotations

import torch
from torch import nn

from .retry import STORED
from .rewrite import _get, _put

_PLAIN = (int, float, bool, str, tuple, list, type(None))


@torch.no_grad()
def slim_in_place(plan, model: nn.Module, skeleton: nn.Module, graphs: tuple = (), released: tuple = (),
                  values: dict | None = None):
    """Replace each touched tensor of ``model`` by its slim version (computed from ``values[fqn]`` where given:
    re-estimated statistics, else from the model's own), in ``model`` and in each of ``graphs`` (the slim graph
    of Plan.graph_only); ``released``: graphs that still hold the old tensors (the captured one) get a meta
    tensor of the old shape instead, so nothing keeps the full-width data alive. Then move_attributes."""
    values = {plan.an.canonical(k): v for k, v in (values or {}).items()}
    touched = set(plan.touched())
    for fqn in dict.fromkeys([*plan.touched(), *values]):  # untouched values (statistics) go in as they are
        old = _get(model, fqn)
        src = values.get(fqn, old)
        new = plan.slim_tensor(fqn, src) if fqn in touched else src.detach().clone()
        new = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        ghost = torch.empty_like(old, device="meta")
        ghost = nn.Parameter(ghost, requires_grad=False) if isinstance(old, nn.Parameter) else ghost
        del old, src
        for name in plan.an.aliases.get(fqn, [fqn]):
            for m in (model, *graphs):
                _put(m, name, new)
            for g in released:
                _put(g, name, ghost)
    move_attributes(skeleton, model)


def move_attributes(src: nn.Module, dst: nn.Module):
    """The non-tensor state the rewrite changed on ``src`` (the skeleton): size attributes, configs, stored
    widths. Tensors are moved by slim_in_place."""
    src_mods = dict(src.named_modules())
    for name, mod in dst.named_modules():
        new = src_mods[name]
        for k, v in vars(new).items():
            if k == STORED:  # the stored widths freeze-and-retry updated (a checkpoint records them)
                mod.__dict__[k] = v
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, _PLAIN) or hasattr(v, "to_dict"):
                setattr(mod, k, v)
