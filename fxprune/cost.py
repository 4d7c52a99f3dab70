"""FLOPs and parameter counts, measured by torch itself.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` rather than a hand-written table, so every op torch
knows a formula for (conv, linear/addmm, matmul, bmm, attention) is counted the same way everywhere in fxprune.
Its conventions: one multiply-accumulate is 2 FLOPs; biases, BatchNorm, activations, pooling and element-wise
adds are not counted.

Example::

    >>> import torch, torch.nn as nn
    >>> from fxprune.cost import count_flops, count_params
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    >>> count_flops(net, torch.randn(1, 1, 28, 28))   # 2*8*26*26*1*3*3 + 2*5408*10
    205504
    >>> count_params(net)
    54170
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_input_tuple(example_inputs: Inputs) -> tuple:
    """Normalise "a tensor or a tuple of tensors" to a tuple of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ConfigError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "wrap several inputs as a tuple: (x, y)"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own flag.

    Restoring per submodule (not just ``model.train(old)``) keeps deliberate mixes such as frozen BatchNorm
    layers inside a model that is otherwise training.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


_MISSING = object()


class _ModuleState:
    """One module's attributes by identity: its __dict__ entries, the contents of plain dict / list attributes
    (LeViT fills a dict cache of attention biases in forward) and of its hook tables (transformers installs its
    output-capturing hooks on the first forward and marks the model with a flag: restoring the flag alone would
    make the next forward install every hook a second time and record each hidden state twice), and the contents
    of its parameter, buffer, submodule and non-persistent-buffer tables."""

    def __init__(self, mod: nn.Module):
        self.mod = mod
        self.attrs = dict(vars(mod))
        self.containers = [(v, type(v)(v)) for v in self.attrs.values() if type(v) in (dict, list, OrderedDict)]
        self.tables = [(t, dict(t)) for t in (mod._parameters, mod._buffers, mod._modules)]
        self.non_persistent = set(mod._non_persistent_buffers_set)

    def restore(self):
        live = vars(self.mod)
        for key in [k for k in live if k not in self.attrs]:
            del live[key]
        for key, value in self.attrs.items():
            if live.get(key, _MISSING) is not value:
                live[key] = value
        for box, saved in self.containers:
            if not _same_contents(box, saved):
                box.clear()
                box.extend(saved) if isinstance(box, list) else box.update(saved)
        for table, saved in self.tables:
            if table.keys() != saved.keys() or any(table[k] is not v for k, v in saved.items()):
                table.clear()
                table.update(saved)
        if self.mod._non_persistent_buffers_set != self.non_persistent:
            self.mod._non_persistent_buffers_set.clear()
            self.mod._non_persistent_buffers_set.update(self.non_persistent)


def _same_contents(box, saved) -> bool:
    """The same entries by identity (a container filled in forward under tracing holds new fake tensors)."""
    if isinstance(box, dict):
        return box.keys() == saved.keys() and all(box[k] is v for k, v in saved.items())
    return len(box) == len(saved) and all(a is b for a, b in zip(box, saved))


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """Run the user's forward (tracing it, counting its FLOPs) without keeping anything it assigns: every
    module attribute the forward sets, adds or replaces (a cached anchor grid, a new buffer; under torch.export
    these are fake tensors that would break deepcopy and pickling of the user's model) is put back as it was,
    also when the block raises. Tensors are restored by identity; the block must not write into them in place
    (eval-mode forwards under tracing do not)."""
    states = [_ModuleState(m) for m in model.modules()]
    try:
        yield model
    finally:
        for state in states:
            state.restore()


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode with the formulas torch lacks (ops.extra_flop_formulas)."""
    from .ops import extra_flop_formulas
    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


def count_flops(model: nn.Module, example_inputs: Inputs) -> int:
    """FLOPs of one forward pass on ``example_inputs`` (eval mode, no grad), as FlopCounterMode counts them.

    The forward runs on fake tensors (shapes only: no arithmetic, no memory for activations; a half-precision
    language model's forward on this CPU took seconds). A forward that needs values (``.item()``, a
    data-dependent branch: fake tensors raise there, they never guess) is run for real instead."""
    inputs = as_input_tuple(example_inputs)
    try:
        return _count(model, inputs, fake=True)
    except Exception:  # noqa: BLE001 - data-dependent code: count on the real values
        return _count(model, inputs, fake=False)


def _count(model: nn.Module, inputs: tuple, fake: bool) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    with untouched(model), eval_mode(model), torch.no_grad():
        counter = flop_counter()
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), counter:
            model(*inputs)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BatchNorm running stats are not parameters)."""
    return sum(p.numel() for p in model.parameters())
