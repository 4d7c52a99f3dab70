"""Half-precision models (bfloat16, float16) run node by node in float32, without a float32 copy of the model.

A half model's own rounding (bf16: 8 bits of mantissa) would swamp verification's float32 tolerance, yet a
float32 copy of a 7B model does not fit next to it. ``Float32`` is a mixin for a torch.fx Interpreter that
upcasts each half parameter as its get_attr node runs (the interpreter frees it after its last use, so about one
layer's tensors are float32 at a time), and rewrites every dtype constant of the graph that names the half dtype
(``_to_copy(dtype=bfloat16)``, ``full(..., dtype=bfloat16)``) to float32. The graph's own dtype assertions
(``_assert_tensor_metadata`` on rotary ``inv_freq``) describe the half model and are skipped.

Example::

    class Ref(Float32, HookedInterpreter): ...
    out = Ref(gm, plan, half=torch.bfloat16).run(*inputs)     # float32 outputs
"""

from __future__ import annotations

import torch
from torch.fx.node import map_aggregate

from .ops import asserts_dtype, half_weight

HALF = (torch.float16, torch.bfloat16)
BIG = 1 << 22  # elements: a half weight above this is upcast a block at a time by the op reading it


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter or buffer (float32 when it has none)."""
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def upcast(xs, half: torch.dtype):
    """Inputs (any nesting) with every ``half`` tensor in float32."""
    return map_aggregate(xs, lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == half else a)


class Float32:
    """Mixin for torch.fx.Interpreter subclasses: compute a ``half``-dtype graph in float32 (see module doc)."""

    def __init__(self, *args, half: torch.dtype, **kwargs):
        super().__init__(*args, **kwargs)
        self.half = half

    def _promote(self, a):
        if self.half is None:  # a float32 model read lazily: nothing to upcast
            return a
        if a is self.half:
            return torch.float32
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == self.half else a

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value if self._big(value) else self._promote(value)  # a big one is upcast by the op reading it

    def _big(self, a) -> bool:
        return self.half is not None and isinstance(a, torch.Tensor) and a.dtype == self.half and a.numel() > BIG

    def placeholder(self, target, args, kwargs):
        return self._promote(super().placeholder(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if self.half is not None and asserts_dtype(target):
            return None
        how = half_weight(target)
        if how is not None and len(args) > how[0] and self._big(args[how[0]]):
            return self._blockwise(target, args, kwargs, how[1])
        return super().call_function(target, map_aggregate(args, self._promote),
                                     map_aggregate(kwargs, self._promote))

    def _blockwise(self, target, args, kwargs, how: str):
        """A language model's embedding and output projection without a float32 copy of their weight (0.3x of a
        156M model in bfloat16): the embedding gathers rows, then upcasts (exact); the linear upcasts BIG
        elements of its weight at a time and concatenates the outputs."""
        if how == "gather":
            return super().call_function(target, args, kwargs).float()
        x, w, b = self._promote(args[0]), args[1], (args[2] if len(args) > 2 else None)
        rows = max(1, BIG // w.shape[1])
        return torch.cat([super(Float32, self).call_function(
            target, (x, w[i:i + rows].float(), None if b is None else self._promote(b[i:i + rows])), {})
            for i in range(0, w.shape[0], rows)], dim=-1)

    def call_method(self, target, args, kwargs):
        return super().call_method(target, map_aggregate(args, self._promote), map_aggregate(kwargs, self._promote))
