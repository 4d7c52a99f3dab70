"""Capture: a user's nn.Module -> an ATen-level torch.fx GraphModule via torch.export.

torch.export (not symbolic_trace) is the front end because it reaches real-world models with Python control
flow (every Hugging Face vision model tried), records a fake tensor with the shape on every node
(``node.meta["val"]``) and the module path of every op (``node.meta["nn_module_stack"]``), and keeps parameters
under their fully qualified names as ``get_attr`` nodes of ``ep.module()``.

Example::

    gm = capture(model, torch.randn(2, 3, 32, 32))
    print(gm.code)          # aten.conv2d(x, self.conv1.weight, ...), ...
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from .cost import as_input_tuple as as_tuple, eval_mode
from .errors import CaptureError


def _batch_dims(args: tuple):
    # Dim.AUTO lets export keep the batch symbolic where the model allows and specialize it silently where
    # not, so reshape constants refer to the batch by a sym_size node instead of the example's number.
    auto = torch.export.Dim.AUTO
    return tuple({0: auto} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def capture(model: nn.Module, example_inputs) -> torch.fx.GraphModule:
    """torch.export the model in eval mode and return the unlifted ATen GraphModule.

    The model is not changed: its training flags are restored and no parameter is touched.
    """
    args = as_tuple(example_inputs)
    # a batch of 1 would be specialized (0/1 specialization) and larger calibration batches would then fail
    args = tuple(a.expand(2, *a.shape[1:]).clone() if isinstance(a, torch.Tensor) and a.dim() > 0
                 and a.shape[0] == 1 else a for a in args)
    with eval_mode(model), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, args, dynamic_shapes=_batch_dims(args))
        except Exception:  # noqa: BLE001 - a model that cannot keep its batch dynamic: retry statically
            try:
                ep = torch.export.export(model, args)
            except Exception as exc:
                raise CaptureError(
                    f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
                    "What to try: check that example_inputs have the shape and dtype the model's forward "
                    "expects (a batch of 2 avoids batch-size-1 specialization); data-dependent Python control "
                    "flow (if on tensor values) must be rewritten with torch.cond or moved out of forward."
                ) from exc
    return ep.module()


def node_module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost user module that issued this op ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_") else path
