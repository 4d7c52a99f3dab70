"""What fxprune knows about module types, in one table (what it knows about ops is in ops.HANDLERS).

The graph says how channels flow; a module adapter says what the eager module around a weight needs once the
weight was sliced, and how a training-time method reaches the module's input:

    widths          the size attributes its forward / repr / state-dict loading read, kept true by ``resize``
    resize          resize(module): set those attributes from the module's (already sliced) tensors
    weight_in_dim   the weight dim that meets the input channels (Conv, Linear: 1; ConvTranspose, GPT-2's
                    Conv1D: 0); training-time masks and probes find a consumer's input there
    input_dim       the channel dim of the module's forward input (conv: 1; Linear, Conv1D: -1)
    partial         partial(module, x, pos) -> what the input channels at ``pos`` (along input_dim) contribute
                    to the output; for modules linear in their input (AOFP measures a masked path with it), or
                    None

A user's own layer joins with ``fxprune.register_module(MyLayer, widths=(...), resize=..., weight_in_dim=1,
input_dim=1)``; the most recently registered adapter whose type matches wins (subclasses included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import hf


@dataclass(frozen=True)
class ModuleAdapter:
    widths: tuple[str, ...] = ()
    resize: Callable | None = None
    weight_in_dim: int | None = None
    input_dim: int = 1
    partial: Callable | None = None


def _resize_conv(mod):
    w = mod.weight
    if w is None:
        return
    if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels and w.shape[1] == 1:  # depthwise
        mod.groups = mod.in_channels = mod.out_channels = w.shape[0]
    elif mod.transposed:  # transposed weights are (in, out / groups, ...)
        mod.out_channels, mod.in_channels = w.shape[1] * mod.groups, w.shape[0]
    else:
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups


def _resize_linear(mod):
    if mod.weight is not None:
        mod.out_features, mod.in_features = mod.weight.shape


def _resize_norm(mod):
    ref = mod.weight if mod.weight is not None else mod.running_mean
    if ref is not None:
        mod.num_features = ref.shape[0]


def _resize_conv1d(mod):
    mod.nx, mod.nf = mod.weight.shape  # GPT-2's Conv1D: y = x @ W + b with W (in, out)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(mod, x, w):
    conv = _CONV_FN[len(mod.kernel_size)]
    if mod.padding_mode == "zeros":
        return conv(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    pad = [p for q in reversed(mod.padding) for p in (q, q)]  # reflect / replicate / circular: pad, then convolve
    return conv(F.pad(x, pad, mode=mod.padding_mode), w, None, mod.stride, 0, mod.dilation, mod.groups)


def _partial_conv(mod, x, pos):
    """Reading only the channels at ``pos`` costs |pos| / C_in of the layer; a grouped conv is run whole on the
    input with the others zeroed (its weight has no full input dim to slice)."""
    if mod.groups == 1:
        return _conv(mod, x.index_select(1, pos), mod.weight.index_select(1, pos))
    return _conv(mod, x, mod.weight) - _conv(mod, x.index_fill(1, pos, 0.0), mod.weight)


def _conv_t(mod, x, w):
    return _CONV_T_FN[len(mod.kernel_size)](x, w, None, mod.stride, mod.padding, mod.output_padding, mod.groups,
                                             mod.dilation)


def _partial_conv_transpose(mod, x, pos):
    if mod.groups == 1:
        return _conv_t(mod, x.index_select(1, pos), mod.weight.index_select(0, pos))
    return _conv_t(mod, x, mod.weight) - _conv_t(mod, x.index_fill(1, pos, 0.0), mod.weight)


def _partial_linear(mod, x, pos):
    return F.linear(x.index_select(-1, pos), mod.weight.index_select(1, pos))


def _partial_conv1d(mod, x, pos):
    return x.index_select(-1, pos) @ mod.weight.index_select(0, pos)


def _is_hf_conv1d(mod) -> bool:  # noqa: D401
    """transformers.pytorch_utils.Conv1D, recognized without importing transformers."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None \
        and mod.weight.dim() == 2


_CONV_WIDTHS = ("in_channels", "out_channels", "groups")
# (match, adapter), most recently registered first: match is a module class or a predicate on the module
_TABLE: list[tuple[object, ModuleAdapter]] = [
    (_is_hf_conv1d, ModuleAdapter(("nf", "nx"), _resize_conv1d, weight_in_dim=0, input_dim=-1,
                                  partial=_partial_conv1d)),
    (nn.modules.batchnorm._NormBase, ModuleAdapter(("num_features",), _resize_norm)),
    (nn.Linear, ModuleAdapter(("in_features", "out_features"), _resize_linear, weight_in_dim=1, input_dim=-1,
                              partial=_partial_linear)),
    (nn.modules.conv._ConvTransposeNd, ModuleAdapter(_CONV_WIDTHS, _resize_conv, weight_in_dim=0,
                                                     partial=_partial_conv_transpose)),
    (nn.modules.conv._ConvNd, ModuleAdapter(_CONV_WIDTHS, _resize_conv, weight_in_dim=1, partial=_partial_conv)),
]
# width attributes of modules the table has no entry for (norms, embeddings) that a slim checkpoint records
_OTHER_WIDTHS = ("num_channels", "num_groups", "embedding_dim", "normalized_shape")


def register_module(cls: type, *, widths=(), resize: Callable | None = None, weight_in_dim: int | None = None,
                    input_dim: int = 1, partial: Callable | None = None) -> ModuleAdapter:
    """Tell fxprune about a module type of your own (see the module docstring for each field)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module takes an nn.Module subclass, got {cls!r}")
    if isinstance(widths, str) or not all(isinstance(a, str) for a in widths):
        raise TypeError(f"widths must be a tuple of attribute names, got {widths!r}")
    adapter = ModuleAdapter(tuple(widths), resize, weight_in_dim, int(input_dim), partial)
    _TABLE.insert(0, (cls, adapter))
    return adapter


def adapter(mod: nn.Module) -> ModuleAdapter | None:
    for match, a in _TABLE:
        if (isinstance(mod, match) if isinstance(match, type) else match(mod)):
            return a
    return None


def resize(mod: nn.Module):
    """Keep a module's size attributes true after its tensors were sliced (Hugging Face containers' widths:
    hf.update_module)."""
    a = adapter(mod)
    if a is not None and a.resize is not None:
        a.resize(mod)
    hf.update_module(mod)


def width_attributes() -> tuple[str, ...]:
    """Every size attribute pruning may change, for slim checkpoints."""
    names = [n for _, a in _TABLE for n in a.widths] + list(_OTHER_WIDTHS) + list(hf.WIDTH_ATTRS)
    return tuple(dict.fromkeys(names))


def weight_in_dim(mod: nn.Module) -> int | None:
    a = adapter(mod)
    return None if a is None else a.weight_in_dim


def consumer_partial_output(mod: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
    """What the input channels at ``pos`` contribute to ``mod``'s output (bias excluded); module hooks do not
    run. Only for modules ``can_measure`` accepts."""
    return adapter(mod).partial(mod, x, pos)


def can_measure(mod: nn.Module) -> bool:
    """Whether consumer_partial_output has a rule for this module."""
    a = adapter(mod)
    if a is None or a.partial is None or a.weight_in_dim is None:
        return False
    # padding="same" with reflect / replicate / circular: torch pads asymmetrically, not reproduced in _conv
    return getattr(mod, "padding_mode", "zeros") == "zeros" or not isinstance(getattr(mod, "padding", 0), str)
