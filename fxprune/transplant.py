"""``inplace=True``: move a verified slim copy's state into the user's own module objects.

Everything the rewrite may have changed moves: parameters, buffers, plain tensor attributes (a per-channel
``self.scale``), size attributes (in_channels, num_features, ...) and width-carrying configs (Hugging Face's
``config``). Module objects themselves stay the user's, so references the user holds keep working.
"""

from __future__ import annotations

import torch
from torch import nn

from .retry import STORED

_PLAIN = (int, float, bool, str, tuple, list, type(None), torch.Tensor)


def transplant(src: nn.Module, dst: nn.Module):
    src_mods = dict(src.named_modules())
    for name, mod in dst.named_modules():
        new = src_mods[name]
        for k in list(mod._parameters):
            mod._parameters[k] = new._parameters[k]
        for k in list(mod._buffers):
            mod._buffers[k] = new._buffers[k]
        for k, v in vars(new).items():
            if k == STORED:  # the stored widths freeze-and-retry updated (a checkpoint records them)
                mod.__dict__[k] = v
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, _PLAIN) or hasattr(v, "to_dict"):
                setattr(mod, k, v)
